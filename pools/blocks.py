"""Cutting timm models into blocks at their stage boundaries, and describing the blocks as data.

A block is a run of the source model's own modules (shared, not copied) that maps the tensor at one cut point to
the tensor at the next; chaining a model's blocks (``compose``) computes exactly ``model.forward_features``.

Cut points:

- CNN families (resnet, mobilenetv3, efficientnet, regnet, convnext) are cut where timm's own
  ``model.feature_info`` puts a stage boundary (its ``module`` names). Block 0 includes the stem; everything
  ``forward_features`` does after the last boundary (efficientnet's ``conv_head``/``bn2``, regnet's
  ``final_conv``, convnext's ``norm_pre``) goes into the last block. Each boundary is a feature map
  (signature kind ``map``: channels, reduction).
- ViT (timm ``VisionTransformer``, from timm's vision_transformer and deit modules): block 0 is ``patch_embed``
  + ``_pos_embed`` (class/register tokens, position embedding, ``pos_drop``) + ``patch_drop`` + ``norm_pre`` +
  the first group of transformer blocks; the transformer blocks are split into ``vit_groups`` consecutive groups
  (as evenly as possible, earlier groups take the remainder) and the last block also applies the final ``norm``.
  Each boundary is a token sequence (signature kind ``tokens``: width, patch size as reduction, prefix tokens).

State dict keys of a block are the source model's own keys (``layer1.0.conv1.weight``, ``cls_token``,
``blocks.3.attn.qkv.weight``), so each block's tensors can be saved on their own and loaded back into the same
block of a freshly cut model of the same architecture, or sliced out of a full pretrained checkpoint.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pools.errors import PoolError
from pools.info import BlockInfo, Signature, SignatureKind

FAMILIES = ("resnet", "mobilenetv3", "efficientnet", "regnet", "convnext", "vit")

# timm module that defines a model -> our family
_TIMM_MODULES = {
    "resnet": "resnet",
    "mobilenetv3": "mobilenetv3",
    "efficientnet": "efficientnet",
    "regnet": "regnet",
    "convnext": "convnext",
    "vision_transformer": "vit",
    "deit": "vit",  # VisionTransformer and its distilled subclass (one more prefix token)
}

# What forward_features runs, in order, per CNN family ("x.*" = each child of container x, in order).
_FORWARD_STEPS = {
    "resnet": ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    "mobilenetv3": ("conv_stem", "bn1", "blocks.*"),
    "efficientnet": ("conv_stem", "bn1", "blocks.*", "conv_head", "bn2"),
    "regnet": ("stem", "s1", "s2", "s3", "s4", "final_conv"),
    "convnext": ("stem", "stages.*", "norm_pre"),
}

# Attributes timm's VisionTransformer._pos_embed reads besides its parameters and submodules.
_VIT_EMBED_ATTRS = ("dynamic_img_size", "no_embed_class", "num_prefix_tokens", "num_reg_tokens", "has_class_token")
_VIT_EMBED_MODULES = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


def _model_classes() -> dict[str, type[nn.Module]]:
    from timm.models import convnext, efficientnet, mobilenetv3, regnet, resnet, vision_transformer

    return {
        "resnet": resnet.ResNet,
        "mobilenetv3": mobilenetv3.MobileNetV3,
        "efficientnet": efficientnet.EfficientNet,
        "regnet": regnet.RegNet,
        "convnext": convnext.ConvNeXt,
        "vit": vision_transformer.VisionTransformer,
    }


def family_of(model_name: str) -> str:
    """The block family of timm model ``model_name`` (a pretrained tag such as ``.a1_in1k`` is allowed)."""
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.split(".")[0], timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise PoolError(f"unknown timm model {model_name!r}{hint}")
    module = timm.models.model_entrypoint(model_name).__module__.rsplit(".", 1)[-1]
    family = _TIMM_MODULES.get(module)
    if family is None:
        raise PoolError(
            f"timm model {model_name!r} ({module}) cannot be cut into blocks; supported families: {', '.join(FAMILIES)}"
        )
    return family


class Block(nn.Module):
    """Consecutive modules of a source model, chained. Registered under their source paths (shared, not copied).

    Attributes describing the cut (used by ``describe_blocks``): ``model_name``, ``family``, ``index``,
    ``num_blocks``, ``out_kind`` ("map"/"tokens"), ``out_reduction``, ``out_prefix_tokens``.
    """

    def __init__(
        self,
        source: nn.Module,
        paths: Sequence[str],
        *,
        model_name: str,
        family: str,
        index: int,
        num_blocks: int,
        out_kind: SignatureKind,
        out_reduction: int,
        out_prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.paths = tuple(paths)
        self.model_name = model_name
        self.family = family
        self.index = index
        self.num_blocks = num_blocks
        self.out_kind: SignatureKind = out_kind
        self.out_reduction = out_reduction
        self.out_prefix_tokens = out_prefix_tokens
        for path in self.paths:
            _attach(self, path, source.get_submodule(path))
        self.train(source.training)

    def run_steps(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.paths:
            x = self.get_submodule(path)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_steps(x)

    def extra_repr(self) -> str:
        return f"{self.model_name}.{self.index} of {self.num_blocks}"


class VitEmbedBlock(Block):
    """ViT block 0: patch embedding + class/register tokens + position embedding, then its transformer blocks."""

    def __init__(self, source: nn.Module, paths: Sequence[str], **kwargs: Any) -> None:
        super().__init__(source, paths, **kwargs)
        for name in _VIT_EMBED_MODULES:
            self.add_module(name, getattr(source, name))
        for name, param in source._parameters.items():  # cls_token, pos_embed, reg_token, dist_token, ...
            self.register_parameter(name, param)
        for name in ("cls_token", "reg_token", "pos_embed"):
            if name not in self._parameters:
                setattr(self, name, getattr(source, name, None))
        for name in _VIT_EMBED_ATTRS:
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        # The source class's own method, run on this block (it has every attribute the method reads), so the
        # embedding is exactly the model's, including subclasses that override it.
        self._pos_embed_fn = type(source)._pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed_fn(self, x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return self.run_steps(x)


class VitTailBlock(Block):
    """The last ViT block: its transformer blocks, then the model's final ``norm``."""

    def __init__(self, source: nn.Module, paths: Sequence[str], **kwargs: Any) -> None:
        super().__init__(source, paths, **kwargs)
        self.add_module("norm", source.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.run_steps(x))


