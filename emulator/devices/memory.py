"""A client's peak memory for the work it actually does, measured rather than guessed.

Training memory = model state (parameters + buffers) + gradients + optimizer state + the tensors autograd
saves for backward during one real step. The saved tensors are seen through
:func:`torch.autograd.graph.saved_tensors_hooks` on any device; on CUDA the allocator's peak
(:func:`torch.cuda.max_memory_allocated`) is reported next to it. What is *not* counted: transient tensors
of the backward pass (gradients of activations, freed op by op) and allocator rounding/fragmentation; the
CUDA peak includes them, which is why both numbers are kept.

Measuring never changes the model: it runs forward (+ backward) on the model itself with its gradients
stashed, its buffers (BatchNorm statistics) cloned and written back, its train/eval flags restored and the
RNG forked (so a measurement does not shift the run's random stream). Parameters are not copied: forward
and backward do not write them. A model with uninitialised lazy parameters is measured on a deep copy,
because its first forward would materialise them.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MemoryEstimate:
    """One client's peak memory, in bytes, split by what holds it."""

    params_bytes: int  # all parameters (trainable or frozen) held by the client
    grads_bytes: int  # gradients the step produced (parameters that received one)
    optimizer_bytes: int  # optimizer state: factor x the bytes of the parameters that received a gradient
    activations_bytes: int  # training: tensors saved for backward; inference: peak live forward tensors
    buffers_bytes: int = 0  # buffers (BatchNorm running statistics, ...): model state that is not a parameter
    cuda_peak_bytes: int | None = None  # allocator peak during the step + model/optimizer state; None off CUDA

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.buffers_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


def optimizer_state_factor(name: str, momentum: float = 0.0) -> int:
    """Optimizer state per trainable parameter, in parameter-sized tensors.

    SGD keeps one momentum buffer when ``momentum > 0`` and nothing otherwise; Adam and AdamW keep two
    (``exp_avg`` and ``exp_avg_sq``; the step counter is a scalar and not counted).
    """
    key = name.strip().lower()
    if key == "sgd":
        return 1 if momentum > 0 else 0
    if key in ("adam", "adamw"):
        return 2
    raise ValueError(f"optimizer {name!r}: no memory model (known: sgd, adam, adamw)")


# -- keeping the model untouched ---------------------------------------------------------------------------


def _needs_copy(model: nn.Module) -> bool:
    return any(is_lazy(p) for p in model.parameters()) or any(is_lazy(b) for b in model.buffers())


@contextmanager
def untouched(model: nn.Module, example: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """Yield a module to run forward/backward on; afterwards ``model`` is as it was.

    Gradients are stashed (every ``.grad`` set to ``None`` inside, the old ones put back after), buffers are
    cloned and copied back, every submodule's train/eval flag is restored, and the CPU (and the model's
    CUDA device's) RNG state is forked. Parameters are not copied because forward and backward never write
    them. A model with uninitialised lazy modules is run on a deep copy instead, materialised by a no-grad
    forward pass on ``example`` (required then) before it is yielded.
    """
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        if _needs_copy(model):
            if example is None:
                raise ValueError("a model with lazy modules needs an example input to be materialised")
            work = copy.deepcopy(model)
            with torch.no_grad():
                work(example)
            yield work
            return
        modes = [(m, m.training) for m in model.modules()]
        params = list(model.parameters())
        grads = [p.grad for p in params]
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        for p in params:
            p.grad = None
        try:
            yield model
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, training in modes:
                m.training = training


# -- counting ----------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind ``t``; falls back to the tensor itself for exotic tensors."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), _nbytes(t)


def _state_storages(model: nn.Module) -> set[int]:
    """Addresses of the storages that hold parameters and buffers: model state, not activations."""
    return {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()] if t.numel() > 0}


def _state_bytes(model: nn.Module) -> tuple[int, int]:
    return sum(_nbytes(p) for p in model.parameters()), sum(_nbytes(b) for b in model.buffers())


