"""FLOPs of a client's work, counted with :class:`torch.utils.flop_counter.FlopCounterMode`, cached.

The counter sees the aten ops that do the arithmetic (matmuls, convolutions, attention) and counts a
multiply-add as 2 FLOPs; element-wise ops (activations, normalisation, pooling, the loss, bias adds) are
not counted, as in the usual "model FLOPs" convention. Backward is counted op by op as autograd runs it,
so it is about 2x forward, less where no input gradient is needed (the first layer, frozen blocks).

Each batch size is counted once, with a real forward (+ backward) on a stand-in batch of that shape; the
model is left untouched (see :func:`emulator.devices.memory.untouched`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emulator.devices.memory import sample_batch, trainable_signature, untouched

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# FLOPs per trainable parameter of the optimizer update: plain SGD's ``p -= lr * g`` is a multiply and
# an add. Momentum and weight decay add a few more per parameter; at any realistic batch size they are
# noise next to forward+backward, so one constant is used for every optimizer.
UPDATE_FLOPS_PER_PARAM = 2


def count_training_flops(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn = F.cross_entropy
) -> tuple[int, int]:
    """(forward+backward FLOPs, number of parameters that received a gradient) of one step, train mode."""
    with untouched(model, x) as work:
        work.train()
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            loss = loss_fn(work(x), y)
            if loss.requires_grad:
                loss.backward()
            del loss
        updated = sum(p.numel() for p in work.parameters() if p.grad is not None)
    return int(counter.get_total_flops()), int(updated)


def count_forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one inference forward pass (eval mode, no grad)."""
    with untouched(model, x) as work:
        work.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            work(x)
    return int(counter.get_total_flops())


class FlopCache:
    """FLOPs per batch size of a training step and of an inference forward pass, each counted once.

    ``training_step`` = forward + backward as counted + the SGD update, ``UPDATE_FLOPS_PER_PARAM`` (2) per
    parameter that received a gradient (``update_flops`` reports that part alone). The training key also
    includes which parameters are trainable, so freezing blocks between calls gets a fresh count.
    ``counts`` tells how many real counts ran (the rest were cache hits).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sample_shape: tuple[int, ...],
        num_classes: int,
        loss_fn: LossFn = F.cross_entropy,
        input_dtype: torch.dtype = torch.float32,
        reference_batch: int = 32,
    ) -> None:
        if reference_batch < 1:
            raise ValueError(f"reference_batch must be >= 1, got {reference_batch}")
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.loss_fn = loss_fn
        self.input_dtype = input_dtype
        self.reference_batch = reference_batch
        self.counts = 0
        self._training: dict[tuple[int, tuple[bool, ...]], tuple[int, int]] = {}
        self._forward: dict[int, int] = {}

    def _batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return sample_batch(
            self.sample_shape, self.num_classes, batch_size, device=device, input_dtype=self.input_dtype
        )

    def _training_counts(self, batch_size: int) -> tuple[int, int]:
        key = (batch_size, trainable_signature(self.model))
        hit = self._training.get(key)
        if hit is None:
            x, y = self._batch(batch_size)
            hit = count_training_flops(self.model, x, y, loss_fn=self.loss_fn)
            self.counts += 1
            self._training[key] = hit
        return hit

    def training_step(self, batch_size: int) -> int:
        """Forward + backward + optimizer update FLOPs of one step on a batch of ``batch_size``."""
        flops, updated = self._training_counts(batch_size)
        return flops + UPDATE_FLOPS_PER_PARAM * updated

    def update_flops(self, batch_size: int) -> int:
        """The optimizer-update part of :meth:`training_step` (independent of the batch size in practice)."""
        return UPDATE_FLOPS_PER_PARAM * self._training_counts(batch_size)[1]

    def forward(self, batch_size: int) -> int:
        """Inference FLOPs of one forward pass on a batch of ``batch_size``."""
        hit = self._forward.get(batch_size)
        if hit is None:
            x, _ = self._batch(batch_size)
            hit = count_forward_flops(self.model, x)
            self.counts += 1
            self._forward[batch_size] = hit
        return hit

    @property
    def per_sample_training(self) -> float:
        """FLOPs per sample of a training step at ``reference_batch`` (the update amortised over it)."""
        return self.training_step(self.reference_batch) / self.reference_batch

    @property
    def per_sample_forward(self) -> float:
        """Inference FLOPs per sample at ``reference_batch``."""
        return self.forward(self.reference_batch) / self.reference_batch


__all__ = ["UPDATE_FLOPS_PER_PARAM", "FlopCache", "count_forward_flops", "count_training_flops"]
