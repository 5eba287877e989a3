"""Stitching layers between blocks of different models, and the rule for which block may follow which.

Join rule (``can_join(a, b)``: may block ``b`` follow block ``a``?):

- ``b`` does not take the image (``b.index > 0``) and is not ``a`` itself (a block never follows itself);
- the reductions are integer multiples of each other (``b.input.reduction`` divides or is divided by
  ``a.output.reduction``), so the spatial grid is resampled by an integer factor;
- every kind pair is supported: map -> map, tokens -> tokens, map -> tokens, tokens -> map.

The stitching layer (``make_stitch``) is the identity when ``a.output == b.input``. Otherwise it is, in order:

1. tokens in: the prefix (class/register) tokens are split off and the patch tokens reshaped to their grid;
2. downsampling (``a`` finer than ``b``): average pooling by the integer factor;
3. a learned channel map: map out: 1x1 conv (no bias) + BatchNorm; tokens out: Linear (with bias) on the width,
   applied to the grid and to the prefix tokens that are kept;
4. upsampling (``a`` coarser than ``b``): nearest-neighbour by the integer factor (after the channel map, which
   is cheaper and gives the same result since both are per-position linear up to the norm);
5. tokens out: the grid flattened to tokens and ``b``'s prefix tokens put in front: the first of ``a``'s mapped
   prefix tokens where ``a`` has them, the rest (all of them for map -> tokens) = mean of the patch tokens + a
   learned offset (initialised to zero). Tokens -> map drops ``a``'s prefix tokens.

FLOPs are counted as ``torch.utils.flop_counter`` does: the conv/Linear only (pooling, upsampling, norms, means
are free), per sample.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pools.errors import PoolError
from pools.info import BlockInfo, Signature


@dataclass(frozen=True)
class JoinCost:
    """The stitching layer between two blocks: parameters and forward FLOPs per sample (0/0 for the identity)."""

    params: int
    flops: int
    identity: bool


def _factor(a_red: int, b_red: int) -> tuple[int, int] | None:
    """(down, up) resampling factors taking reduction ``a_red`` to ``b_red``; None when not an integer factor."""
    if a_red <= 0 or b_red <= 0:
        return None
    if b_red % a_red == 0:
        return b_red // a_red, 1
    if a_red % b_red == 0:
        return 1, a_red // b_red
    return None


def _why_not(a: BlockInfo, b: BlockInfo, input_size: int | None = None) -> str | None:
    if b.is_first:
        return f"{b.name} takes the image (it is block 0 of {b.model})"
    if a.name == b.name:
        return "a block never follows itself"
    out, inp = a.output, b.input
    if _factor(out.reduction, inp.reduction) is None:
        return f"reductions {out.reduction} and {inp.reduction} are not integer multiples of each other"
    if input_size is not None:
        for sig, who in ((out, a.name), (inp, b.name)):
            if input_size % sig.reduction:
                return f"input_size {input_size} is not a multiple of {who}'s reduction {sig.reduction}"
    return None


def can_join(a: BlockInfo, b: BlockInfo, input_size: int | None = None) -> bool:
    """May block ``b`` follow block ``a`` (with a stitching layer where needed)? See the module docstring.

    With ``input_size``, both grids must also be exact at that size (it is a multiple of both reductions).
    """
    return _why_not(a, b, input_size) is None


def _require(a: BlockInfo, b: BlockInfo, input_size: int) -> None:
    reason = _why_not(a, b, input_size)
    if reason is not None:
        raise PoolError(f"block {b.name} cannot follow block {a.name}: {reason}")


def _plan(a: BlockInfo, b: BlockInfo, input_size: int) -> tuple[int, int, int, int, int]:
    """(down, up, side where the channel map runs, prefix tokens kept from a, prefix tokens made)."""
    factor = _factor(a.output.reduction, b.input.reduction)
    assert factor is not None
    down, up = factor
    side = input_size // max(a.output.reduction, b.input.reduction)
    a_prefix = a.output.prefix_tokens if a.output.kind == "tokens" else 0
    kept = min(a_prefix, b.input.prefix_tokens) if b.input.kind == "tokens" else 0
    made = b.input.prefix_tokens - kept if b.input.kind == "tokens" else 0
    return down, up, side, kept, made


def join_cost(a: BlockInfo, b: BlockInfo, input_size: int) -> JoinCost:
    """Params and forward FLOPs per sample at ``input_size`` of ``make_stitch(a, b, input_size)``."""
    _require(a, b, input_size)
    if a.output == b.input:
        return JoinCost(params=0, flops=0, identity=True)
    _, _, side, kept, made = _plan(a, b, input_size)
    c_in, c_out = a.output.channels, b.input.channels
    if b.input.kind == "map":
        params = c_in * c_out + 2 * c_out  # 1x1 conv without bias + BatchNorm affine
        flops = 2 * c_in * c_out * side * side
    else:
        params = c_in * c_out + c_out + made * c_out  # Linear + learned offsets of the made prefix tokens
        flops = 2 * c_in * c_out * (side * side + kept)
    return JoinCost(params=params, flops=flops, identity=False)


def _tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C] patch tokens -> [B, C, s, s]."""
    n = x.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise PoolError(f"cannot reshape {n} patch tokens to a square grid")
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


