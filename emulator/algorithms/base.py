"""The algorithm interface: what a client does in a round and how the server combines it.

Hooks take keyword-only arguments (pfl-research's Aggregator/Callback style) so new
arguments can be added without breaking registered algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.devices.flops import FlopCache
from emulator.devices.memory import MemoryCache, optimizer_state_factor
from emulator.flat import FlatModel


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round, with its own random streams."""

    round: int
    client: int
    indices: np.ndarray  # the client's shard: indices into the shared training arrays
    rng: np.random.Generator
    torch_seed: int


@dataclass(frozen=True)
class WorkEstimate:
    """Per client: FLOPs of its local work this round and the peak memory it needs."""

    flops: np.ndarray
    peak_bytes: np.ndarray


@dataclass
class ClientResult:
    params: np.ndarray  # the client's new flat state (float32)
    weight: float  # aggregation weight, e.g. its sample count
    steps: int
    train_loss: float
    status: int


class Algorithm:
    """Base class of registered algorithms; one instance per rank, reused across rounds."""

    def __init__(
        self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker, num_classes: int
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.flat = flat
        self.batches = batches
        self.num_classes = num_classes
        self._flops: FlopCache | None = None
        self._memory: MemoryCache | None = None

    def payload_bytes(self) -> int:
        """Bytes each way per client and round (the flat float32 state)."""
        return self.flat.nbytes

    def estimate_work(self, *, num_samples: np.ndarray) -> WorkEstimate:
        """What each client's local work costs, asked before the round ("does it fit?")."""
        raise NotImplementedError

    def estimate_training(self, *, num_samples: np.ndarray, epochs: int, batch_size: int) -> WorkEstimate:
        """Local SGD over the client's samples, from one counted and measured step at ``batch_size``.

        FLOPs and saved activations both scale linearly with the batch (true of convolutions,
        matmuls, normalisation and elementwise ops), so one step at the configured batch size gives
        every client's FLOPs and the peak of its largest batch, min(batch_size, its samples).
        ``tests/test_work_estimate.py`` checks the scaling against direct measurements.
        """
        if self._flops is None:
            sample_shape = tuple(self.batches.x.shape[1:])
            device = next(self.model.parameters()).device
            self._flops = FlopCache(self.model, sample_shape=sample_shape, num_classes=self.num_classes)
            self._memory = MemoryCache(
                self.model, sample_shape=sample_shape, num_classes=self.num_classes, device=device,
                optimizer_factor=optimizer_state_factor("sgd", self.cfg.train.momentum),
            )
        assert self._memory is not None
        update = self._flops.update_flops(batch_size)  # per step, whatever the batch
        per_sample = (self._flops.training_step(batch_size) - update) / batch_size
        step = self._memory.training(batch_size)
        n = np.asarray(num_samples, dtype=np.int64)
        steps = -(-n // batch_size)
        largest_batch = np.minimum(n, batch_size)
        state = step.total_bytes - step.activations_bytes
        peak = state + (step.activations_bytes * largest_batch) // batch_size
        return WorkEstimate(flops=epochs * (n * per_sample + steps * update), peak_bytes=peak)

    def client_update(self, *, global_params: np.ndarray, task: ClientTask) -> ClientResult:
        raise NotImplementedError

    def aggregate(self, *, global_params: np.ndarray, update_sum: np.ndarray, weight_sum: float) -> np.ndarray:
        """New global state from Σ weight·params (float64) and Σ weight over ok clients."""
        if weight_sum <= 0:
            return global_params  # nobody finished: keep the model
        return (update_sum / weight_sum).astype(np.float32)
