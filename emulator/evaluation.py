"""Held-out evaluation of the global model on rank 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emulator.batches import BatchMaker


def evaluate(model: nn.Module, batches: BatchMaker, batch_size: int) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) over every sample of ``batches``."""
    model.eval()
    correct = 0
    loss_sum = 0.0
    n = 0
    with torch.inference_mode():
        for idx in batches.slices(batch_size):
            x, y = batches(idx)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(idx)
    return correct / max(n, 1), loss_sum / max(n, 1)
