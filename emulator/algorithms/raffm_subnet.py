"""RaFFM's model scaling on timm Vision Transformers: salient parameter prioritisation and subnetworks.

- **Salient parameter prioritisation** (SPP), function-preserving permutations applied in place:
  per attention head, the Q and K rows of the head's slice of ``qkv`` are ranked by
  (‖Q row‖₁ + ‖K row‖₁)/2 and both get the same permutation (q·k is a sum over that shared axis); the
  head's V rows are ranked by ‖V row‖₁ + ‖proj column‖₁ and V rows and ``proj`` columns get the same
  permutation; MLP hidden units are ranked by ‖fc1 row‖₁ + ‖fc2 column‖₁ (fc1 rows + bias, fc2 columns).
  Afterwards the leading slices of every weight hold its most salient units.
- **Subnetworks** keep every head and the token width, and take per block the leading ``head_dim`` entries
  of each head's Q/K/V (and the matching ``proj`` columns) and the leading ``hidden`` MLP units. Attention
  logits keep the full model's scale (1/sqrt(full head dim)): the kept dims approximate the full dot
  product. The subnetwork is a real, smaller module (its memory and FLOPs are measured, not guessed) whose
  state-dict keys are the full model's; ``Subnetwork.index`` maps its flat vector into the full one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emulator.errors import UserError
from emulator.flat import FlatModel


@dataclass(frozen=True)
class ViTLayout:
    """What RaFFM needs to know of a timm ViT."""

    blocks: int
    heads: int
    head_dim: int
    hidden: tuple[int, ...]  # MLP hidden size per block


@dataclass(frozen=True)
class SubnetSpec:
    """Per block: kept dims of each head's Q/K/V, and kept MLP hidden units."""

    head_dims: tuple[int, ...]
    hidden: tuple[int, ...]


def vit_layout(model: nn.Module) -> ViTLayout:
    """Check that ``model`` is a timm ViT whose attention and MLP RaFFM can slice; a one-line error if not."""
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise UserError(
            f"algorithm = 'raffm' needs a timm Vision Transformer (e.g. test_vit, vit_tiny_patch16_224); "
            f"{name} has no transformer blocks"
        )
    heads = head_dim = None
    hidden = []
    for i, block in enumerate(blocks):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        ok = (
            attn is not None and mlp is not None
            and isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
            and all(isinstance(getattr(attn, k, nn.Identity()), nn.Identity) for k in ("q_norm", "k_norm", "norm"))
            and getattr(attn, "gate", None) is None
            and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)
            and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
        )
        if ok:
            ok = (
                attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
                and attn.proj.in_features == attn.num_heads * attn.head_dim
                and mlp.fc1.out_features == mlp.fc2.in_features
            )
        if not ok:
            raise UserError(
                f"algorithm = 'raffm': block {i} of {name} is not a plain ViT block (qkv Attention without "
                "q/k norms or gates, fc1/fc2 MLP); use a timm vit_* / deit_* / test_vit model"
            )
        if heads is None:
            heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        elif (attn.num_heads, attn.head_dim) != (heads, head_dim):
            raise UserError(f"algorithm = 'raffm': {name} has blocks with different head layouts")
        hidden.append(int(mlp.fc1.out_features))
    assert heads is not None and head_dim is not None
    return ViTLayout(blocks=len(blocks), heads=heads, head_dim=head_dim, hidden=tuple(hidden))


def _kept(full: int, ratio: float) -> int:
    return max(1, min(full, round(ratio * full)))


def uniform_spec(layout: ViTLayout, head_ratio: float, mlp_ratio: float) -> SubnetSpec:
    return SubnetSpec(
        head_dims=(_kept(layout.head_dim, head_ratio),) * layout.blocks,
        hidden=tuple(_kept(h, mlp_ratio) for h in layout.hidden),
    )


def full_spec(layout: ViTLayout) -> SubnetSpec:
    return SubnetSpec(head_dims=(layout.head_dim,) * layout.blocks, hidden=layout.hidden)


