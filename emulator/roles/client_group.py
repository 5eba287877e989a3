"""A client-group worker: runs the clients the plan gives its rank, one after another."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from emulator import seeding
from emulator.algorithms import Algorithm, ClientTask
from emulator.data import ClientShards
from emulator.devices.memory import CudaMemoryCap
from emulator.devices.nvml import Meter
from emulator.records import CLIENT_ROUND_DTYPE, STATUS_OK, STATUS_OOM
from emulator.roles.plan import RoundPlan


class ClientGroup:
    def __init__(
        self, *, rank: int, seed: int, algorithm: Algorithm, shards: ClientShards, meter: Meter,
        device: torch.device,
    ) -> None:
        self.rank = rank
        self.seed = seed
        self.algorithm = algorithm
        self.shards = shards
        self.meter = meter
        self.device = device
        # FedAvg: Σ weight·params in float64, with Σ weight in the last slot, so one Reduce carries
        # both. Kept across rounds (reallocated only when the algorithm's size changes).
        self.accumulator = np.zeros(0, dtype=np.float64)
        self._scratch = np.zeros(0, dtype=np.float64)

    def buffer(self, size: int) -> np.ndarray:
        """The rank's zeroed accumulator of ``size`` float64 (also what a rank with no clients sends)."""
        if self.accumulator.size != size:
            self.accumulator = np.zeros(size, dtype=np.float64)
            self._scratch = np.empty(size, dtype=np.float64)
        else:
            self.accumulator.fill(0.0)
        return self.accumulator

    def run(self, plan: RoundPlan, global_params: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(accumulator, per-client records, per-client extras) for this rank's clients of the round."""
        acc = self.buffer(self.algorithm.accumulator_size(plan.info))
        extras: list[np.ndarray] = []
        positions = plan.positions_of(self.rank)
        records = np.zeros(len(positions), dtype=CLIENT_ROUND_DTYPE)
        cuda = self.device.type == "cuda"
        for i, pos in enumerate(positions.tolist()):
            client = int(plan.clients[pos])
            task = ClientTask(
                round=plan.round,
                client=client,
                indices=self.shards.shard(client),
                rng=seeding.rng(self.seed, seeding.STREAM_CLIENT, plan.round, client),
                torch_seed=seeding.torch_seed(self.seed, seeding.STREAM_CLIENT, plan.round, client),
            )
            rec = records[i]
            rec["client"] = client
            rec["rank"] = self.rank
            rec["cuda_peak_bytes"] = -1
            start = time.perf_counter()
            cap = (
                CudaMemoryCap(int(plan.budget_bytes[pos]), self.device)
                if cuda and plan.budget_bytes is not None else contextlib.nullcontext()
            )
            with self.meter.window() as window:
                try:
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(self.device)
                    budget = int(plan.budget_bytes[pos]) if plan.budget_bytes is not None else 0
                    with cap:
                        result = self.algorithm.client_update(
                            global_params=global_params, task=task, info=plan.info, budget_bytes=budget
                        )
                    status, steps, loss = result.status, result.steps, result.train_loss
                except torch.cuda.OutOfMemoryError:
                    # The allocator's hard cap: the client did not fit after all. Not a crash.
                    status, steps, loss = STATUS_OOM, 0, float("nan")
                if cuda:
                    torch.cuda.synchronize(self.device)
                    rec["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
                if plan.sleep_s is not None:
                    # Throttle: stretch this client's real time to its emulated time / dilation.
                    remaining = float(plan.sleep_s[pos]) - (time.perf_counter() - start)
                    if remaining > 0:
                        time.sleep(remaining)
            ok = status == STATUS_OK
            if ok:
                self.algorithm.accumulate(acc, result, self._scratch)
            extra = result.extra if ok and result.extra is not None else None
            extras.append(np.zeros(0, np.float32) if extra is None else np.asarray(extra, dtype=np.float32))
            rec["steps"] = steps
            rec["status"] = status
            rec["train_loss"] = loss
            rec["wall_time_s"] = time.perf_counter() - start
            rec["energy_measured_j"] = window.energy_j
            rec["meter_short"] = window.flag_short
        return acc, records, extras