class VitOnlyBlock(VitEmbedBlock):
    """A ViT cut into one block: embedding, every transformer block, final norm."""

    def __init__(self, source: nn.Module, paths: Sequence[str], **kwargs: Any) -> None:
        super().__init__(source, paths, **kwargs)
        self.add_module("norm", source.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under dotted ``path`` in ``root``, creating empty containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(leaf, module)


def _expand(model: nn.Module, steps: Sequence[str]) -> list[str]:
    out: list[str] = []
    for step in steps:
        if step.endswith(".*"):
            container = step[:-2]
            out.extend(f"{container}.{name}" for name, _ in model.get_submodule(container).named_children())
        else:
            model.get_submodule(step)  # raises AttributeError when the architecture differs
            out.append(step)
    return out


def _feature_info(model: nn.Module, model_name: str) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if not info:
        raise PoolError(f"timm model {model_name!r} has no feature_info to cut it at; is it a timm model?")
    return [dict(f) for f in info]


def _cut_cnn(model: nn.Module, model_name: str, family: str) -> list[nn.Module]:
    try:
        steps = _expand(model, _FORWARD_STEPS[family])
    except AttributeError as exc:
        raise PoolError(f"cannot cut {model_name!r}: its layout is not the {family} layout ({exc})") from exc
    info = _feature_info(model, model_name)
    ends = []
    for feat in info:
        if feat["module"] not in steps:
            raise PoolError(f"cannot cut {model_name!r}: feature_info module {feat['module']!r} is not a stage")
        ends.append(steps.index(feat["module"]))
    if ends != sorted(set(ends)):
        raise PoolError(f"cannot cut {model_name!r}: feature_info boundaries are not in forward order")
    ends[-1] = len(steps) - 1  # the last block takes whatever forward_features does after the last boundary
    blocks: list[nn.Module] = []
    start = 0
    for i, (end, feat) in enumerate(zip(ends, info, strict=True)):
        blocks.append(
            Block(
                model,
                steps[start : end + 1],
                model_name=model_name,
                family=family,
                index=i,
                num_blocks=len(info),
                out_kind="map",
                out_reduction=int(feat["reduction"]),
            )
        )
        start = end + 1
    return blocks


def _cut_vit(model: nn.Module, model_name: str, vit_groups: int) -> list[nn.Module]:
    depth = len(model.blocks)
    if not 1 <= vit_groups <= depth:
        raise PoolError(f"vit_groups={vit_groups} for {model_name!r} must be between 1 and its depth {depth}")
    patch = tuple(model.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise PoolError(f"cannot cut {model_name!r}: non-square patches {patch} are not supported")
    sizes = [depth // vit_groups + (1 if g < depth % vit_groups else 0) for g in range(vit_groups)]
    common = {
        "model_name": model_name,
        "family": "vit",
        "num_blocks": vit_groups,
        "out_kind": "tokens",
        "out_reduction": int(patch[0]),
        "out_prefix_tokens": int(model.num_prefix_tokens),
    }
    blocks: list[nn.Module] = []
    start = 0
    for g, size in enumerate(sizes):
        paths = [f"blocks.{j}" for j in range(start, start + size)]
        start += size
        first, last = g == 0, g == vit_groups - 1
        cls = VitOnlyBlock if first and last else VitEmbedBlock if first else VitTailBlock if last else Block
        blocks.append(cls(model, paths, index=g, **common))
    return blocks


def cut_model(model: nn.Module, model_name: str, *, vit_groups: int = 4) -> list[nn.Module]:
    """Cut timm ``model`` (created from ``model_name``) into blocks sharing its modules; see the module docstring."""
    family = family_of(model_name)
    expected = _model_classes()[family]
    if not isinstance(model, expected):
        raise PoolError(
            f"model {type(model).__name__} is not a timm {expected.__name__}; "
            f"pass the model created from {model_name!r}"
        )
    if family == "vit":
        return _cut_vit(model, model_name, vit_groups)
    return _cut_cnn(model, model_name, family)


def compose(blocks: Sequence[nn.Module]) -> nn.Module:
    """The blocks chained in order (an ``nn.Sequential``; its state dict keys are ``<position>.<block key>``)."""
    return nn.Sequential(*blocks)


def _check_blocks(blocks: Sequence[nn.Module], model_name: str) -> list[Block]:
    if not blocks:
        raise PoolError(f"no blocks to describe for {model_name!r}")
    out = []
    for i, block in enumerate(blocks):
        if not isinstance(block, Block):
            raise PoolError(f"block {i} of {model_name!r} is a {type(block).__name__}, not a block from cut_model")
        if block.index != i or block.num_blocks != len(blocks):
            raise PoolError(
                f"describe_blocks needs all {block.num_blocks} blocks of {model_name!r} in order; "
                f"got block {block.index} at position {i} of {len(blocks)}"
            )
        out.append(block)
    return out


def _output_signature(block: Block, y: torch.Tensor, input_size: int, name: str) -> Signature:
    if block.out_kind == "map":
        sig = Signature("map", int(y.shape[1]), block.out_reduction)
    else:
        sig = Signature("tokens", int(y.shape[-1]), block.out_reduction, block.out_prefix_tokens)
    if tuple(y.shape[1:]) != sig.shape(input_size):
        raise PoolError(
            f"block {name} gives shape {tuple(y.shape[1:])} at input_size {input_size}, not {sig.shape(input_size)}; "
            f"use an input_size that is a multiple of {block.out_reduction}"
        )
    return sig


def describe_blocks(blocks: list[nn.Module], *, model_name: str, input_size: int, in_chans: int) -> list[BlockInfo]:
    """Signatures, params, forward FLOPs and output bytes per sample of each block at ``input_size``.

    Runs the blocks once, chained, on a zero image of batch 1 in eval mode under ``no_grad`` (training flags are
    restored afterwards); FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls,
    convolutions, attention).
    """
    checked = _check_blocks(blocks, model_name)
    family = checked[0].family
    deepest = max(b.out_reduction for b in checked)
    if input_size <= 0 or input_size % deepest:
        raise PoolError(f"input_size {input_size} for {model_name!r} must be a positive multiple of {deepest}")
    first_param = next(checked[0].parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    dtype = first_param.dtype if first_param is not None else torch.float32
    modes = {m: m.training for b in checked for m in b.modules()}
    infos: list[BlockInfo] = []
    x = torch.zeros(1, in_chans, input_size, input_size, device=device, dtype=dtype)
    sig_in = Signature("map", in_chans, 1)
    try:
        for b in checked:
            b.eval()
        with torch.no_grad():
            for block in checked:
                name = f"{model_name}.{block.index}"
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        y = block(x)
                except (RuntimeError, AssertionError, ValueError) as exc:
                    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise PoolError(f"block {name} fails at input_size {input_size}: {msg}") from exc
                sig_out = _output_signature(block, y, input_size, name)
                infos.append(
                    BlockInfo(
                        name=name,
                        model=model_name,
                        family=family,
                        index=block.index,
                        num_blocks=block.num_blocks,
                        input=sig_in,
                        output=sig_out,
                        params=sum(p.numel() for p in block.parameters()),
                        flops=int(counter.get_total_flops()),
                        activation_bytes=4 * y[0].numel(),
                        input_size=input_size,
                        in_chans=in_chans,
                    )
                )
                x, sig_in = y, sig_out
    finally:
        for m, mode in modes.items():
            m.training = mode
    return infos
