"""FLOP counts as FlopCounterMode reports them, derived by hand; caching; the model is left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emulator.devices import flops
from emulator.devices.flops import UPDATE_FLOPS_PER_PARAM, FlopCache

# FlopCounterMode counts 2 FLOPs per multiply-add of matmuls and convolutions only (bias adds, ReLU,
# pooling, the loss: 0). Backward of y = x W^T + b: dW = dy^T x (one matmul the size of forward) and,
# only when x needs a gradient, dx = dy W (another). The network's first layer gets the batch, which needs
# no gradient, so its backward costs 1x its forward; every later layer costs 2x.


def conv_flops(b: int, c_in: int, c_out: int, h: int, w: int, k: int) -> int:
    return 2 * b * c_out * h * w * c_in * k * k


def test_single_linear() -> None:
    model = nn.Linear(100, 10)
    cache = FlopCache(model, sample_shape=(100,), num_classes=10)
    b = 8
    forward = 2 * b * 100 * 10
    assert cache.forward(b) == forward == 16000
    # backward: the weight gradient only (the input is the batch): 1x forward; update: 2 per parameter
    update = UPDATE_FLOPS_PER_PARAM * (100 * 10 + 10)
    assert cache.update_flops(b) == update == 2020
    assert cache.training_step(b) == 2 * forward + update == 34020


def test_two_linears_backward_is_twice_forward_after_the_first_layer() -> None:
    model = nn.Sequential(nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 5))
    cache = FlopCache(model, sample_shape=(100,), num_classes=5)
    b = 8
    first, second = 2 * b * 100 * 10, 2 * b * 10 * 5
    assert cache.forward(b) == first + second
    step = (first + second) + (first + 2 * second)
    assert step == 3 * cache.forward(b) - first
    assert cache.training_step(b) == step + cache.update_flops(b)


def test_conv_net_training_is_three_forwards_minus_the_first_layers_input_grad() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    b = 16
    conv1 = conv_flops(b, 3, 8, 16, 16, 3)
    conv2 = conv_flops(b, 8, 16, 8, 8, 3)
    linear = 2 * b * 1024 * 10
    cache = FlopCache(model, sample_shape=(3, 16, 16), num_classes=10)
    assert cache.forward(b) == conv1 + conv2 + linear == 4456448
    n_params = sum(p.numel() for p in model.parameters())
    assert cache.update_flops(b) == 2 * n_params
    assert cache.training_step(b) - cache.update_flops(b) == 3 * cache.forward(b) - conv1 == 11599872


def test_frozen_first_block_saves_its_weight_grad_and_update() -> None:
    model = nn.Sequential(nn.Linear(100, 10), nn.ReLU(), nn.Linear(10, 5))
    model[0].requires_grad_(False)
    cache = FlopCache(model, sample_shape=(100,), num_classes=5)
    b = 8
    second = 2 * b * 10 * 5
    # no gradient flows into the frozen first layer: backward is the second layer's weight grad only
    assert cache.training_step(b) == (2 * b * 100 * 10 + second) + second + 2 * (10 * 5 + 5)


def test_counts_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"training": 0, "forward": 0}
    real_training, real_forward = flops.count_training_flops, flops.count_forward_flops

    def counting_training(*args, **kwargs):
        calls["training"] += 1
        return real_training(*args, **kwargs)

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(flops, "count_training_flops", counting_training)
    monkeypatch.setattr(flops, "count_forward_flops", counting_forward)
    cache = FlopCache(nn.Linear(10, 3), sample_shape=(10,), num_classes=3, reference_batch=4)
    first = cache.training_step(4)
    assert cache.training_step(4) == first
    assert cache.update_flops(4) == 2 * 33
    assert cache.per_sample_training == first / 4
    assert calls == {"training": 1, "forward": 0}
    cache.forward(4)
    cache.forward(4)
    assert cache.per_sample_forward == cache.forward(4) / 4
    assert calls == {"training": 1, "forward": 1}
    cache.training_step(8)
    assert calls == {"training": 2, "forward": 1}
    assert cache.counts == 3


def test_counting_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), torch.randint(3, (5,))
    F.cross_entropy(model(x), y).backward()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    cache = FlopCache(model, sample_shape=(6,), num_classes=3)
    assert cache.training_step(4) > cache.forward(4) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0]
        assert torch.equal(p.grad, grads[n][1])
    assert not any(m.training for m in model.modules())


def test_lazy_model_is_counted_without_materialising_it() -> None:
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    cache = FlopCache(model, sample_shape=(1, 4, 4), num_classes=4)
    assert cache.forward(2) == 2 * 2 * 16 * 16 + 2 * 2 * 16 * 4
    assert isinstance(model[1], nn.LazyLinear)
