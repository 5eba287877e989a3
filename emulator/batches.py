"""Turning index lists into normalised float batches, straight from the shared uint8 images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class BatchMaker:
    """Gathers samples by index and normalises them; the dataset itself is never copied."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float],
        device: torch.device | str = "cpu",
    ) -> None:
        self.x = x
        self.y = y
        self.device = torch.device(device)
        shape = (1, x.shape[1], 1, 1)
        # (x/255 - mean)/std as one multiply-add per element.
        scale = [1.0 / (255.0 * s) for s in std]
        shift = [-m / s for m, s in zip(mean, std, strict=True)]
        self._scale = torch.tensor(scale, dtype=torch.float32, device=self.device).view(shape)
        self._shift = torch.tensor(shift, dtype=torch.float32, device=self.device).view(shape)

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xb = torch.from_numpy(self.x[idx])
        yb = torch.from_numpy(self.y[idx])
        if self.device.type != "cpu":
            # Ship uint8 (4x fewer bytes), normalise on the device.
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
        xb = xb.float().mul_(self._scale).add_(self._shift)
        return xb, yb

    def slices(self, batch_size: int) -> list[np.ndarray]:
        """Consecutive index blocks covering the whole array (for evaluation)."""
        n = len(self.y)
        return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
