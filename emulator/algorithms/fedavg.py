"""FedAvg (McMahan et al. 2017): local SGD epochs, sample-weighted averaging."""

from __future__ import annotations

from typing import Any

import numpy as np

from emulator.algorithms.base import Algorithm, ClientResult, ClientTask, WorkEstimate, local_sgd
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
        steps, loss = local_sgd(self.model, self.model.parameters(), task=task, batches=self.batches, train=train)
        return ClientResult(
            params=self.flat.get(),
            weight=float(len(task.indices)),
            steps=steps,
            train_loss=loss,
            status=STATUS_OK,
        )