def random_spec(
    layout: ViTLayout, head_ratios: tuple[float, ...], mlp_ratios: tuple[float, ...], rng: np.random.Generator
) -> SubnetSpec:
    """Per-layer random widths, as the authors' ``arc_config_sampler`` draws them."""
    heads = [_kept(layout.head_dim, float(rng.choice(head_ratios))) for _ in range(layout.blocks)]
    hidden = [_kept(h, float(rng.choice(mlp_ratios))) for h in layout.hidden]
    return SubnetSpec(head_dims=tuple(heads), hidden=tuple(hidden))


def spec_ratios(layout: ViTLayout, spec: SubnetSpec) -> tuple[float, float]:
    """(mean kept head-dim fraction, mean kept MLP fraction) over the blocks."""
    head = float(np.mean([d / layout.head_dim for d in spec.head_dims]))
    mlp = float(np.mean([h / full for h, full in zip(spec.hidden, layout.hidden, strict=True)]))
    return head, mlp


# -- salient parameter prioritisation ----------------------------------------------------------------------


def _order(score: torch.Tensor) -> torch.Tensor:
    """Descending salience; stable, so ties keep their order (deterministic)."""
    return torch.sort(score, descending=True, stable=True).indices


@torch.no_grad()
def salient_parameter_prioritization(model: nn.Module, *, attention: bool = True, mlp: bool = True) -> None:
    """Permute ``model``'s attention and MLP units in place so the most salient come first (output unchanged)."""
    layout = vit_layout(model)
    hd, heads = layout.head_dim, layout.heads
    width = heads * hd
    for block in model.blocks:
        if attention:
            qkv, proj = block.attn.qkv, block.attn.proj
            w = qkv.weight
            rows = torch.arange(3 * width, device=w.device)
            proj_cols = torch.arange(width, device=w.device)
            for h in range(heads):
                q = torch.arange(h * hd, (h + 1) * hd, device=w.device)
                k, v = q + width, q + 2 * width
                qk = _order((w[q].abs().sum(1) + w[k].abs().sum(1)) / 2)
                rows[q], rows[k] = q[qk], k[qk]
                vo = _order(w[v].abs().sum(1) + proj.weight[:, q].abs().sum(0))
                rows[v], proj_cols[q] = v[vo], q[vo]
            qkv.weight.copy_(w[rows])
            if qkv.bias is not None:
                qkv.bias.copy_(qkv.bias[rows])
            proj.weight.copy_(proj.weight[:, proj_cols])
        if mlp:
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2
            units = _order(fc1.weight.abs().sum(1) + fc2.weight.abs().sum(0))
            fc1.weight.copy_(fc1.weight[units])
            if fc1.bias is not None:
                fc1.bias.copy_(fc1.bias[units])
            fc2.weight.copy_(fc2.weight[:, units])


# -- subnetworks -------------------------------------------------------------------------------------------


class SlicedAttention(nn.Module):
    """Multi-head self-attention whose heads keep ``qk_dim`` Q/K dims and ``v_dim`` V dims each.

    Parameter names (``qkv``, ``proj``) are timm's, so the subnetwork's state dict has the full model's keys.
    """

    def __init__(
        self, dim: int, heads: int, qk_dim: int, v_dim: int, *, dim_out: int, qkv_bias: bool, proj_bias: bool,
        scale: float, attn_drop: float, proj_drop: float,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.scale = scale
        self.attn_drop_p = attn_drop
        dd = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, heads * (2 * qk_dim + v_dim), bias=qkv_bias, **dd)
        self.proj = nn.Linear(heads * v_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.view(b, n, h, dq).transpose(1, 2)
        k = k.view(b, n, h, dq).transpose(1, 2)
        v = v.view(b, n, h, dv).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop_p if self.training else 0.0, scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, h * dv)
        return self.proj_drop(self.proj(out))


