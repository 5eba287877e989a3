"""The server (rank 0): plans rounds, aggregates, evaluates, writes the trace."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from emulator import checkpoint
from emulator.algorithms import Algorithm
from emulator.algorithms.base import STOP
from emulator.batches import BatchMaker
from emulator.config import Config, to_toml
from emulator.devices.accounting import CohortCosts
from emulator.devices.planner import DevicePlanner
from emulator.progress import RoundProgress
from emulator.records import (
    CLIENT_ROUND_DTYPE,
    ROUND_DTYPE,
    STATUS_DROPPED,
    STATUS_LATE,
    STATUS_OK,
    STATUS_OOM,
    STATUS_UNAVAILABLE,
)
from emulator.roles.plan import RoundPlan, sample_cohort, worker_ranks
from emulator.trace import TraceWriter

# Fields the worker that ran a client measured; everything else comes from the plan.
MEASURED = ("rank", "steps", "status", "train_loss", "wall_time_s", "energy_measured_j", "meter_short",
            "cuda_peak_bytes")


@dataclass
class RunSummary:
    """What the CLI prints at the end; the trace holds the full record."""

    trace_path: str
    rounds: np.ndarray  # ROUND_DTYPE rows
    wall_time_s: float
    trace_write_s: float
    ranks: int
    stopped_by: str | None = None  # the signal that stopped the run at a round boundary (checkpointed)
    checkpoint_s: float = 0.0  # wall time spent writing checkpoints


@dataclass
class _Pending:
    """What rank 0 keeps about the round in flight."""

    cohort: np.ndarray
    costs: CohortCosts
    flops: np.ndarray
    peak_bytes: np.ndarray
    bytes_down: np.ndarray
    bytes_up: np.ndarray
    accounting_s: float


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Raise torch's intra-op threads to ``n`` inside the block (never lower them), then restore."""
    before = torch.get_num_threads()
    if n > before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > before:
            torch.set_num_threads(before)


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
        planner: DevicePlanner,
        trace: TraceWriter,
        progress: RoundProgress,
        eval_threads: int = 0,
    ) -> None:
        self.cfg = cfg
        self.eval_threads = eval_threads  # torch threads while evaluating (0: the rank's own)
        self.size = size
        self.algorithm = algorithm
        self.model = model
        self.test_batches = test_batches
        self.client_sizes = client_sizes
        # Clients with no data cannot train; they are never sampled.
        self.eligible = np.flatnonzero(client_sizes > 0)
        self.workers = worker_ranks(size)
        self.planner = planner
        self.trace = trace
        self.progress = progress
        self.rows: list[np.ndarray] = []
        self.emulated_time_s = 0.0
        self._round_start = 0.0
        self._pending: _Pending | None = None
        self.next_round = 0  # the first round this run executes (> 0 when resumed)
        self.current_round = -1
        self.last_checkpoint = -1  # the last round saved in a checkpoint
        self.checkpoint_s = 0.0
        self._resumes = 0

    # ---- checkpoints --------------------------------------------------------------------------------
    def checkpoint_due(self, round_: int) -> bool:
        every = self.cfg.checkpoint.every
        return every > 0 and (round_ + 1) % every == 0

    def checkpoint(self, round_: int, *, reason: str | None = None) -> None:
        """Save the state after ``round_`` (once; nothing before the first round or with every = 0)."""
        if round_ < 0 or round_ == self.last_checkpoint or self.cfg.checkpoint.every == 0:
            return
        t0 = time.perf_counter()
        arrays, meta = self.algorithm.state_dict()
        saved = {f"algorithm/{k}": np.asarray(v) for k, v in arrays.items()}
        saved["planner/correction"] = self.planner.correction
        doc = {
            "config": to_toml(self.cfg), "algorithm": self.cfg.algorithm, "algorithm_state": meta,
            "emulated_time_s": self.emulated_time_s, "trace_lengths": self.trace.lengths(),
            "resumes": self._resumes, "reason": reason or "round",
        }
        checkpoint.save(checkpoint.checkpoint_dir(self.trace.path), round=round_, arrays=saved, meta=doc,
                        keep=self.cfg.checkpoint.keep)
        self.last_checkpoint = round_
        self.checkpoint_s += time.perf_counter() - t0

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Continue after ``saved.round``: the rounds so far, the clock and the planner's state.

        The algorithm's own state was loaded before the trace was attached; every random draw is
        keyed by (round, client), so nothing else carries over.
        """
        self.rows = [row.reshape(1) for row in self.trace.read("rounds/table")]
        self.emulated_time_s = float(saved.meta["emulated_time_s"])
        self.planner.correction = np.array(saved.section("planner")["correction"], dtype=np.float64)
        self.next_round = saved.round + 1
        self.last_checkpoint = saved.round
        self._resumes = int(saved.meta.get("resumes", 0)) + 1
        self.progress.skip(self.next_round)

    def on_watchdog(self, round_: int, message: str) -> None:
        """The watchdog thread's last act on rank 0 before it aborts the job."""
        self.trace.event("watchdog", message, level="error", round=round_)
        self.trace.close()

    def plan(self, round_: int) -> RoundPlan | None:
        """Sample the cohort, cost it on its devices, and hand the clients that run to the ranks.

        None when the algorithm has finished before ``cfg.rounds``: every rank stops.
        """
        cfg = self.cfg
        self._round_start = time.perf_counter()
        self.current_round = round_
        info = self.algorithm.begin_round(round=round_)
        if isinstance(info, str) and info == STOP:
            return None
        pool = self.eligible
        mask = self.algorithm.eligible(round=round_, num_samples=self.client_sizes[pool],
                                       budget_bytes=self.planner.budget_bytes(pool))
        if mask is not None and mask.any():  # nobody fits: sample all, they are oom and the trace says so
            pool = pool[np.asarray(mask, dtype=bool)]
        keep = min(cfg.clients_per_round, len(pool))
        k = min(math.ceil(keep * cfg.overcommit), len(pool))
        cohort = sample_cohort(cfg.seed, round_, pool, k)
        t0 = time.perf_counter()
        self.algorithm.cohort = cohort
        work = self.algorithm.estimate_work(
            num_samples=self.client_sizes[cohort], budget_bytes=self.planner.budget_bytes(cohort)
        )
        payload = self.algorithm.payload_bytes()
        down = np.full(len(cohort), payload, np.int64) if work.bytes_down is None else work.bytes_down
        up = np.full(len(cohort), payload, np.int64) if work.bytes_up is None else work.bytes_up
        costs = self.planner.plan(
            round_, cohort, flops=work.flops, peak_bytes=work.peak_bytes, bytes_down=down, bytes_up=up, keep=keep,
        )
        self._pending = _Pending(
            cohort, costs, work.flops, work.peak_bytes, down, up, time.perf_counter() - t0
        )
        runs = costs.runs
        clients = cohort[runs]
        emulated = (costs.compute_s + costs.comm_s)[runs]
        sleep = cfg.devices.throttle == "sleep"
        # Balance real wall time: sample passes, or the stretched emulated time when sleeping.
        weights = emulated / cfg.devices.dilation if sleep else work.flops[runs]
        return RoundPlan(
            round=round_, clients=clients,
            ranks=self.algorithm.assign(clients=clients, costs=weights, workers=self.workers),
            sleep_s=(emulated / cfg.devices.dilation) if sleep else None,
            budget_bytes=costs.budget_bytes[runs], info=info,
            state_size=int(self.algorithm.broadcast_state().size),
        )

    def finish_round(
        self, plan: RoundPlan, summed: np.ndarray, measured: np.ndarray, extras: list[np.ndarray] | None = None
    ) -> None:
        """Aggregate (the algorithm's ``conclude_round``), evaluate, append the round to the trace.

        ``extras``: one vector per row of ``measured`` (the order the ranks sent them in).
        """
        cfg = self.cfg
        pending = self._pending
        assert pending is not None and pending.cohort.size >= plan.clients.size
        records = self._client_records(plan, pending, measured)
        # The algorithm sees the extras in cohort order, beside the cohort's records.
        cohort_extras = [np.zeros(0, np.float32) for _ in range(len(pending.cohort))]
        if extras is not None:
            where = np.searchsorted(pending.cohort, measured["client"])
            for i, vec in zip(where.tolist(), extras, strict=True):
                cohort_extras[i] = vec
        self.algorithm.conclude_round(round=plan.round, summed=summed, records=records, extras=cohort_extras)
        self.planner.feedback(pending.cohort, pending.costs)
        status = records["status"]
        ok = status == STATUS_OK
        n_ok = records["num_samples"][ok].astype(np.float64)
        train_loss = float(np.dot(records["train_loss"][ok], n_ok) / n_ok.sum()) if n_ok.sum() else math.nan

        r = plan.round
        acc = loss = math.nan
        if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds or self.algorithm.wants_evaluation():
            with torch_threads(self.eval_threads):
                acc, loss = self.algorithm.evaluate(
                    test_batches=self.test_batches, batch_size=cfg.runtime.eval_batch_size
                )

        costs = pending.costs
        self.emulated_time_s += costs.round_time_s
        measured_energy = records["energy_measured_j"]
        row = np.zeros(1, dtype=ROUND_DTYPE)
        row["round"] = r
        row["cohort_size"] = len(pending.cohort)
        row["num_ok"] = int(ok.sum())
        row["num_oom"] = int((status == STATUS_OOM).sum())
        row["num_late"] = int((status == STATUS_LATE).sum())
        row["num_dropped"] = int((status == STATUS_DROPPED).sum())
        row["num_unavailable"] = int((status == STATUS_UNAVAILABLE).sum())
        row["train_loss"] = train_loss
        row["test_accuracy"] = acc
        row["test_loss"] = loss
        row["bytes_down"] = int(records["bytes_down"].sum())
        row["bytes_up"] = int(records["bytes_up"].sum())
        row["target_time_s"] = costs.target_s
        row["round_time_s"] = costs.round_time_s
        row["emulated_time_s"] = self.emulated_time_s
        row["energy_j"] = float(records["energy_j"].sum())
        row["energy_measured_j"] = float(np.nansum(measured_energy)) if np.isfinite(measured_energy).any() else math.nan
        row["accounting_s"] = pending.accounting_s
        row["wall_time_s"] = time.perf_counter() - self._round_start
        row["unix_time_s"] = time.time()
        self.trace.append_round(row, records)
        self.rows.append(row)
        self.progress.update(r, accuracy=acc, train_loss=train_loss, seconds=float(row["wall_time_s"][0]))
        self._pending = None

    def _client_records(self, plan: RoundPlan, pending: _Pending, measured: np.ndarray) -> np.ndarray:
        """The whole cohort's rows: the plan's accounting, plus what the ranks measured."""
        cohort, costs = pending.cohort, pending.costs
        records = np.zeros(len(cohort), dtype=CLIENT_ROUND_DTYPE)
        records["round"] = plan.round
        records["client"] = cohort
        records["rank"] = -1  # not run by any rank
        records["num_samples"] = self.client_sizes[cohort]
        records["status"] = costs.status
        records["train_loss"] = math.nan
        records["device"] = self.planner.population.device[cohort]
        records["level"] = costs.level
        records["freq_mhz"] = costs.freq_mhz
        records["flops"] = np.where(costs.level >= 0, pending.flops, 0.0)
        records["compute_time_s"] = costs.compute_s
        records["comm_time_s"] = costs.comm_s
        records["wait_time_s"] = costs.wait_s
        records["energy_compute_j"] = costs.energy_compute_j
        records["energy_comm_j"] = costs.energy_comm_j
        records["energy_idle_j"] = costs.energy_idle_j
        records["energy_j"] = costs.energy_j
        records["energy_measured_j"] = math.nan
        records["peak_memory_bytes"] = pending.peak_bytes
        records["memory_budget_bytes"] = costs.budget_bytes
        records["cuda_peak_bytes"] = -1
        reached = costs.status != STATUS_UNAVAILABLE
        records["bytes_down"] = np.where(reached, pending.bytes_down, 0)
        records["bytes_up"] = np.where(costs.status == STATUS_OK, pending.bytes_up, 0)
        # Ranks answer in rank order; match their rows to the cohort by client id.
        measured = measured[np.argsort(measured["client"], kind="stable")]
        where = np.searchsorted(cohort, measured["client"])
        for name in MEASURED:
            records[name][where] = measured[name]
        failed = measured["status"] != STATUS_OK  # e.g. a real CUDA out-of-memory
        records["bytes_up"][where[failed]] = 0
        return records

    def all_rounds(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=ROUND_DTYPE)
