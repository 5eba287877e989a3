"""ProFL's effective-movement metric and the rule that freezes a block.

Effective movement (EM) of a block over the last ``W`` updates of its global parameters
(Δθ_r = θ_r - θ_{r-1}, one per round that aggregated an update):

- ``metric = "block"``:  EM = ‖Σ_{last W} Δθ_r‖₁ / Σ_{last W} ‖Δθ_r‖₁, the block's parameters as one vector.
  Σ Δθ_r telescopes to θ_now - θ_{W updates ago}, so only W + 1 snapshots are kept.
- ``metric = "layer_mean"``: the same ratio per parameter tensor, then the plain mean over tensors.

EM is 1 when every update points the same way and near 0 when the updates cancel out (a block that
oscillates around a point has stopped learning). No movement at all (0 / 0) counts as EM = 0.
Rounds in which no client finished move nothing and are not updates: they neither count towards W
nor reset the patience counter.

Freezing rule (:class:`FreezeRule`), checked after every round of a block: freeze when, with at least W
updates seen, EM < ``threshold`` for ``patience`` consecutive checks and the block has had at least
``min_rounds`` rounds; freeze anyway after ``max_rounds`` rounds.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence

import numpy as np


def effective_movement(snapshots: Sequence[np.ndarray], *, offsets: Sequence[int] | None = None) -> float:
    """EM over consecutive parameter snapshots θ_0..θ_W (W = len - 1 updates).

    ``offsets``: start of each parameter tensor in the vectors, for the per-tensor mean ("layer_mean");
    None treats the vector as one block.
    """
    if len(snapshots) < 2:
        raise ValueError("effective movement needs at least two snapshots (one update)")
    stack = [np.asarray(s, dtype=np.float64) for s in snapshots]
    deltas = [np.abs(b - a) for a, b in itertools.pairwise(stack)]
    total = np.abs(stack[-1] - stack[0])
    if offsets is None:
        num = float(total.sum())
        den = float(sum(d.sum() for d in deltas))
        return num / den if den > 0 else 0.0
    starts = np.asarray(offsets, dtype=np.int64)
    num_t = np.add.reduceat(total, starts)
    den_t = np.sum([np.add.reduceat(d, starts) for d in deltas], axis=0)
    ratios = np.divide(num_t, den_t, out=np.zeros_like(num_t), where=den_t > 0)
    return float(ratios.mean())


class FreezeRule:
    """Tracks one block's global parameters round by round and says when to freeze it."""

    def __init__(
        self, *, window: int, threshold: float, patience: int, min_rounds: int, max_rounds: int,
        offsets: Sequence[int] | None = None,
    ) -> None:
        if window < 1 or patience < 1 or min_rounds < 0 or max_rounds < max(1, min_rounds):
            raise ValueError("window, patience >= 1 and 0 <= min_rounds <= max_rounds needed")
        self.window = window
        self.threshold = threshold
        self.patience = patience
        self.min_rounds = min_rounds
        self.max_rounds = max_rounds
        self.offsets = offsets
        self.rounds = 0  # rounds of this block, with or without an update
        self.updates = 0
        self.below = 0  # consecutive checks with EM < threshold
        self.em = math.nan  # the last computed value (NaN until W updates were seen)
        self._snapshots: deque[np.ndarray] = deque(maxlen=window + 1)

    def start(self, params: np.ndarray) -> None:
        """The block's parameters when it becomes active."""
        self._snapshots.clear()
        self._snapshots.append(np.array(params, dtype=np.float32, copy=True))

    def observe(self, params: np.ndarray | None) -> bool:
        """After a round: the block's new global parameters (None: no client finished). True = freeze now."""
        if not self._snapshots:
            raise RuntimeError("FreezeRule.start must be called before observe")
        self.rounds += 1
        if params is not None:
            self.updates += 1
            self._snapshots.append(np.array(params, dtype=np.float32, copy=True))
            if self.updates >= self.window:
                self.em = effective_movement(list(self._snapshots), offsets=self.offsets)
                self.below = self.below + 1 if self.em < self.threshold else 0
        if self.rounds >= self.max_rounds:
            return True
        return self.rounds >= self.min_rounds and self.below >= self.patience


__all__ = ["FreezeRule", "effective_movement"]
