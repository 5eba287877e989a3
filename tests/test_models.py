"""Models: the tiny registry, timm by name, and timm's pre-trained path from a local file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emulator.errors import UserError
from emulator.flat import FlatModel
from emulator.models import create_model


def test_tiny_cnn_any_size_and_channels() -> None:
    for size, chans in ((8, 1), (32, 3)):
        model = create_model("tiny_cnn", num_classes=7, in_chans=chans, image_size=size)
        assert model(torch.zeros(2, chans, size, size)).shape == (2, 7)


def test_timm_model_by_name_takes_classes_and_channels_from_the_data() -> None:
    model = create_model("resnet18", num_classes=5, in_chans=1, image_size=32)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_timm_pretrained_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model("resnet18", num_classes=1000, in_chans=3, image_size=32)
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    torch.manual_seed(2)  # a different init: only loading can make the backbones equal
    model = create_model("resnet18", num_classes=4, in_chans=3, image_size=32, pretrained=True,
                         checkpoint=str(weights))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.out_features == 4  # timm replaced the 1000-class head


def test_pretrained_without_a_local_file_is_a_clear_error() -> None:
    with pytest.raises(UserError, match=r"set model\.checkpoint to a local weights file"):
        create_model("resnet18", num_classes=4, in_chans=3, image_size=32, pretrained=True)
    with pytest.raises(UserError, match="no pre-trained weights"):
        create_model("tiny_cnn", num_classes=4, in_chans=3, image_size=32, pretrained=True)


def test_flat_model_round_trip_includes_float_buffers() -> None:
    model = create_model("resnet18", num_classes=3, in_chans=3, image_size=32)
    flat = FlatModel(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert flat.size > n_params  # BatchNorm running statistics travel too
    vec = np.random.default_rng(0).standard_normal(flat.size).astype(np.float32)
    flat.set(vec)
    assert np.array_equal(flat.get(), vec)
    with pytest.raises(ValueError, match="flat state has shape"):
        flat.set(vec[:-1])
