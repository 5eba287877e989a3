"""Gymnasium environments for FedStitch's client-weighting decision (DESIGN.md §6).

Both have the same spaces (:mod:`rl_agent.observation`): a padded Dict observation of one
stitching step, and one action a_i in [0, 1] per client slot; client i's weight is n_i * a_i
(a = 1 everywhere is data-size weighting).

- :class:`StitchEnv` drives a live FedStitch run on rank 0's machine: ``reset()`` starts a run in a
  background thread (single-process comm) whose client weighting hands each step's observation to
  the env and waits for ``step(action)``. The reward of a step is what the run reports after the
  action: the gain of the data-weighted quality proxy once the chosen block is appended, plus the
  test accuracy when the run ends (``terminated``).
- :class:`ReplayStitchEnv` replays steps recorded in traces. It is off-policy: an action only
  decides which of the *recorded* candidates would have been chosen (argmax of the scores
  aggregated with n_i * a_i) and earns that candidate's recorded proxy gain; the next observation
  is the recorded next step whatever the action (each step is a contextual bandit). There is no
  final test-accuracy reward: the alternative model was never evaluated.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from emulator.algorithms.stitch_weighting import StepObservation
from emulator.config import Config
from rl_agent.observation import Encoded, action_space, encode, expand_actions, observation_space
from rl_agent.replay import RecordedStep, load_episodes

_POLL_S = 0.5  # how often a waiting env checks that the run thread is still alive


def terminal_observation(space: gym.spaces.Dict) -> dict[str, np.ndarray]:
    """The observation returned with ``terminated``: nothing observed, step = 1."""
    obs = {k: np.zeros(s.shape, dtype=np.float32) for k, s in space.spaces.items()}
    obs["step"][0] = 1.0
    return obs


class _Abandon(BaseException):
    """Raised inside the run thread when the env abandons its episode."""


_STOP = object()


class _Bridge:
    """The ClientWeighting a live run gets: hands observations to the env and waits for its action."""

    name = "env"  # what the trace's rl/steps.policy records

    def __init__(self) -> None:
        self.messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.actions: queue.Queue[Any] = queue.Queue()
        self.abandoned = threading.Event()
        self.last_actions = np.zeros(0, dtype=np.float64)

    def weights(self, obs: StepObservation) -> np.ndarray:
        if self.abandoned.is_set():
            raise _Abandon
        self.messages.put(("obs", obs))
        actions = self.actions.get()
        if actions is _STOP:
            raise _Abandon
        self.last_actions = actions
        return np.asarray(obs.num_samples, dtype=np.float64) * actions

    def reward(self, value: float, *, done: bool) -> None:
        if self.abandoned.is_set():
            raise _Abandon
        self.messages.put(("reward", float(value), bool(done)))


class StitchEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """A live FedStitch run as an episode; one step per stitching step (see the module docstring).

    ``cfg``: a FedStitch config (``algorithm = "fedstitch"``); each episode runs it with a seed drawn
    from the env's RNG (``reset(options={"run_seed": s})`` fixes it) and writes its trace to
    ``trace_dir``/``<name>-episode<k>.h5`` (a temporary folder removed by ``close()`` when None).
    ``trace_path`` is the current episode's trace. ``reset()`` during an episode abandons it: the
    run thread stops at its next weighting call and closes its trace.
    """

    metadata = {"render_modes": []}

    def __init__(
        self, cfg: Config, *, trace_dir: Path | str | None = None, max_clients: int | None = None,
        max_candidates: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.max_clients = max_clients or cfg.rl.max_clients
        self.max_candidates = max_candidates or cfg.rl.max_candidates
        self.observation_space = observation_space(self.max_clients, self.max_candidates)
        self.action_space = action_space(self.max_clients)
        self._tmp = trace_dir is None
        self.trace_dir = Path(tempfile.mkdtemp(prefix="fedemu-stitchenv-")) if trace_dir is None else Path(trace_dir)
        self.episodes = 0
        self.trace_path: Path | None = None
        self.summary: Any = None
        self._seeded = False
        self._thread: threading.Thread | None = None
        self._bridge: _Bridge | None = None
        self._current: tuple[StepObservation, Encoded] | None = None

    # ---- the run thread --------------------------------------------------------------------------------
    def _start(self, run_seed: int) -> None:
        from emulator.comm import SingleComm
        from emulator.runner import run

        self.episodes += 1
        self.trace_path = self.trace_dir / f"{self.cfg.name}-episode{self.episodes:05d}.h5"
        cfg = dataclasses.replace(
            self.cfg, seed=run_seed,
            output=dataclasses.replace(self.cfg.output, trace=str(self.trace_path), overwrite=True),
        )
        bridge = _Bridge()

        def target() -> None:
            try:
                bridge.messages.put(("end", run(cfg, SingleComm(), weighting=bridge)))
            except _Abandon:
                bridge.messages.put(("abandoned",))
            except BaseException as err:  # handed to the env's thread, which raises it
                bridge.messages.put(("error", err))

        self._bridge = bridge
        self._thread = threading.Thread(target=target, name=f"stitchenv-episode{self.episodes}", daemon=True)
        self._thread.start()

    def _next(self) -> tuple[Any, ...]:
        assert self._bridge is not None and self._thread is not None
        while True:
            try:
                return self._bridge.messages.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._bridge.messages.empty():
                    return ("error", RuntimeError("the run thread died without a word"))

    def _abandon(self) -> None:
        """Stop the episode's run thread (if any) and wait for it."""
        thread, bridge = self._thread, self._bridge
        self._thread = self._bridge = None
        self._current = None
        if thread is None or bridge is None:
            return
        bridge.abandoned.set()
        bridge.actions.put(_STOP)
        thread.join()

    # ---- gymnasium API ---------------------------------------------------------------------------------
    def _encode(self, obs: StepObservation) -> dict[str, np.ndarray]:
        enc = encode(obs, self.max_clients, self.max_candidates)
        self._current = (obs, enc)
        return {k: v.copy() for k, v in enc.obs.items()}

    @staticmethod
    def _info(obs: StepObservation) -> dict[str, Any]:
        return {"round": obs.round, "step": obs.step, "num_clients": len(obs.num_samples),
                "num_candidates": len(obs.candidates)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        # Unseeded first reset: the config's seed, so a fresh env is reproducible.
        super().reset(seed=seed if seed is not None or self._seeded else self.cfg.seed)
        self._seeded = True
        self._abandon()
        run_seed = (options or {}).get("run_seed")
        if run_seed is None:
            run_seed = int(self.np_random.integers(0, 2**31 - 1))
        self.summary = None
        self._start(int(run_seed))
        msg = self._next()
        while msg[0] == "reward":  # a reward before any decision belongs to nobody
            msg = self._next()
        if msg[0] == "obs":
            return self._encode(msg[1]), self._info(msg[1])
        self._abandon()
        if msg[0] == "error":
            raise RuntimeError(f"the FedStitch run failed: {type(msg[1]).__name__}: {msg[1]}") from msg[1]
        raise RuntimeError("the run ended before its first stitching step (is algorithm = 'fedstitch'?)")

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._current is None or self._bridge is None:
            raise RuntimeError("no step in progress: call reset() first (or again after the episode ended)")
        obs, enc = self._current
        self._current = None
        self._bridge.actions.put(expand_actions(action, enc.rows, len(obs.num_samples)))
        reward = 0.0
        while True:
            msg = self._next()
            kind = msg[0]
            if kind == "reward":
                reward += msg[1]
            elif kind == "obs":
                return self._encode(msg[1]), reward, False, False, self._info(msg[1])
            elif kind == "end":
                self.summary = msg[1]
                self._abandon()  # joins the finished thread
                return terminal_observation(self.observation_space), reward, True, False, {"round": -1, "step": -1}
            else:
                self._abandon()
                err = msg[1] if kind == "error" else RuntimeError("episode abandoned")
                raise RuntimeError(f"the FedStitch run failed: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._abandon()
        if self._tmp:
            shutil.rmtree(self.trace_dir, ignore_errors=True)
        super().close()


class ReplayStitchEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """Recorded FedStitch steps as episodes, one per trace (off-policy; see the module docstring).

    ``traces``: trace paths, or episodes already loaded (lists of :class:`RecordedStep`).
    ``reset(options={"episode": i})`` picks an episode; otherwise one is drawn from the env's RNG.
    ``info`` of a step: the candidate chosen, the one data-size weights choose and its reward.
    """

    metadata = {"render_modes": []}

    def __init__(
        self, traces: list[Path] | list[str] | list[list[RecordedStep]], *, max_clients: int = 64,
        max_candidates: int = 64,
    ) -> None:
        items = list(traces)
        if items and all(isinstance(t, list) for t in items):
            self.episodes: list[list[RecordedStep]] = [ep for ep in items if ep]  # type: ignore[misc]
            if not self.episodes:
                raise ValueError("no recorded steps")
        else:
            self.episodes = load_episodes([Path(t) for t in items])  # type: ignore[arg-type]
        self.max_clients = max_clients
        self.max_candidates = max_candidates
        self.observation_space = observation_space(max_clients, max_candidates)
        self.action_space = action_space(max_clients)
        self._episode = 0
        self._t = 0
        self._enc: Encoded | None = None

    @property
    def num_steps(self) -> int:
        return sum(len(ep) for ep in self.episodes)

    def encoded(self, step: RecordedStep) -> Encoded:
        return encode(step.obs, self.max_clients, self.max_candidates)

    def _observe(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        step = self.episodes[self._episode][self._t]
        self._enc = self.encoded(step)
        info = {"episode": self._episode, "round": step.obs.round, "step": step.obs.step}
        return {k: v.copy() for k, v in self._enc.obs.items()}, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        episode = (options or {}).get("episode")
        if episode is None:
            episode = int(self.np_random.integers(len(self.episodes)))
        if not 0 <= int(episode) < len(self.episodes):
            raise ValueError(f"episode {episode} out of range: {len(self.episodes)} episodes")
        self._episode, self._t = int(episode), 0
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._enc is None:
            raise RuntimeError("no step in progress: call reset() first (or again after the episode ended)")
        step = self.episodes[self._episode][self._t]
        n = len(step.obs.num_samples)
        chosen = step.choose(expand_actions(action, self._enc.rows, n))
        data_chosen = step.choose(np.ones(n))
        reward = step.gain(chosen)
        info = {"chosen": chosen, "data_chosen": data_chosen, "data_reward": step.gain(data_chosen),
                "recorded_chosen": step.recorded_chosen, "round": step.obs.round}
        self._t += 1
        if self._t >= len(self.episodes[self._episode]):
            self._enc = None
            return terminal_observation(self.observation_space), reward, True, False, info
        obs, _ = self._observe()
        return obs, reward, False, False, info
