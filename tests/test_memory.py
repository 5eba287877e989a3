"""Measured training memory against an analytic count, and measuring leaves the model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emulator.devices import memory
from emulator.devices.memory import (
    CudaMemoryCap,
    MemoryCache,
    MemoryEstimate,
    measure_inference_memory,
    measure_training_memory,
    optimizer_state_factor,
)

F32 = 4
I64 = 8


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch(shape: tuple[int, ...], classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=g), torch.randint(classes, (shape[0],), generator=g)


def within(measured: int, analytic: int, rel: float = 0.10) -> bool:
    return abs(measured - analytic) <= rel * analytic


# What autograd saves, op by op (each storage once: a tensor saved by two ops is one tensor):
#   Linear (addmm)        its input (and the weight: a parameter, not an activation)
#   ReLU                  its output (which is also the next Linear/Conv/MaxPool's input: shared)
#   Conv2d                its input (and the weight)
#   MaxPool2d             its input (the ReLU output before it: shared) + the argmax indices, int64
#   Flatten               nothing (a view of the ReLU output the Linear saves)
#   cross_entropy         log_softmax saves its output (B x C); nll_loss saves the int64 target and a scalar
#                         total_weight (4 bytes)
# Model state: params 4 bytes each; SGD with momentum: grads = momentum = params (all trainable).


def test_mlp_matches_analytic_count() -> None:
    model = mlp()
    b = 32
    x, y = batch((b, 20))
    est = measure_training_memory(model, x, y, optimizer_factor=1)

    params = (20 * 64 + 64) + (64 * 32 + 32) + (32 * 10 + 10)
    assert params == n_params(model) == 3754
    activations = (
        b * 20 * F32  # Linear 1 input = the batch
        + b * 64 * F32  # ReLU 1 output = Linear 2 input
        + b * 32 * F32  # ReLU 2 output = Linear 3 input
        + b * 10 * F32  # log_softmax output
        + b * I64  # nll_loss target
        + F32  # nll_loss total_weight
    )
    analytic_total = 3 * params * F32 + activations
    assert (activations, analytic_total) == (16388, 61436)

    assert est.params_bytes == est.grads_bytes == est.optimizer_bytes == params * F32
    assert within(est.activations_bytes, activations), (est.activations_bytes, activations)
    assert within(est.total_bytes, analytic_total), (est.total_bytes, analytic_total)
    assert est.buffers_bytes == 0
    assert est.cuda_peak_bytes is None


def test_cnn_matches_analytic_count() -> None:
    model = cnn()
    b = 16
    x, y = batch((b, 3, 16, 16))
    est = measure_training_memory(model, x, y, optimizer_factor=1)

    params = (8 * 3 * 9 + 8) + (16 * 8 * 9 + 16) + (16 * 8 * 8 * 10 + 10)
    assert params == n_params(model) == 11642
    activations = (
        b * 3 * 16 * 16 * F32  # Conv 1 input = the batch
        + b * 8 * 16 * 16 * F32  # ReLU 1 output = MaxPool input
        + b * 8 * 8 * 8 * I64  # MaxPool indices
        + b * 8 * 8 * 8 * F32  # MaxPool output = Conv 2 input
        + b * 16 * 8 * 8 * F32  # ReLU 2 output = (flattened) Linear input
        + b * 10 * F32  # log_softmax output
        + b * I64  # nll_loss target
        + F32  # nll_loss total_weight
    )
    analytic_total = 3 * params * F32 + activations
    assert (activations, analytic_total) == (344836, 484540)

    assert est.params_bytes == est.grads_bytes == est.optimizer_bytes == params * F32
    assert within(est.activations_bytes, activations), (est.activations_bytes, activations)
    assert within(est.total_bytes, analytic_total), (est.total_bytes, analytic_total)


def test_inference_peak_of_the_mlp() -> None:
    # Live at once, at the first ReLU: the batch, Linear 1's output and ReLU 1's output (the Linear output
    # dies only when ReLU has returned). Later layers are narrower.
    x, _ = batch((32, 20))
    est = measure_inference_memory(mlp(), x)
    assert est.activations_bytes == 32 * 20 * F32 + 2 * 32 * 64 * F32
    assert est.grads_bytes == est.optimizer_bytes == 0
    assert est.params_bytes == 3754 * F32


def test_inference_counts_skip_connections() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return h + self.b(torch.relu(h))

    x = torch.randn(8, 16)
    est = measure_inference_memory(Skip(), x)
    row = 8 * 16 * F32
    # Peak of 4 rows, twice: while b runs (x, h kept for the skip, relu(h), b's output) and at the add
    # (x, h, b's output, the sum; relu(h) is gone). A per-layer input+output estimate would see 2-3.
    assert est.activations_bytes == 4 * row


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor], grads: dict[str, object]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    for name, p in model.named_parameters():
        assert p.grad is grads[name], name  # the very same tensor object (or None)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.grad for n, p in model.named_parameters()})


def test_measuring_leaves_parameters_grads_buffers_modes_and_rng_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x, y = batch((12, 8), classes=3)
    F.cross_entropy(model(x), y).backward()  # grads exist before measuring
    grads_values = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.eval()
    model[1].train()  # a mixed mode must survive
    state, grads = snapshot(model)
    rng = torch.get_rng_state()

    est = measure_training_memory(model, x, y, optimizer_factor=2)
    inf = measure_inference_memory(model, x)

    assert_same_state(model, state, grads)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_values[n])
    assert [m.training for m in model.modules()] == [False, False, True, False, False, False]
    assert torch.equal(torch.get_rng_state(), rng)
    assert est.buffers_bytes == inf.buffers_bytes == (16 + 16) * F32 + I64  # running mean/var + counter
    assert est.optimizer_bytes == 2 * est.grads_bytes


def test_frozen_parameters_count_in_params_only() -> None:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = batch((32, 20))
    est = measure_training_memory(model, x, y, optimizer_factor=1)
    frozen = (20 * 64 + 64) * F32
    assert est.params_bytes == 3754 * F32
    assert est.grads_bytes == 3754 * F32 - frozen
    assert est.optimizer_bytes == est.grads_bytes
    assert all(p.grad is None for p in model.parameters())


def test_fully_frozen_model_saves_nothing() -> None:
    model = mlp().requires_grad_(False)
    x, y = batch((32, 20))
    est = measure_training_memory(model, x, y, optimizer_factor=1)
    assert (est.grads_bytes, est.optimizer_bytes, est.activations_bytes) == (0, 0, 0)
    assert est.params_bytes == 3754 * F32


def test_lazy_model_is_measured_on_a_copy() -> None:
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 10))
    x, y = batch((4, 1, 8, 8))
    est = measure_training_memory(model, x, y, optimizer_factor=0)
    assert est.params_bytes == (64 * 32 + 32 + 32 * 10 + 10) * F32
    assert est.optimizer_bytes == 0
    assert isinstance(model[1], nn.LazyLinear)  # still uninitialised


def test_estimates_grow_with_batch_size_and_are_cached() -> None:
    model = cnn()
    cache = MemoryCache(model, sample_shape=(3, 16, 16), num_classes=10, optimizer_factor=1)
    small, big = cache.training(4), cache.training(32)
    assert small.activations_bytes < big.activations_bytes
    assert small.total_bytes < big.total_bytes
    assert small.params_bytes == big.params_bytes
    assert cache.measurements == 2
    assert cache.training(4) is small
    assert cache.training(32) is big
    assert cache.measurements == 2
    assert cache.inference(4) is cache.inference(4)
    assert cache.inference(4).activations_bytes < cache.inference(32).activations_bytes


def test_cache_measures_again_when_the_trainable_set_changes() -> None:
    model = mlp()
    cache = MemoryCache(model, sample_shape=(20,), num_classes=10, optimizer_factor=1)
    full = cache.training(8)
    model[0].requires_grad_(False)
    partial = cache.training(8)
    assert partial is not full
    assert partial.grads_bytes < full.grads_bytes
    assert cache.measurements == 2


def test_optimizer_state_factor() -> None:
    assert optimizer_state_factor("sgd", 0.0) == 0
    assert optimizer_state_factor("sgd", 0.9) == 1
    assert optimizer_state_factor("adam", 0.0) == 2
    assert optimizer_state_factor("AdamW", 0.9) == 2
    with pytest.raises(ValueError, match="rmsprop"):
        optimizer_state_factor("rmsprop", 0.0)


def test_total_bytes_adds_every_part() -> None:
    est = MemoryEstimate(params_bytes=1, grads_bytes=2, optimizer_bytes=4, activations_bytes=8, buffers_bytes=16)
    assert est.total_bytes == 31


def test_cuda_cap_is_a_no_op_on_cpu() -> None:
    with CudaMemoryCap(1000, "cpu") as cap:
        assert cap.fraction is None


class FakeCuda:
    """Stands in for torch.cuda's memory-fraction calls, to check the cap's set/restore logic on a CPU."""

    def __init__(self, total: int, previous: float) -> None:
        self.total = total
        self.fraction = previous
        self.calls: list[tuple[float, int]] = []

    def get_device_properties(self, index: int) -> object:
        return type("Props", (), {"total_memory": self.total})()

    def get_per_process_memory_fraction(self, index: int) -> float:
        return self.fraction

    def set_per_process_memory_fraction(self, fraction: float, index: int) -> None:
        assert isinstance(fraction, float)
        self.calls.append((fraction, index))
        self.fraction = fraction


@pytest.mark.parametrize(("budget", "expected"), [(250, 0.25), (5000, 1.0), (0, 0.0)])
def test_cuda_cap_sets_and_restores_the_fraction(monkeypatch: pytest.MonkeyPatch, budget: int, expected: float) -> None:
    fake = FakeCuda(total=1000, previous=0.7)
    for name in ("get_device_properties", "get_per_process_memory_fraction", "set_per_process_memory_fraction"):
        monkeypatch.setattr(memory.torch.cuda, name, getattr(fake, name))
    with CudaMemoryCap(budget, "cuda:1") as cap:
        assert cap.fraction == expected
        assert fake.fraction == expected
    assert fake.calls == [(expected, 1), (0.7, 1)]
    assert fake.fraction == 0.7


@pytest.mark.gpu
def test_cuda_peak_is_reported_on_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = cnn().cuda()
    x, y = (t.cuda() for t in batch((16, 3, 16, 16)))
    est = measure_training_memory(model, x, y, optimizer_factor=1)
    assert est.cuda_peak_bytes is not None
    # the allocator sees the saved tensors, the grads and backward's transients, rounded up to blocks
    assert est.cuda_peak_bytes >= 0.9 * est.total_bytes
