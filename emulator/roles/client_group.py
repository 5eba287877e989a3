"""A client-group worker: runs the clients the plan gives its rank, one after another."""

from __future__ import annotations

import time

import numpy as np

from emulator import seeding
from emulator.algorithms import Algorithm, ClientTask
from emulator.data import ClientShards
from emulator.records import CLIENT_ROUND_DTYPE, STATUS_OK
from emulator.roles.plan import RoundPlan


class ClientGroup:
    def __init__(self, *, rank: int, seed: int, algorithm: Algorithm, shards: ClientShards) -> None:
        self.rank = rank
        self.seed = seed
        self.algorithm = algorithm
        self.shards = shards
        size = algorithm.flat.size
        # Σ weight·params in float64, with Σ weight in the last slot: one Reduce carries both.
        self.accumulator = np.zeros(size + 1, dtype=np.float64)
        self._scratch = np.empty(size, dtype=np.float64)

    def run(self, plan: RoundPlan, global_params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(accumulator, per-client records) for this rank's clients of the round."""
        acc = self.accumulator
        acc.fill(0.0)
        mine = plan.clients_of(self.rank)
        records = np.zeros(len(mine), dtype=CLIENT_ROUND_DTYPE)
        payload = self.algorithm.flat.nbytes
        for i, client in enumerate(mine):
            client = int(client)
            task = ClientTask(
                round=plan.round,
                client=client,
                indices=self.shards.shard(client),
                rng=seeding.rng(self.seed, seeding.STREAM_CLIENT, plan.round, client),
                torch_seed=seeding.torch_seed(self.seed, seeding.STREAM_CLIENT, plan.round, client),
            )
            start = time.perf_counter()
            result = self.algorithm.client_update(global_params=global_params, task=task)
            if result.status == STATUS_OK:
                np.multiply(result.params, result.weight, out=self._scratch)
                acc[:-1] += self._scratch
                acc[-1] += result.weight
            rec = records[i]
            rec["round"] = plan.round
            rec["client"] = client
            rec["rank"] = self.rank
            rec["num_samples"] = len(task.indices)
            rec["steps"] = result.steps
            rec["status"] = result.status
            rec["train_loss"] = result.train_loss
            rec["wall_time_s"] = time.perf_counter() - start
            rec["bytes_down"] = payload
            rec["bytes_up"] = payload if result.status == STATUS_OK else 0
        return acc, records
