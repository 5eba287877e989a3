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
        """Local SGD over the client's samples: FLOPs counted and memory measured once per batch size.

        FLOPs scale linearly with the batch (true of convolutions, matmuls and elementwise ops), so
        one counted step gives every client's total; memory is measured for each batch size used.
        """
        sample_shape = tuple(self.batches.x.shape[1:])
        device = next(self.model.parameters()).device
        if self._flops is None:
            self._flops = FlopCache(self.model, sample_shape=sample_shape, num_classes=self.num_classes)
            train = self.cfg.train
            self._memory = MemoryCache(
                self.model, sample_shape=sample_shape, num_classes=self.num_classes, device=device,
                optimizer_factor=optimizer_state_factor("sgd", train.momentum),
            )
        assert self._memory is not None
        per_sample = self._flops.training_step(batch_size) / batch_size
        n = np.asarray(num_samples, dtype=np.int64)
        batches = np.minimum(n, batch_size)
        peak_by_batch = {int(b): self._memory.training(int(b)).total_bytes for b in np.unique(batches) if b > 0}
        peak = np.array([peak_by_batch.get(int(b), 0) for b in batches], dtype=np.int64)
        return WorkEstimate(flops=epochs * n * per_sample, peak_bytes=peak)

    def client_update(self, *, global_params: np.ndarray, task: ClientTask) -> ClientResult:
        raise NotImplementedError

    def aggregate(self, *, global_params: np.ndarray, update_sum: np.ndarray, weight_sum: float) -> np.ndarray:
        """New global state from Σ weight·params (float64) and Σ weight over ok clients."""
        if weight_sum <= 0:
            return global_params  # nobody finished: keep the model
        return (update_sum / weight_sum).astype(np.float32)
