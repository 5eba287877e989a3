"""Turning index lists into normalised float batches, straight from the shared uint8 images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class BatchMaker:
    """Gathers samples by index and normalises them; the dataset itself is never copied."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> None:
        self.x = x
        self.y = y
        c = x.shape[1]
        # (x/255 - mean)/std as one multiply-add per element.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, c, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(
            1, c, 1, 1
        )

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xb = torch.from_numpy(self.x[idx]).float()
        xb.mul_(self._scale).add_(self._shift)
        return xb, torch.from_numpy(self.y[idx])

    def slices(self, batch_size: int) -> list[np.ndarray]:
        """Consecutive index blocks covering the whole array (for evaluation)."""
        n = len(self.y)
        return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
