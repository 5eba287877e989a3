"""Offline training on recorded FedStitch steps: the built-in REINFORCE agent, or stable-baselines3 PPO.

PPO (the optional ``rl`` extra) learns a policy over the whole padded observation, which the live
run cannot load without stable-baselines3. So a PPO policy is *distilled* into the built-in
per-client network (regressing its actions on every recorded step) and saved in the same
safetensors format: every policy file loads as a live policy (``stitch.policy``). The reports
give PPO's own reward and the distilled policy's, so a poor distillation shows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from emulator.errors import UserError
from rl_agent.env import ReplayStitchEnv
from rl_agent.policy import ReinforcePolicy

Act = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Evaluation:
    mean_reward: float  # per recorded step, the policy's deterministic actions
    data_reward: float  # the same steps with a = 1 (data-size weighting)
    steps: int
    agreement: float  # share of steps where the policy chose what data-size weights choose


def evaluate(env: ReplayStitchEnv, act: Act) -> Evaluation:
    """Replay every recorded step once with ``act`` and with a = 1."""
    rewards: list[float] = []
    data: list[float] = []
    same = 0
    for episode in range(len(env.episodes)):
        obs, _ = env.reset(options={"episode": episode})
        done = False
        while not done:
            obs, reward, done, _, info = env.step(act(obs))
            rewards.append(float(reward))
            data.append(float(info["data_reward"]))
            same += int(info["chosen"] == info["data_chosen"])
    return Evaluation(float(np.mean(rewards)), float(np.mean(data)), len(rewards), same / len(rewards))


class Progress:
    """A tqdm bar on a terminal, else a line every tenth of the work."""

    def __init__(self, total: int, what: str, *, mode: str = "auto") -> None:
        self.total = total
        self.what = what
        self.done = 0
        self._bar: Any = None
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=what, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1, **stats: float) -> None:
        before, self.done = self.done, self.done + n
        text = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines":
            every = max(1, math.ceil(self.total / 10))
            if before // every != self.done // every or self.done == self.total:
                print(f"{self.what} {self.done}/{self.total}  {text}".rstrip(), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def train_reinforce(
    env: ReplayStitchEnv, policy: ReinforcePolicy, *, episodes: int, seed: int, progress: str = "auto"
) -> None:
    """REINFORCE with per-step updates (each replayed step is a contextual bandit)."""
    bar = Progress(episodes, "episode", mode=progress)
    recent: list[float] = []
    env.action_space.seed(seed)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        done = False
        while not done:
            obs, reward, done, _, _ = env.step(policy.act(obs, explore=True))
            policy.learn(reward)
            recent.append(float(reward))
        policy.end_episode()
        recent = recent[-200:]
        bar.update(reward=float(np.mean(recent)))
    bar.close()


def ppo_available() -> bool:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return False
    return True


def train_ppo(
    env: ReplayStitchEnv, *, episodes: int, seed: int, hidden: int, progress: str = "auto"
) -> tuple[Any, Act]:
    """PPO (stable-baselines3, MultiInputPolicy) on the replay env; returns the model and its greedy act."""
    try:
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError:
        raise UserError(
            "--agent ppo needs stable-baselines3: pip install 'fedemu[rl]' (or use --agent reinforce)"
        ) from None

    steps = max(1, round(episodes * env.num_steps / len(env.episodes)))
    n_steps = int(min(256, max(16, steps))) // 16 * 16
    batch = next(b for b in (64, 32, 16) if n_steps % b == 0)  # whole mini-batches only
    bar = Progress(steps, "step", mode=progress)

    class _Bar(BaseCallback):
        def _on_step(self) -> bool:
            bar.update(1)
            return True

    model = PPO("MultiInputPolicy", env, seed=seed, n_steps=n_steps, batch_size=batch, n_epochs=10,
                policy_kwargs={"net_arch": [hidden, hidden]}, device="cpu", verbose=0)
    model.learn(total_timesteps=steps, callback=_Bar())
    bar.close()

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        action, _ = model.predict(obs, deterministic=True)
        return np.asarray(action, dtype=np.float32)

    return model, act


def distill(env: ReplayStitchEnv, act: Act, policy: ReinforcePolicy) -> float:
    """Fit ``policy`` to reproduce ``act``'s per-client actions on every recorded step; returns the MSE."""
    observations = [env.encoded(step).obs for episode in env.episodes for step in episode]
    actions = [np.clip(act(o), 0.0, 1.0) for o in observations]
    return policy.fit_actions(observations, actions)
