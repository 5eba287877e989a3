"""FedStitch's client-weighting interface: how much each client's score vector counts (DESIGN.md §5, §6).

The server aggregates S_c = Σ_i w_i s_ic. The weights come from any object with ``weights`` and
``reward`` (:class:`ClientWeighting`): plain data-size weights here (the "without RL" ablation),
the RL policy in ``rl_agent`` (the default of live runs, wired by the CLI: the emulator core never
imports ``rl_agent``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Columns of StepObservation.meta, per client.
META_COLUMNS = (
    "log_samples",  # log(1 + the client's sample count)
    "label_entropy",  # entropy of its label histogram / log(num_classes), in [0, 1]
    "scored_fraction",  # share of the candidates it could hold and score
    "prefix_proxy",  # its nearest-class-mean accuracy of the current prefix's features
    "score_agreement",  # Spearman correlation of its scores with the data-weighted mean scores
)


@dataclass(frozen=True)
class StepObservation:
    """What the server knows when it weights the clients of one stitching step.

    Rows are the clients that answered (status ok), columns the step's candidate blocks.
    """

    round: int
    step: int  # 0 = choosing the first block
    max_steps: int  # the configured depth
    scores: np.ndarray  # [clients, candidates] float32; NaN where a client could not score a candidate
    proxies: np.ndarray  # [clients, candidates] float32 nearest-class-mean accuracy with each candidate
    num_samples: np.ndarray  # [clients] int64
    meta: np.ndarray  # [clients, len(META_COLUMNS)] float32
    clients: np.ndarray  # [clients] int64 client ids
    candidates: tuple[str, ...]  # block names


class ClientWeighting(Protocol):
    """Decides the clients' weights for a step and hears the reward of the block that was chosen."""

    def weights(self, obs: StepObservation) -> np.ndarray:
        """Non-negative weights, one per row of ``obs.scores`` (normalised by the caller)."""
        ...

    def reward(self, value: float, *, done: bool) -> None:
        """The reward of the last decision; ``done`` closes the episode (the run's stitching)."""
        ...


class DataSizeWeighting:
    """w_i = n_i: the "without RL" ablation (FedAvg-style weights)."""

    name = "data"

    def weights(self, obs: StepObservation) -> np.ndarray:
        return obs.num_samples.astype(np.float64)

    def reward(self, value: float, *, done: bool) -> None:
        del value, done


def client_meta(
    *, scores: np.ndarray, num_samples: np.ndarray, label_entropy: np.ndarray, prefix_proxy: np.ndarray
) -> np.ndarray:
    """The META_COLUMNS matrix for a step (see the column comments)."""
    n = len(num_samples)
    meta = np.zeros((n, len(META_COLUMNS)), dtype=np.float32)
    meta[:, 0] = np.log1p(num_samples)
    meta[:, 1] = label_entropy
    valid = np.isfinite(scores)
    meta[:, 2] = valid.mean(axis=1) if scores.shape[1] else 0.0
    meta[:, 3] = prefix_proxy
    mean = aggregate_scores(scores, num_samples.astype(np.float64))
    meta[:, 4] = [_spearman(scores[i], mean) for i in range(n)]
    return meta


def aggregate_scores(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """S_c = Σ_i w_i s_ic / Σ_i w_i over the clients that scored c (NaN where nobody did)."""
    valid = np.isfinite(scores)
    w = np.where(valid, np.asarray(weights, dtype=np.float64)[:, None], 0.0)
    total = w.sum(axis=0)
    summed = (np.where(valid, scores, 0.0) * w).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, summed / np.where(total > 0, total, 1.0), np.nan)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return 0.0
    ra = np.argsort(np.argsort(a[ok])).astype(np.float64)
    rb = np.argsort(np.argsort(b[ok])).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0
