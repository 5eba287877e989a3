"""A model's state as one flat float32 vector: what travels by ``Bcast`` and ``Reduce``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TensorVector:
    """A list of tensors viewed as one flat float32 vector (what travels by ``Bcast`` and ``Reduce``)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.sizes = [t.numel() for t in self.tensors]
        self.size = int(sum(self.sizes))
        self.nbytes = self.size * 4

    def get(self, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            out = np.empty(self.size, dtype=np.float32)
        target = torch.from_numpy(out)
        offset = 0
        with torch.no_grad():
            for t, n in zip(self.tensors, self.sizes, strict=True):
                target[offset : offset + n].copy_(t.detach().reshape(-1))
                offset += n
        return out

    def set(self, flat: np.ndarray) -> None:
        if flat.shape != (self.size,):
            raise ValueError(f"flat state has shape {flat.shape}, the tensors need ({self.size},)")
        source = torch.from_numpy(np.asarray(flat, dtype=np.float32))
        offset = 0
        with torch.no_grad():
            for t, n in zip(self.tensors, self.sizes, strict=True):
                t.copy_(source[offset : offset + n].view_as(t))
                offset += n


class FlatModel(TensorVector):
    """Views a model's parameters and floating-point buffers as one float32 vector.

    Buffers such as BatchNorm running statistics are part of the model's state and are
    averaged with the weights (as FedAvg does); integer buffers (``num_batches_tracked``)
    stay local because averaging a counter means nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__([t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()])
