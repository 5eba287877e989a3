"""FedAvg (McMahan et al. 2017): local SGD epochs, sample-weighted averaging."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emulator.algorithms.base import Algorithm, ClientResult, ClientTask, WorkEstimate
from emulator.algorithms.registry import register_algorithm
from emulator.records import STATUS_OK


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        train = self.cfg.train
        return self.estimate_training(
            num_samples=num_samples, epochs=train.local_epochs, batch_size=train.batch_size
        )

    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        train = self.cfg.train
        self.flat.set(global_params)
        self.model.train()
        torch.manual_seed(task.torch_seed)  # dropout, drop-path: keyed by (round, client)
        opt = torch.optim.SGD(
            self.model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        steps = 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(train.local_epochs):
            order = task.rng.permutation(task.indices)
            for start in range(0, len(order), train.batch_size):
                x, y = self.batches(order[start : start + train.batch_size])
                loss = F.cross_entropy(self.model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()  # no .item(): avoids a sync per step on GPUs
                steps += 1
        return ClientResult(
            params=self.flat.get(),
            weight=float(len(task.indices)),
            steps=steps,
            train_loss=float(loss_sum) / max(steps, 1),
            status=STATUS_OK,
        )
