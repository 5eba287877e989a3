"""ProFL's model surgery: blocks along the architecture, output modules, and one training step's network.

- :func:`split_model` cuts a model into ``T`` blocks whose chain, followed by the model's own head, computes
  exactly the model's forward pass (checked on a sample at construction). timm models are cut at their
  ``feature_info`` stage boundaries (:func:`pools.blocks.cut_model`); an ``nn.Sequential`` (fedemu's
  ``tiny_cnn``, ``mlp``) is cut after every pooling layer, or after every activation when it has no pooling
  layer, and what follows the last cut is its head. ``num_blocks`` merges the front stages (the stem and the
  early, cheap stages) into the first block until ``T <= num_blocks``.
- :func:`output_module` builds the cheap stand-in for the blocks after block ``t`` (ProFL's "output module"):
  conv3x3 (stride 2 while the map is at least 4x4) + GroupNorm + ReLU + global average pool + linear for a
  feature map; LayerNorm + token mean + linear for tokens; linear + ReLU + linear for a flat vector.
- :class:`StepNet` is what a client trains in one ProFL step: the frozen prefix (run under ``no_grad`` in eval
  mode, so it keeps no activations, gradients or optimizer state and its running statistics stay put), the
  active block, and its output module (the model's own head for the last block).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from emulator.errors import UserError

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish)


@dataclass
class BlockSplit:
    """``blocks`` chained, then ``head``, compute the model; ``shapes``: each block's per-sample output shape."""

    blocks: list[nn.Module]
    head: nn.Module
    shapes: list[tuple[int, ...]]


class TimmHead(nn.Module):
    """A timm model's ``forward_head`` as a module that owns only the head's state (pool, norm, classifier).

    The model's top-level children and direct parameters that no block uses are registered here (shared, not
    copied), so ``parameters()`` and ``train()`` cover exactly the head; the model object itself is kept
    unregistered and only its own ``training`` flag follows this module's (``forward_head`` reads it).
    """

    def __init__(self, model: nn.Module, claimed: set[int]) -> None:
        super().__init__()
        self._model = [model]  # a list: not a registered submodule
        for name, child in model.named_children():
            if not any(id(m) in claimed for m in child.modules()):
                self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            if id(param) not in claimed:
                self.register_parameter(name, param)

    def train(self, mode: bool = True) -> TimmHead:
        super().train(mode)
        self._model[0].training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model[0].forward_head(x)


def _sequential_cuts(model: nn.Sequential) -> list[int]:
    """Indices after which an ``nn.Sequential`` is cut (pooling layers, else activations)."""
    layers = list(model)
    for kinds in (_POOLS, _ACTIVATIONS):
        cuts = [i for i, m in enumerate(layers) if isinstance(m, kinds)]
        # The head must keep a layer with parameters (the classifier).
        cuts = [i for i in cuts if any(p.numel() for m in layers[i + 1 :] for p in m.parameters())]
        if cuts:
            return cuts
    return []


def _cut(model: nn.Module, model_name: str) -> tuple[list[nn.Module], nn.Module]:
    if isinstance(model, nn.Sequential):
        cuts = _sequential_cuts(model)
        if not cuts:
            raise UserError(
                f"model.name = {model_name!r}: ProFL cannot cut it into blocks (no pooling or activation layer "
                "before its classifier); use a timm CNN or ViT, e.g. resnet10t"
            )
        starts = [0, *(c + 1 for c in cuts)]
        blocks = [model[a:b] for a, b in itertools.pairwise(starts)]
        return blocks, model[starts[-1] :]
    from pools.blocks import cut_model  # lazy: timm is slow to import
    from pools.errors import PoolError

    try:
        blocks = cut_model(model, model_name)
    except PoolError as err:
        raise UserError(f"model.name = {model_name!r}: ProFL cannot cut it into blocks: {err}") from None
    claimed = {id(m) for b in blocks for m in b.modules()} | {id(p) for b in blocks for p in b.parameters()}
    return blocks, TimmHead(model, claimed)


def _merge_front(blocks: list[nn.Module], num_blocks: int) -> list[nn.Module]:
    """Merge the first stages into one block until at most ``num_blocks`` remain (0 = keep every stage)."""
    if num_blocks <= 0 or len(blocks) <= num_blocks:
        return blocks
    first = len(blocks) - num_blocks + 1
    return [nn.Sequential(*blocks[:first]), *blocks[first:]]


def split_model(
    model: nn.Module, model_name: str, *, num_blocks: int, sample: torch.Tensor
) -> BlockSplit:
    """Cut ``model`` into blocks + head and check on ``sample`` (a small batch) that they compute the model."""
    blocks, head = _cut(model, model_name)
    blocks = _merge_front(list(blocks), num_blocks)
    owned = {id(p) for m in [*blocks, head] for p in m.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in owned]
    if missing:
        raise UserError(f"model.name = {model_name!r}: ProFL's blocks miss parameters {missing[:3]}")
    shapes: list[tuple[int, ...]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = sample
            for block in blocks:
                x = block(x)
                shapes.append(tuple(x.shape[1:]))
            composed = head(x)
            reference = model(sample)
    finally:
        model.train(was_training)
    if composed.shape != reference.shape or not torch.allclose(composed, reference, rtol=1e-4, atol=1e-5):
        raise UserError(
            f"model.name = {model_name!r}: ProFL's blocks do not reproduce the model's forward pass; "
            "use a timm CNN or ViT, or an nn.Sequential tiny model"
        )
    return BlockSplit(blocks=list(blocks), head=head, shapes=shapes)


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def output_module(shape: Sequence[int], num_classes: int, width: int) -> nn.Module:
    """ProFL's output module for a block whose per-sample output has ``shape``: cheap layers to logits."""
    if len(shape) == 3:  # feature map (C, H, W)
        c, h, w = shape
        stride = 2 if min(h, w) >= 4 else 1
        return nn.Sequential(
            nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(1, width),  # batch-independent: tiny non-IID client batches
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )
    if len(shape) == 2:  # tokens (N, D)
        d = shape[1]
        return nn.Sequential(nn.LayerNorm(d), _TokenMean(), nn.Linear(d, num_classes))
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))
    raise UserError(f"ProFL: no output module for a block output of shape {tuple(shape)}")


def output_width(shapes: Sequence[tuple[int, ...]], width: int) -> int:
    """``width`` or, when 0, the model's final feature width (channels of a map, the token/flat width)."""
    if width > 0:
        return width
    last = shapes[-1]
    return int(last[0] if len(last) == 3 else last[-1])


class StepNet(nn.Module):
    """Frozen prefix (no_grad, eval) -> active block -> output module: one ProFL step's network."""

    def __init__(self, prefix: Sequence[nn.Module], active: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.active = active
        self.out = out

    def train(self, mode: bool = True) -> StepNet:
        super().train(mode)
        self.prefix.eval()  # frozen: running statistics are used and kept, no dropout
        return self

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # nothing saved for backward, no gradients: the frozen blocks cost weights only
            for block in self.prefix:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.active(self.forward_prefix(x)))


class PrefixNet(nn.Module):
    """The frozen prefix alone (for measuring its forward pass's live memory)."""

    def __init__(self, prefix: Sequence[nn.Module]) -> None:
        super().__init__()
        self.prefix = nn.ModuleList(prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.prefix:
            x = block(x)
        return x


__all__ = ["BlockSplit", "PrefixNet", "StepNet", "TimmHead", "output_module", "output_width", "split_model"]