def _model_device(model: nn.Module, x: torch.Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    return x.device


class _CudaPeak:
    """Allocator peak above what was allocated when the step began; a no-op off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on = device.type == "cuda"
        self.peak: int | None = None

    def __enter__(self) -> _CudaPeak:
        if self.on:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on and exc[0] is None:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def measure_training_memory(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn = F.cross_entropy,
    optimizer_factor: int,
) -> MemoryEstimate:
    """Peak memory of one training step of ``model`` on the batch ``(x, y)``, measured by running it.

    - ``activations_bytes``: every tensor autograd saves for backward during the forward pass (the input
      batch and the labels included when an op saves them), each storage counted once (views share it),
      storages of parameters and buffers excluded. All of them are alive together at the end of forward,
      so their sum is the activation peak.
    - ``grads_bytes``: the gradients the backward pass actually produced (frozen parameters, and trainable
      ones the forward did not use, get none); ``optimizer_bytes`` = ``optimizer_factor`` x those bytes.
    - ``cuda_peak_bytes`` (CUDA only): the allocator's peak during forward+backward above what was
      allocated before it, plus the model state and optimizer state the step does not allocate, i.e. the
      measured counterpart of ``total_bytes`` (it also sees backward's transient tensors and rounding).
      It resets the device's peak-memory statistics.

    The model runs in train mode; afterwards its parameters, gradients, buffers and modes are as before.
    A model without trainable parameters gets no backward pass (nothing to save activations for).
    """
    if optimizer_factor < 0:
        raise ValueError(f"optimizer_factor must be >= 0, got {optimizer_factor}")
    with untouched(model, x) as work:
        work.train()
        state = _state_storages(work)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr, nbytes = _storage_key(t)
            if ptr not in state and ptr not in saved:
                saved[ptr] = nbytes
            return t

        trains = any(p.requires_grad for p in work.parameters())
        device = _model_device(work, x)
        with _CudaPeak(device) as cuda:
            with torch.enable_grad():
                if trains:
                    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                        loss = loss_fn(work(x), y)
                else:
                    loss = loss_fn(work(x), y)
            if loss.requires_grad:
                loss.backward()
            del loss
        if not trains:
            saved.clear()
        params_bytes, buffers_bytes = _state_bytes(work)
        grads_bytes = sum(_nbytes(p.grad) for p in work.parameters() if p.grad is not None)
    optimizer_bytes = optimizer_factor * grads_bytes
    cuda_peak = None if cuda.peak is None else cuda.peak + params_bytes + buffers_bytes + optimizer_bytes
    return MemoryEstimate(
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        optimizer_bytes=optimizer_bytes,
        activations_bytes=sum(saved.values()),
        buffers_bytes=buffers_bytes,
        cuda_peak_bytes=cuda_peak,
    )


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live storages produced by aten ops, and their peak.

    Every op output is seen here; each storage is counted once while any tensor produced by an op still
    refers to it (a weakref finalizer per output tensor decrements the count). Storages in ``exclude``
    (parameters, buffers) are not counted.
    """

    def __init__(self, exclude: set[int], base_bytes: int) -> None:
        super().__init__()
        self.exclude = exclude
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = base_bytes
        self.peak = base_bytes

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= self.sizes.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr, nbytes = _storage_key(t)
            if ptr in self.exclude:
                continue
            if ptr not in self.refs:
                self.refs[ptr] = 0
                self.sizes[ptr] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def measure_inference_memory(model: nn.Module, x: torch.Tensor) -> MemoryEstimate:
    """Peak memory of a forward pass of ``model`` on ``x`` under ``no_grad`` in eval mode.

    ``activations_bytes`` is the peak, over the forward pass, of the bytes of live tensors: the input batch
    plus every storage an aten op produced that is still referenced (tracked op by op with a dispatch mode
    and weakref finalizers; views counted once; parameters and buffers excluded). Skip connections kept
    alive across blocks are therefore counted, unlike a per-layer input+output estimate. No gradients or
    optimizer state. On CUDA ``cuda_peak_bytes`` = allocator peak above the start + model state.
    """
    with untouched(model, x) as work:
        work.eval()
        state = _state_storages(work)
        ptr, x_bytes = _storage_key(x)
        base = 0 if ptr in state else x_bytes
        tracker = _LiveBytes(state | {ptr}, base)
        with _CudaPeak(_model_device(work, x)) as cuda, torch.no_grad():
            with tracker:
                out = work(x)
            del out
        params_bytes, buffers_bytes = _state_bytes(work)
    cuda_peak = None if cuda.peak is None else cuda.peak + params_bytes + buffers_bytes
    return MemoryEstimate(
        params_bytes=params_bytes,
        grads_bytes=0,
        optimizer_bytes=0,
        activations_bytes=tracker.peak,
        buffers_bytes=buffers_bytes,
        cuda_peak_bytes=cuda_peak,
    )


# -- per-batch-size cache ----------------------------------------------------------------------------------


def sample_batch(
    sample_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    input_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in batch: N(0, 1) floats (zeros for integer inputs) and uniform labels.

    Drawn from a private generator, so the run's global RNG stream is not consumed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(0)
    shape = (batch_size, *sample_shape)
    if input_dtype.is_floating_point:
        x = torch.randn(shape, generator=g).to(input_dtype)
    else:
        x = torch.zeros(shape, dtype=input_dtype)
    y = torch.randint(num_classes, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def trainable_signature(model: nn.Module) -> tuple[bool, ...]:
    """Which parameters are trainable: part of a cache key, since freezing changes the work."""
    return tuple(p.requires_grad for p in model.parameters())


class MemoryCache:
    """Measured estimates per batch size (and per set of trainable parameters), each measured once.

    Activations grow about linearly with the batch size, but every batch size is measured, never
    extrapolated. The key includes which parameters are trainable, so freezing blocks (ProFL, FedPEFT)
    between calls gets a fresh measurement rather than a stale one. ``model`` must live on ``device``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sample_shape: tuple[int, ...],
        num_classes: int,
        optimizer_factor: int,
        device: torch.device | str = "cpu",
        loss_fn: LossFn = F.cross_entropy,
        input_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.optimizer_factor = optimizer_factor
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.input_dtype = input_dtype
        self.measurements = 0  # how many real measurements ran (the rest were cache hits)
        self._training: dict[tuple[int, tuple[bool, ...]], MemoryEstimate] = {}
        self._inference: dict[int, MemoryEstimate] = {}

    def _batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(
            self.sample_shape, self.num_classes, batch_size, device=self.device, input_dtype=self.input_dtype
        )

    def training(self, batch_size: int) -> MemoryEstimate:
        key = (batch_size, trainable_signature(self.model))
        hit = self._training.get(key)
        if hit is None:
            x, y = self._batch(batch_size)
            hit = measure_training_memory(
                self.model, x, y, loss_fn=self.loss_fn, optimizer_factor=self.optimizer_factor
            )
            self.measurements += 1
            self._training[key] = hit
        return hit

    def inference(self, batch_size: int) -> MemoryEstimate:
        hit = self._inference.get(batch_size)
        if hit is None:
            x, _ = self._batch(batch_size)
            hit = measure_inference_memory(self.model, x)
            self.measurements += 1
            self._inference[batch_size] = hit
        return hit


# -- a hard cap on CUDA ------------------------------------------------------------------------------------


class CudaMemoryCap:
    """Caps this process's CUDA caching allocator at ``budget_bytes`` for one client's work.

    Sets :func:`torch.cuda.set_per_process_memory_fraction` to ``budget / total device memory`` (clamped to
    [0, 1]) on entry and restores the previous fraction on exit; an allocation past the cap raises
    ``torch.OutOfMemoryError``, which the caller turns into an ``oom`` status. The cap covers everything the
    process has allocated on that device (the model, cached data), not just the client's step. On a
    non-CUDA device it does nothing.
    """

    def __init__(self, budget_bytes: int, device: torch.device | str) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        self.fraction: float | None = None  # the fraction applied; None when inactive (non-CUDA)
        self._previous: float | None = None

    def __enter__(self) -> CudaMemoryCap:
        if self.device.type != "cuda":
            return self
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._index = index
        total = torch.cuda.get_device_properties(index).total_memory
        fraction = min(1.0, max(0.0, self.budget_bytes / total))
        self._previous = torch.cuda.get_per_process_memory_fraction(index)
        torch.cuda.set_per_process_memory_fraction(float(fraction), index)
        self.fraction = fraction
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            torch.cuda.set_per_process_memory_fraction(float(self._previous), self._index)
            self._previous = None


__all__ = [
    "CudaMemoryCap",
    "MemoryCache",
    "MemoryEstimate",
    "measure_inference_memory",
    "measure_training_memory",
    "optimizer_state_factor",
    "sample_batch",
    "trainable_signature",
    "untouched",
]