class Stitch(nn.Module):
    """The stitching layer from signature ``src`` to ``dst``; see the module docstring for what it does."""

    def __init__(self, src: Signature, dst: Signature, *, down: int, up: int, kept: int, made: int) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        self.down, self.up, self.kept, self.made = down, up, kept, made
        if dst.kind == "map":
            self.proj: nn.Module = nn.Conv2d(src.channels, dst.channels, kernel_size=1, bias=False)
            self.norm: nn.Module = nn.BatchNorm2d(dst.channels)
            self.prefix = None
        else:
            self.proj = nn.Linear(src.channels, dst.channels)
            self.norm = nn.Identity()
            self.prefix = nn.Parameter(torch.zeros(1, made, dst.channels)) if made else None

    def extra_repr(self) -> str:
        s, d = self.src, self.dst
        return (
            f"{s.kind}({s.channels}, /{s.reduction}, +{s.prefix_tokens}) -> "
            f"{d.kind}({d.channels}, /{d.reduction}, +{d.prefix_tokens}), down={self.down}, up={self.up}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix = None
        if self.src.kind == "tokens":
            prefix = x[:, : self.kept]
            x = _tokens_to_grid(x[:, self.src.prefix_tokens :])
        if self.down > 1:
            x = F.avg_pool2d(x, self.down)
        if self.dst.kind == "map":
            x = self.norm(self.proj(x))
        else:
            x = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.up > 1:
            x = F.interpolate(x, scale_factor=self.up, mode="nearest")
        if self.dst.kind == "map":
            return x
        tokens = x.flatten(2).transpose(1, 2)  # [B, N, D]
        parts = []
        if self.kept:
            assert prefix is not None
            parts.append(self.proj(prefix))
        if self.prefix is not None:
            parts.append(tokens.mean(dim=1, keepdim=True) + self.prefix)
        return torch.cat([*parts, tokens], dim=1) if parts else tokens


def make_stitch(a: BlockInfo, b: BlockInfo, input_size: int) -> nn.Module:
    """The stitching layer that lets block ``b`` follow block ``a`` (``nn.Identity`` when signatures match)."""
    _require(a, b, input_size)
    if a.output == b.input:
        return nn.Identity()
    down, up, _, kept, made = _plan(a, b, input_size)
    return Stitch(a.output, b.input, down=down, up=up, kept=kept, made=made)


class Stitched(nn.Module):
    """Blocks from possibly different models with stitching layers between consecutive ones.

    ``blocks[i]`` is followed by ``stitches[i]`` and then ``blocks[i + 1]``; ``infos`` are the blocks' infos.
    """

    def __init__(self, blocks: Sequence[nn.Module], stitches: Sequence[nn.Module], infos: Sequence[BlockInfo]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stitches = nn.ModuleList(stitches)
        self.infos = tuple(infos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        for stitch, block in zip(self.stitches, self.blocks[1:], strict=True):
            x = block(stitch(x))
        return x


def stitched(blocks_and_infos: Sequence[tuple[nn.Module, BlockInfo]], input_size: int) -> Stitched:
    """Chain ``(block, info)`` pairs in order, inserting ``make_stitch`` between consecutive blocks.

    The result takes what the first block takes and gives what the last block's ``info.output`` promises.
    """
    if not blocks_and_infos:
        raise PoolError("stitched needs at least one block")
    blocks = [block for block, _ in blocks_and_infos]
    infos = [info for _, info in blocks_and_infos]
    stitches = [make_stitch(a, b, input_size) for a, b in itertools.pairwise(infos)]
    return Stitched(blocks, stitches, infos)


def join_matrix(infos: Sequence[BlockInfo], input_size: int) -> np.ndarray:
    """``[n, n]`` bool, ``[i, j]`` = may ``infos[j]`` follow ``infos[i]`` at ``input_size`` (diagonal False)."""
    n = len(infos)
    out = np.zeros((n, n), dtype=bool)
    for i, a in enumerate(infos):
        for j, b in enumerate(infos):
            out[i, j] = can_join(a, b, input_size)
    return out


# ---------------------------------------------------------------------------------------------------------
# Closed-form fitting: the channel map is linear per position, so it can be fitted by least squares from
# sums (X^T X, X^T T) that clients compute on their own data and the server adds up.


def fit_rows(stitch: Stitch, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position rows the channel map sees and the rows it should produce, on one grid.

    ``x``: the previous block's output (``stitch.src``); ``target``: what the next block's own model feeds
    it (``stitch.dst``), e.g. its preceding blocks run on the same images. Returns ``(X [P, c_in + 1], T
    [P, c_out])`` with a ones column in ``X`` (the bias / BatchNorm shift). Prefix tokens are left out:
    the fit uses the patch grid. When the map runs on the coarser source grid (upsampling after it), the
    target is average-pooled to that grid, which is the least-squares answer for a nearest upsample.
    """
    if stitch.src.kind == "tokens":
        x = _tokens_to_grid(x[:, stitch.src.prefix_tokens :])
    if stitch.down > 1:
        x = F.avg_pool2d(x, stitch.down)
    if stitch.dst.kind == "tokens":
        target = _tokens_to_grid(target[:, stitch.dst.prefix_tokens :])
    if stitch.up > 1:
        target = F.avg_pool2d(target, stitch.up)
    if x.shape[-2:] != target.shape[-2:]:
        raise PoolError(f"stitch fit: grids differ ({tuple(x.shape[-2:])} vs {tuple(target.shape[-2:])})")
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, ones], dim=1), target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])


def solve_linear(xtx: np.ndarray, xty: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge least squares ``(X^T X + lam I)^-1 X^T Y`` with ``lam = ridge * trace(X^T X) / dim``.

    The bias row (last) is not penalised. Float64; a singular system falls back to least squares.
    """
    a = np.asarray(xtx, dtype=np.float64)
    dim = a.shape[0]
    lam = ridge * float(np.trace(a[:-1, :-1])) / max(dim - 1, 1)
    reg = np.eye(dim) * lam
    reg[-1, -1] = 0.0
    try:
        return np.linalg.solve(a + reg, np.asarray(xty, dtype=np.float64))
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a + reg, np.asarray(xty, dtype=np.float64), rcond=None)[0]


def set_linear(stitch: Stitch, weights: np.ndarray) -> None:
    """Load a fitted ``[c_in + 1, c_out]`` map (last row = bias) into the stitching layer (eval mode).

    Map outputs: the 1x1 conv takes the matrix and the BatchNorm becomes an exact identity plus the
    bias (running mean 0, running var 1 - eps, scale 1). Token outputs: the Linear takes both.
    """
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    c_in, c_out = stitch.src.channels, stitch.dst.channels
    if tuple(w.shape) != (c_in + 1, c_out):
        raise PoolError(f"stitch weights have shape {tuple(w.shape)}, expected ({c_in + 1}, {c_out})")
    with torch.no_grad():
        if isinstance(stitch.proj, nn.Conv2d):
            assert isinstance(stitch.norm, nn.BatchNorm2d)
            stitch.proj.weight.copy_(w[:-1].T.reshape(c_out, c_in, 1, 1))
            stitch.norm.running_mean.zero_()
            stitch.norm.running_var.fill_(1.0 - stitch.norm.eps)
            stitch.norm.weight.fill_(1.0)
            stitch.norm.bias.copy_(w[-1])
        else:
            assert isinstance(stitch.proj, nn.Linear)
            stitch.proj.weight.copy_(w[:-1].T)
            stitch.proj.bias.copy_(w[-1])
    stitch.eval()


def fit_residual(xtx: np.ndarray, xty: np.ndarray, tt: float, t_sum: np.ndarray, weights: np.ndarray) -> float:
    """Relative residual ``||XW - T||^2 / ||T - mean(T)||^2`` from the sums alone.

    ``tt`` = sum of squares of T, ``t_sum`` = column sums of T; the row count is ``xtx[-1, -1]`` (ones column).
    """
    w = np.asarray(weights, dtype=np.float64)
    rss = tt - 2.0 * float(np.sum(w * xty)) + float(np.sum(w * (xtx @ w)))
    count = float(xtx[-1, -1])
    total = tt - float(np.sum(np.asarray(t_sum, dtype=np.float64) ** 2)) / max(count, 1.0)
    return float(max(rss, 0.0) / total) if total > 0 else float("nan")