def _selection(layout: ViTLayout, spec: SubnetSpec) -> dict[str, tuple[np.ndarray | None, np.ndarray | None]]:
    """State-dict key -> (kept rows, kept columns) of the full tensor; keys not listed are kept whole."""
    hd, heads = layout.head_dim, layout.heads
    width = heads * hd
    out: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
    for i, (dq, hidden) in enumerate(zip(spec.head_dims, spec.hidden, strict=True)):
        per_head = (np.arange(heads)[:, None] * hd + np.arange(dq)[None, :]).ravel()
        rows = np.concatenate([per_head, per_head + width, per_head + 2 * width])
        units = np.arange(hidden)
        p = f"blocks.{i}."
        out[p + "attn.qkv.weight"] = (rows, None)
        out[p + "attn.qkv.bias"] = (rows, None)
        out[p + "attn.proj.weight"] = (None, per_head)
        out[p + "mlp.fc1.weight"] = (units, None)
        out[p + "mlp.fc1.bias"] = (units, None)
        out[p + "mlp.fc2.weight"] = (None, units)
    return out


def flat_offsets(model: nn.Module) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Key -> (offset, shape) in :class:`FlatModel`'s vector (floating state-dict entries, in order)."""
    out, offset = {}, 0
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            out[key] = (offset, tuple(t.shape))
            offset += t.numel()
    return out


def _positions(offset: int, shape: tuple[int, ...], rows: np.ndarray | None, cols: np.ndarray | None) -> np.ndarray:
    if len(shape) == 0:
        return np.array([offset], dtype=np.int64)
    r = np.arange(shape[0], dtype=np.int64) if rows is None else rows.astype(np.int64)
    if len(shape) == 1:
        return offset + r
    inner = int(np.prod(shape[2:], dtype=np.int64))
    c = np.arange(shape[1], dtype=np.int64) if cols is None else cols.astype(np.int64)
    block = (r[:, None] * shape[1] + c[None, :]) * inner
    return offset + (block[..., None] + np.arange(inner, dtype=np.int64)).ravel()


class Subnetwork:
    """A built subnetwork of the full model: its module, its flat view and where that sits in the full vector."""

    def __init__(self, model: nn.Module, layout: ViTLayout, spec: SubnetSpec) -> None:
        self.spec = spec
        self.module = copy.deepcopy(model)
        for block, dq, hidden in zip(self.module.blocks, spec.head_dims, spec.hidden, strict=True):
            a, m = block.attn, block.mlp
            ref = a.qkv.weight
            dd = {"device": ref.device, "dtype": ref.dtype}
            block.attn = SlicedAttention(
                a.qkv.in_features, layout.heads, dq, dq, dim_out=a.proj.out_features,
                qkv_bias=a.qkv.bias is not None, proj_bias=a.proj.bias is not None, scale=float(a.scale),
                attn_drop=float(a.attn_drop.p), proj_drop=float(a.proj_drop.p), **dd,
            )
            m.fc1 = nn.Linear(m.fc1.in_features, hidden, bias=m.fc1.bias is not None, **dd)
            m.fc2 = nn.Linear(hidden, m.fc2.out_features, bias=m.fc2.bias is not None, **dd)
        self.flat = FlatModel(self.module)
        offsets = flat_offsets(model)
        selection = _selection(layout, spec)
        parts = []
        for key, t in self.module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            offset, shape = offsets[key]
            rows, cols = selection.get(key, (None, None))
            part = _positions(offset, shape, rows, cols)
            if part.size != t.numel():
                raise AssertionError(f"subnetwork slice of {key}: {part.size} entries for {tuple(t.shape)}")
            parts.append(part)
        self.index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self.size = self.flat.size

    def load(self, full: np.ndarray) -> None:
        """Take this subnetwork's entries of the full flat state."""
        self.flat.set(full[self.index])


__all__ = [
    "SlicedAttention",
    "SubnetSpec",
    "Subnetwork",
    "ViTLayout",
    "flat_offsets",
    "full_spec",
    "random_spec",
    "salient_parameter_prioritization",
    "spec_ratios",
    "uniform_spec",
    "vit_layout",
]
