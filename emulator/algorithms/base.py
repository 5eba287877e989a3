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
from emulator.flat import FlatModel


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round, with its own random streams."""

    round: int
    client: int
    indices: np.ndarray  # the client's shard: indices into the shared training arrays
    rng: np.random.Generator
    torch_seed: int


@dataclass
class ClientResult:
    params: np.ndarray  # the client's new flat state (float32)
    weight: float  # aggregation weight, e.g. its sample count
    steps: int
    train_loss: float
    status: int


class Algorithm:
    """Base class of registered algorithms; one instance per rank, reused across rounds."""

    def __init__(self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker) -> None:
        self.cfg = cfg
        self.model = model
        self.flat = flat
        self.batches = batches

    def client_update(self, *, global_params: np.ndarray, task: ClientTask) -> ClientResult:
        raise NotImplementedError

    def aggregate(self, *, global_params: np.ndarray, update_sum: np.ndarray, weight_sum: float) -> np.ndarray:
        """New global state from Σ weight·params (float64) and Σ weight over ok clients."""
        if weight_sum <= 0:
            return global_params  # nobody finished: keep the model
        return (update_sum / weight_sum).astype(np.float32)
