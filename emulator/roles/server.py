"""The server (rank 0): plans rounds, aggregates, evaluates, writes the trace."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from emulator.algorithms import Algorithm
from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.evaluation import evaluate
from emulator.progress import RoundProgress
from emulator.records import ROUND_DTYPE, STATUS_OK
from emulator.roles.plan import RoundPlan, assign_lpt, sample_cohort, worker_ranks
from emulator.trace import TraceWriter


@dataclass
class RunSummary:
    """What the CLI prints at the end; the trace holds the full record."""

    trace_path: str
    rounds: np.ndarray  # ROUND_DTYPE rows
    wall_time_s: float
    trace_write_s: float
    ranks: int
    extra: dict = field(default_factory=dict)


class Server:
    def __init__(
        self,
        *,
        cfg: Config,
        size: int,
        algorithm: Algorithm,
        model: nn.Module,
        test_batches: BatchMaker,
        client_sizes: np.ndarray,
        trace: TraceWriter,
        progress: RoundProgress,
    ) -> None:
        self.cfg = cfg
        self.size = size
        self.algorithm = algorithm
        self.model = model
        self.test_batches = test_batches
        self.client_sizes = client_sizes
        # Clients with no data cannot train; they are never sampled.
        self.eligible = np.flatnonzero(client_sizes > 0)
        self.workers = worker_ranks(size)
        self.trace = trace
        self.progress = progress
        self.rows: list[np.ndarray] = []
        self._round_start = 0.0

    def plan(self, round_: int) -> RoundPlan:
        self._round_start = time.perf_counter()
        k = min(self.cfg.clients_per_round, len(self.eligible))
        clients = sample_cohort(self.cfg.seed, round_, self.eligible, k)
        # Estimated cost: local sample passes. Later issues scale it by device speed.
        costs = self.client_sizes[clients].astype(np.float64) * self.cfg.train.local_epochs
        return RoundPlan(round=round_, clients=clients, ranks=assign_lpt(costs, self.workers))

    def finish_round(self, plan: RoundPlan, global_params: np.ndarray, summed: np.ndarray,
                     records: np.ndarray) -> np.ndarray:
        """Aggregate, evaluate, append the round to the trace; returns the new global state."""
        cfg = self.cfg
        new_params = self.algorithm.aggregate(
            global_params=global_params, update_sum=summed[:-1], weight_sum=float(summed[-1])
        )
        # Ranks return records in rank order; the trace keeps client order, for any rank count.
        records = records[np.argsort(records["client"], kind="stable")]
        ok = records["status"] == STATUS_OK
        n_ok = records["num_samples"][ok].astype(np.float64)
        train_loss = float(np.dot(records["train_loss"][ok], n_ok) / n_ok.sum()) if n_ok.sum() else math.nan

        r = plan.round
        acc = loss = math.nan
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
            self.algorithm.flat.set(new_params)
            acc, loss = evaluate(self.model, self.test_batches, cfg.runtime.eval_batch_size)

        row = np.zeros(1, dtype=ROUND_DTYPE)
        row["round"] = r
        row["cohort_size"] = len(plan.clients)
        row["num_ok"] = int(ok.sum())
        row["train_loss"] = train_loss
        row["test_accuracy"] = acc
        row["test_loss"] = loss
        row["bytes_down"] = int(records["bytes_down"].sum())
        row["bytes_up"] = int(records["bytes_up"].sum())
        row["wall_time_s"] = time.perf_counter() - self._round_start
        row["unix_time_s"] = time.time()
        self.trace.append_round(row, records)
        self.rows.append(row)
        self.progress.update(r, accuracy=acc, train_loss=train_loss, seconds=float(row["wall_time_s"][0]))
        return new_params

    def all_rounds(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=ROUND_DTYPE)
