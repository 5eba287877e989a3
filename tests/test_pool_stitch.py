"""Stitching layers and the join rule: shapes across families, identity, costs, the join matrix, errors."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pools.blocks import compose, cut_model, describe_blocks
from pools.errors import PoolError
from pools.info import BlockInfo, Signature
from pools.stitch import JoinCost, Stitched, can_join, join_cost, join_matrix, make_stitch, stitched

SIZE = 64
SMALL_VIT = {"img_size": SIZE, "depth": 4, "embed_dim": 96, "num_heads": 2}
MODELS = {
    "resnet18": {},
    "mobilenetv3_small_100": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": SIZE},
    "vit_small_patch8_224": {**SMALL_VIT, "reg_tokens": 2},  # patch 8, 3 prefix tokens
    "vit_base_patch32_224": {**SMALL_VIT, "embed_dim": 64},  # patch 32, 1 prefix token
}


@pytest.fixture(scope="module")
def pool() -> dict[str, tuple[list[nn.Module], list[BlockInfo]]]:
    """model name -> (blocks, infos), all in eval mode at SIZE."""
    out = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        blocks = cut_model(model, name, vit_groups=4)
        out[name] = (blocks, describe_blocks(blocks, model_name=name, input_size=SIZE, in_chans=3))
    return out


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def pick(pool: dict, *refs: tuple[str, int]) -> list[tuple[nn.Module, BlockInfo]]:
    return [(pool[name][0][k], pool[name][1][k]) for name, k in refs]


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def all_infos(pool: dict) -> list[BlockInfo]:
    return [info for _, infos in pool.values() for info in infos]


@pytest.mark.parametrize(
    "chain",
    [
        # three CNN families, map -> map with down- and upsampling
        [("resnet18", 0), ("mobilenetv3_small_100", 2), ("efficientnet_b0", 4)],
        [("efficientnet_b0", 0), ("resnet18", 3), ("convnext_atto", 1)],
        # map -> tokens -> map
        [("resnet18", 0), ("convnext_atto", 2), ("vit_tiny_patch16_224", 2), ("mobilenetv3_small_100", 4)],
        # tokens -> tokens across patch sizes, prefix tokens kept, dropped and made
        [("vit_tiny_patch16_224", 0), ("vit_small_patch8_224", 1), ("vit_base_patch32_224", 2)],
        [("vit_base_patch32_224", 0), ("vit_small_patch8_224", 3)],
        # tokens -> map
        [("vit_small_patch8_224", 0), ("resnet18", 2), ("vit_tiny_patch16_224", 3)],
    ],
)
def test_stitched_chain_gives_the_promised_shape(chain, pool: dict, batch: torch.Tensor) -> None:
    pairs = pick(pool, *chain)
    model = stitched(pairs, SIZE)
    assert isinstance(model, Stitched) and len(model.stitches) == len(pairs) - 1
    assert all(not isinstance(s, nn.Identity) for s in model.stitches)
    y = run(model, batch)
    assert tuple(y.shape) == (2, *pairs[-1][1].output.shape(SIZE))
    assert torch.isfinite(y).all()


def test_stitches_train(pool: dict, batch: torch.Tensor) -> None:
    model = stitched(pick(pool, ("resnet18", 0), ("vit_tiny_patch16_224", 1), ("convnext_atto", 3)), SIZE)
    model.train()
    model(batch).square().mean().backward()
    for stitch in model.stitches:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stitch.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_identity_when_signatures_match(pool: dict, batch: torch.Tensor) -> None:
    for name in ("resnet18", "vit_tiny_patch16_224"):
        blocks, infos = pool[name]
        for a, b in itertools.pairwise(infos):
            assert isinstance(make_stitch(a, b, SIZE), nn.Identity)
            assert join_cost(a, b, SIZE) == JoinCost(params=0, flops=0, identity=True)
        model = stitched(list(zip(blocks, infos, strict=True)), SIZE)
        assert torch.equal(run(model, batch), run(compose(blocks), batch))
    # same width, patch size and prefix: identity across groups of one ViT (any order)
    vit = pool["vit_tiny_patch16_224"][1]
    assert join_cost(vit[3], vit[1], SIZE).identity


def test_join_cost_counts_the_real_module(pool: dict) -> None:
    infos = all_infos(pool)
    checked = kinds = 0
    seen = set()
    for a, b in itertools.product(infos, infos):
        if not can_join(a, b, SIZE):
            continue
        cost = join_cost(a, b, SIZE)
        key = (a.output, b.input)
        if cost.identity or key in seen:
            continue
        seen.add(key)
        stitch = make_stitch(a, b, SIZE).eval()
        assert cost.params == sum(p.numel() for p in stitch.parameters())
        x = torch.randn(2, *a.output.shape(SIZE))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            y = stitch(x)
        assert cost.flops == counter.get_total_flops() // 2
        assert tuple(y.shape[1:]) == b.input.shape(SIZE)
        checked += 1
        kinds |= 1 << ["map", "tokens"].index(a.output.kind) * 2 + ["map", "tokens"].index(b.input.kind)
    assert checked > 50 and kinds == 0b1111  # all four kind pairs


def test_join_matrix(pool: dict) -> None:
    infos = all_infos(pool)
    m = join_matrix(infos, SIZE)
    n = len(infos)
    assert m.shape == (n, n) and m.dtype == np.bool_
    assert not m.diagonal().any()  # a block never follows itself
    firsts = [j for j, info in enumerate(infos) if info.is_first]
    assert not m[:, firsts].any()  # nothing comes before a block that takes the image
    assert m.sum() == n * (n - len(firsts)) - (n - len(firsts))  # at SIZE all reductions are powers of 2
    for i, j in [(0, 1), (3, 12), (len(infos) - 1, 2)]:
        assert m[i, j] == can_join(infos[i], infos[j])
    # a patch-14 ViT block cannot meet a reduction-16 or -32 block, but can follow a reduction-2 one
    t14 = Signature("tokens", 96, 14, 1)
    p14 = dataclasses.replace(infos[-1], name="vit_p14.1", index=1, input=t14, output=t14)
    r16 = next(i for i in infos if i.output.reduction == 16)
    r2 = next(i for i in infos if i.output.reduction == 2)
    assert not can_join(r16, p14) and not can_join(p14, r16) and can_join(r2, p14)
    assert not join_matrix([p14], 64)[0, 0]
    assert join_matrix([r2, p14], 224)[0, 1] and not join_matrix([r2, p14], 64)[0, 1]  # 64 is no multiple of 14


def test_invalid_joins_name_both_blocks(pool: dict) -> None:
    _, resnet = pool["resnet18"]
    _, convnext = pool["convnext_atto"]
    with pytest.raises(PoolError, match=r"block convnext_atto\.0 cannot follow block resnet18\.2: .*takes the image"):
        make_stitch(resnet[2], convnext[0], SIZE)
    with pytest.raises(PoolError, match=r"resnet18\.1 cannot follow block resnet18\.1"):
        join_cost(resnet[1], resnet[1], SIZE)
    odd = dataclasses.replace(resnet[3], name="odd.1", input=Signature("map", 256, 12))
    with pytest.raises(PoolError, match=r"odd\.1 cannot follow block resnet18\.2: reductions 8 and 12"):
        stitched([*pick(pool, ("resnet18", 0), ("resnet18", 1), ("resnet18", 2)), (nn.Identity(), odd)], SIZE)
    with pytest.raises(PoolError, match="not a multiple"):
        make_stitch(resnet[1], convnext[3], 40)
