"""The round plan: which clients train this round and which rank runs each."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from emulator import seeding


@dataclass(frozen=True)
class RoundPlan:
    """Broadcast (pickled, small) from rank 0 at the start of every round."""

    round: int
    clients: np.ndarray  # int64, sorted ascending: the clients that train this round
    ranks: np.ndarray  # int32, the rank that runs clients[i]
    sleep_s: np.ndarray | None = None  # throttle = "sleep": real seconds each client must take
    budget_bytes: np.ndarray | None = None  # each client's memory budget (the CUDA cap)
    info: Any = None  # the algorithm's control data for this round (small: it is pickled)
    state_size: int = 0  # float32 elements of the state broadcast after the plan

    def clients_of(self, rank: int) -> np.ndarray:
        return self.clients[self.ranks == rank]

    def positions_of(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.ranks == rank)

    def counts(self, size: int) -> np.ndarray:
        return np.bincount(self.ranks, minlength=size).astype(np.int64)


def sample_cohort(root_seed: int, round_: int, eligible: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct clients from ``eligible``, keyed by (seed, round) alone."""
    rng = seeding.rng(root_seed, seeding.STREAM_COHORT, round_)
    return np.sort(rng.choice(eligible, size=k, replace=False))


def assign_lpt(costs: np.ndarray, workers: list[int]) -> np.ndarray:
    """Greedy longest-processing-time: biggest job first, onto the least-loaded worker.

    Ties break on job order, then on the lower rank, so the plan is deterministic.
    """
    order = np.lexsort((np.arange(len(costs)), -np.asarray(costs, dtype=np.float64)))
    heap = [(0.0, w) for w in workers]
    heapq.heapify(heap)
    ranks = np.empty(len(costs), dtype=np.int32)
    for job in order:
        load, worker = heapq.heappop(heap)
        ranks[job] = worker
        heapq.heappush(heap, (load + float(costs[job]), worker))
    return ranks


def worker_ranks(size: int) -> list[int]:
    """Rank 0 is the server; it also runs clients only when it is alone."""
    return [0] if size == 1 else list(range(1, size))
