"""One counted and measured step per model gives every client's FLOPs and peak memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emulator.algorithms import create_algorithm
from emulator.batches import BatchMaker
from emulator.config import load_config
from emulator.devices.flops import FlopCache
from emulator.devices.memory import MemoryCache
from emulator.flat import FlatModel
from emulator.models import create_model


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_linear_scaling_matches_direct_counts_and_measurements(name: str) -> None:
    cfg = load_config(None, ["train.batch_size=16", "train.local_epochs=2", "train.momentum=0.9"])
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3, image_size=16)
    x = np.zeros((4, 3, 16, 16), dtype=np.uint8)
    batches = BatchMaker(x, np.zeros(4, dtype=np.int64), (0.5,) * 3, (0.25,) * 3)
    algo = create_algorithm("fedavg", cfg=cfg, model=model, flat=FlatModel(model), batches=batches, num_classes=5)
    sizes = np.array([3, 16, 21, 40])
    work = algo.estimate_work(num_samples=sizes)

    flops = FlopCache(model, sample_shape=(3, 16, 16), num_classes=5)
    memory = MemoryCache(model, sample_shape=(3, 16, 16), num_classes=5, optimizer_factor=1)
    for n, est_flops, est_peak in zip(sizes, work.flops, work.peak_bytes, strict=True):
        full, rest = divmod(int(n), 16)
        exact = 2 * (full * flops.training_step(16) + (flops.training_step(rest) if rest else 0))
        assert est_flops == pytest.approx(exact, rel=1e-9)
        measured = memory.training(min(int(n), 16)).total_bytes
        assert est_peak == pytest.approx(measured, rel=0.02)
