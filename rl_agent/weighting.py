"""The RL client weighting that live FedStitch runs use (``ClientWeighting``), and its factory.

The CLI wires it in (``fedemu run`` with ``algorithm = "fedstitch"``): ``make_weighting(cfg)``
on rank 0, passed as ``weighting=`` to ``emulator.runner.run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emulator.algorithms.stitch_weighting import ClientWeighting, StepObservation
from emulator.config import Config
from emulator.errors import UserError
from rl_agent.observation import encode, expand_actions
from rl_agent.policy import ReinforcePolicy


class PolicyWeighting:
    """Client weights ``n_i * a_i`` from a :class:`ReinforcePolicy`; learns from the rewards when ``train``.

    ``last_actions``: the per-client actions of the last ``weights`` call (1 for clients beyond
    ``max_clients``, which the observation does not show), for the trace's ``stitch/clients.action``.
    ``save``: where to write the policy when the episode ends (``reward(done=True)``) and on ``close``.
    """

    name = "reinforce"

    def __init__(
        self, policy: ReinforcePolicy, *, train: bool, max_clients: int = 64, max_candidates: int = 64,
        save: Path | str | None = None,
    ) -> None:
        self.policy = policy
        self.train = train
        self.max_clients = max_clients
        self.max_candidates = max_candidates
        self.save_path = Path(save) if save else None
        self.last_actions = np.zeros(0, dtype=np.float64)
        self._dirty = False

    def weights(self, obs: StepObservation) -> np.ndarray:
        enc = encode(obs, self.max_clients, self.max_candidates)
        padded = self.policy.act(enc.obs, explore=self.train)
        self.last_actions = expand_actions(padded, enc.rows, len(obs.num_samples))
        return np.asarray(obs.num_samples, dtype=np.float64) * self.last_actions

    def reward(self, value: float, *, done: bool) -> None:
        if self.train:
            self.policy.learn(value, final=done)
            self._dirty = True
        if done:
            self.policy.end_episode()
            self.close()

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The policy's state (network, optimiser, exploration RNG, episode) and this wrapper's, for checkpoints."""
        arrays, meta = self.policy.state_dict()
        out = {f"policy/{k}": v for k, v in arrays.items()}
        if len(self.last_actions):
            out["last_actions"] = self.last_actions.copy()
        return out, {"policy": meta, "train": self.train, "dirty": self._dirty}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if bool(meta["train"]) != self.train:
            raise UserError(f"the checkpoint's RL weighting has rl.train = {meta['train']}, this run's "
                            f"{self.train}: resume with the run's own config")
        self.policy.load_state_dict({k[len("policy/"):]: v for k, v in arrays.items() if k.startswith("policy/")},
                                    meta["policy"])
        self.last_actions = np.array(arrays.get("last_actions", np.zeros(0)), dtype=np.float64)
        self._dirty = bool(meta["dirty"])

    def close(self) -> None:
        """Write the policy to ``save`` if it learnt anything since the last write (or was never written)."""
        if self.save_path is not None and (self._dirty or not self.save_path.exists()):
            self.policy.save(self.save_path)
            self._dirty = False


def make_weighting(cfg: Config) -> ClientWeighting | None:
    """The client weighting of a live FedStitch run: None for ``stitch.weighting = "data"``.

    ``stitch.policy`` set: the policy in that file (its network; lr, sigma and the baseline momentum
    from ``[rl]``); empty: a fresh policy seeded by the run seed. ``rl.train`` keeps it learning during
    the run; ``rl.save`` writes it at the end of the run. A bad policy file is a one-line UserError.
    """
    if cfg.stitch.weighting == "data":
        return None
    rl = cfg.rl
    if cfg.stitch.policy:
        policy = ReinforcePolicy.load(cfg.stitch.policy, rl=rl, seed=cfg.seed)
    else:
        policy = ReinforcePolicy.from_config(rl, seed=cfg.seed)
    return PolicyWeighting(policy, train=rl.train, max_clients=rl.max_clients, max_candidates=rl.max_candidates,
                           save=rl.save or None)
