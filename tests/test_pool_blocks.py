"""Cutting timm models into blocks: the composition is forward_features, signatures, costs, state dicts."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from pools.blocks import FAMILIES, Block, compose, cut_model, describe_blocks, family_of
from pools.errors import PoolError
from pools.info import BlockInfo, Signature

SIZE = 64  # every test model runs at 64x64 (the ViT is created for it)
MODELS = {
    "resnet": "resnet18",
    "mobilenetv3": "mobilenetv3_small_100",
    "efficientnet": "efficientnet_b0",
    "regnet": "regnetx_002",
    "convnext": "convnext_atto",
    "vit": "vit_tiny_patch16_224",
}
# (blocks, output channels per block) per family at SIZE
EXPECTED = {
    "resnet": [64, 64, 128, 256, 512],
    "mobilenetv3": [16, 16, 24, 48, 576],
    "efficientnet": [16, 24, 40, 112, 1280],  # the last block includes conv_head + bn2
    "regnet": [32, 24, 56, 152, 368],
    "convnext": [40, 80, 160, 320],
    "vit": [192, 192, 192, 192],
}


def create(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"img_size": SIZE} if family_of(name) == "vit" else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {family: create(name) for family, name in MODELS.items()}


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_families_cover_the_test_models() -> None:
    assert set(MODELS) == set(FAMILIES)
    for family, name in MODELS.items():
        assert family_of(name) == family
    assert family_of("resnet18.a1_in1k") == "resnet"  # pretrained tags are fine
    assert family_of("deit_tiny_distilled_patch16_224") == "vit"  # timm's deit module builds VisionTransformers


@pytest.mark.parametrize("family", FAMILIES)
def test_composition_is_forward_features(family: str, models: dict, batch: torch.Tensor) -> None:
    model, name = models[family], MODELS[family]
    blocks = cut_model(model, name)
    assert len(blocks) == len(EXPECTED[family])
    with torch.no_grad():
        diff = (compose(blocks)(batch) - model.forward_features(batch)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_matches_what_blocks_do(family: str, models: dict, batch: torch.Tensor) -> None:
    model, name = models[family], MODELS[family]
    blocks = cut_model(model, name)
    infos = describe_blocks(blocks, model_name=name, input_size=SIZE, in_chans=3)
    assert [i.output.channels for i in infos] == EXPECTED[family]
    assert infos[0].input == Signature("map", 3, 1)
    for prev, info in itertools.pairwise(infos):
        assert info.input == prev.output
    x = batch
    with torch.no_grad():
        for k, (block, info) in enumerate(zip(blocks, infos, strict=True)):
            x = block(x)
            assert tuple(x.shape[1:]) == info.output.shape(SIZE)
            assert info.name == f"{name}.{k}" and info.index == k and info.num_blocks == len(blocks)
            assert info.family == family and info.model == name and info.input_size == SIZE
            assert info.activation_bytes == 4 * x[0].numel()
            assert info.params == sum(p.numel() for p in block.parameters()) > 0
            assert info.flops > 0
            assert BlockInfo.from_json(info.to_json()) == info
    feature_params = sum(p.numel() for b in blocks for p in b.parameters())
    assert sum(i.params for i in infos) == feature_params
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.zeros(1, 3, SIZE, SIZE))
    assert sum(i.flops for i in infos) == counter.get_total_flops()
    kinds = {i.output.kind for i in infos}
    if family == "vit":
        assert kinds == {"tokens"}
        assert all(i.output.reduction == 16 and i.output.prefix_tokens == 1 for i in infos)
    else:
        assert kinds == {"map"}
        assert infos[-1].output.reduction == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_block_state_dicts_partition_the_features(family: str, models: dict) -> None:
    model, name = models[family], MODELS[family]
    blocks = cut_model(model, name)
    keys = [set(b.state_dict()) for b in blocks]
    union = set().union(*keys)
    assert sum(len(k) for k in keys) == len(union)  # disjoint
    assert union <= set(model.state_dict())  # the source model's own key names
    head = set(model.state_dict()) - union
    assert head and all(not k.startswith(("blocks.", "layer", "stages.", "s1.")) for k in head)
    # shared, not copied
    source = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in source for b in blocks for p in b.parameters())


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_block_weights_round_trip_through_safetensors(family: str, models: dict, batch, tmp_path) -> None:
    name = MODELS[family]
    blocks = cut_model(models[family], name)
    fresh_model = create(name, seed=123)
    fresh = cut_model(fresh_model, name)
    with torch.no_grad():
        assert (compose(fresh)(batch) - compose(blocks)(batch)).abs().max().item() > 1e-3
    for k, (block, target) in enumerate(zip(blocks, fresh, strict=True)):
        save_file(block.state_dict(), str(tmp_path / f"{k}.safetensors"))
        target.load_state_dict(load_file(str(tmp_path / f"{k}.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(compose(fresh)(batch), compose(blocks)(batch))
        assert torch.equal(fresh_model.forward_features(batch), models[family].forward_features(batch))


@pytest.mark.parametrize(("groups", "sizes"), [(1, [12]), (3, [4, 4, 4]), (5, [3, 3, 2, 2, 2]), (12, [1] * 12)])
def test_vit_groups(groups: int, sizes: list[int], models: dict, batch: torch.Tensor) -> None:
    model, name = models["vit"], MODELS["vit"]
    blocks = cut_model(model, name, vit_groups=groups)
    assert [len(b.paths) for b in blocks] == sizes
    with torch.no_grad():
        assert (compose(blocks)(batch) - model.forward_features(batch)).abs().max().item() <= 1e-5
    keys = set(blocks[0].state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= keys
    assert "norm.weight" in blocks[-1].state_dict()


def test_vit_groups_out_of_range(models: dict) -> None:
    for groups in (0, 13):
        with pytest.raises(PoolError, match="vit_groups"):
            cut_model(models["vit"], MODELS["vit"], vit_groups=groups)


def test_vit_variants() -> None:
    torch.manual_seed(0)
    kw = {"img_size": 32, "depth": 4, "embed_dim": 48, "num_heads": 2}
    variants = [
        ({"reg_tokens": 2}, 3),
        ({"class_token": False, "global_pool": "avg"}, 0),
        ({"no_embed_class": True}, 1),
    ]
    for extra, prefix in variants:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw, **extra).eval()
        blocks = cut_model(model, "vit_tiny_patch16_224", vit_groups=2)
        infos = describe_blocks(blocks, model_name="vit_tiny_patch16_224", input_size=32, in_chans=3)
        assert infos[-1].output == Signature("tokens", 48, 16, prefix)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert (compose(blocks)(x) - model.forward_features(x)).abs().max().item() <= 1e-5
    # dynamic_img_size: the blocks run (and are described) at any multiple of the patch size
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw, dynamic_img_size=True).eval()
    blocks = cut_model(model, "vit_tiny_patch16_224", vit_groups=2)
    infos = describe_blocks(blocks, model_name="vit_tiny_patch16_224", input_size=48, in_chans=3)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (compose(blocks)(x) - model.forward_features(x)).abs().max().item() <= 1e-5
    assert infos[-1].output.shape(48) == (1 + 9, 48)


def test_family_errors_are_one_line() -> None:
    with pytest.raises(PoolError, match="did you mean") as unknown:
        family_of("resnet_18")
    with pytest.raises(PoolError, match="supported families: resnet, mobilenetv3") as unsupported:
        family_of("resnetv2_50")
    for exc in (unknown, unsupported):
        assert "\n" not in str(exc.value)


def test_cut_refuses_the_wrong_model(models: dict) -> None:
    with pytest.raises(PoolError, match="not a timm ResNet"):
        cut_model(models["convnext"], "resnet18")


def test_describe_errors(models: dict) -> None:
    blocks = cut_model(models["resnet"], "resnet18")
    with pytest.raises(PoolError, match="multiple of 32"):
        describe_blocks(blocks, model_name="resnet18", input_size=40, in_chans=3)
    with pytest.raises(PoolError, match="in order"):
        describe_blocks(blocks[1:], model_name="resnet18", input_size=SIZE, in_chans=3)
    with pytest.raises(PoolError, match="not a block"):
        describe_blocks([torch.nn.Identity()], model_name="resnet18", input_size=SIZE, in_chans=3)
    vit = cut_model(models["vit"], MODELS["vit"])
    with pytest.raises(PoolError, match=r"vit_tiny_patch16_224\.0 fails at input_size 32"):
        describe_blocks(vit, model_name=MODELS["vit"], input_size=32, in_chans=3)  # built for 64


def test_describe_leaves_training_flags_alone(models: dict) -> None:
    model = models["mobilenetv3"]
    blocks = cut_model(model, MODELS["mobilenetv3"])
    compose(blocks).train()
    try:
        describe_blocks(blocks, model_name=MODELS["mobilenetv3"], input_size=32, in_chans=3)
        assert all(m.training for b in blocks for m in b.modules())
        assert isinstance(blocks[0], Block) and blocks[0].training
    finally:
        model.eval()
