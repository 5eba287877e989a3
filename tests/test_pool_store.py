"""Pool folders on disk: write, load, rebuild blocks exactly, and one-line errors for every kind of damage."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from pools.blocks import cut_model, describe_blocks
from pools.errors import PoolError
from pools.store import MANIFEST, SCHEMA_VERSION, Pool, write_pool
from tests.conftest import REPO

MODELS = {
    "resnet18": {"num_classes": 0, "in_chans": 3},
    "vit_tiny_patch16_224": {"num_classes": 0, "in_chans": 3, "img_size": 32},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """A pool of resnet18 + vit_tiny at input 32, written from models we keep to compare against."""
    torch.manual_seed(0)
    pairs, originals, specs = [], {}, []
    for name, kwargs in MODELS.items():
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        blocks = cut_model(model, name)
        infos = describe_blocks(blocks, model_name=name, input_size=32, in_chans=3)
        pairs.extend(zip(blocks, infos, strict=True))
        originals.update({info.name: block for block, info in zip(blocks, infos, strict=True)})
        specs.append({"model": name, "kwargs": kwargs, "vit_groups": 4})
    path = tmp_path_factory.mktemp("store") / "pool"
    source = {"kind": "test", "models": specs, "note": "written by test_pool_store"}
    pool = write_pool(path, blocks=pairs, input_size=32, in_chans=3, source=source)
    return pool, pairs, originals


@pytest.fixture
def damaged(built, tmp_path: Path) -> Path:
    """A fresh copy of the pool folder to damage."""
    pool, _, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(pool.path, copy)
    return copy


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest))


def _load_error(path: Path) -> str:
    with pytest.raises(PoolError) as info:
        Pool.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"pool {path}")
    return message


def test_rebuilt_blocks_equal_the_originals(built) -> None:
    pool, pairs, originals = built
    loaded = Pool.load(pool.path)
    assert loaded.names() == [info.name for _, info in pairs] and len(loaded) == 9
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h_old = h_new = x
        for name in loaded.names():
            if loaded.info(name).index == 0:
                h_old = h_new = x
            block = loaded.block(name)
            assert block is not originals[name]
            h_old, h_new = originals[name](h_old), block(h_new)
            assert torch.equal(h_old, h_new), name
            sd_old, sd_new = originals[name].state_dict(), block.state_dict()
            assert sd_old.keys() == sd_new.keys()
            assert all(torch.equal(sd_old[k], sd_new[k]) for k in sd_old)
    assert loaded.block("resnet18.2") is loaded.block("resnet18.2")  # the cut model is cached per source model


def test_manifest_round_trip(built) -> None:
    pool, pairs, _ = built
    loaded = Pool.load(pool.path)
    assert loaded.infos == [info for _, info in pairs]
    assert (loaded.input_size, loaded.in_chans) == (32, 3)
    assert loaded.source == pool.source and loaded.source["note"] == "written by test_pool_store"
    manifest = _manifest(pool.path)
    assert manifest["schema_version"] == SCHEMA_VERSION
    entry = manifest["blocks"][0]
    assert entry["file"] == "resnet18.0.safetensors"
    assert entry["tensors"]["conv1.weight"] == {"shape": [64, 3, 7, 7], "dtype": "F32"}
    files = sorted(p.name for p in pool.path.iterdir())
    assert files == sorted([MANIFEST] + [f"{name}.safetensors" for name in loaded.names()])
    with safetensors.safe_open(str(pool.path / "resnet18.0.safetensors"), framework="pt") as fh:
        assert fh.metadata()["block"] == "resnet18.0"
    assert loaded.model_spec("vit_tiny_patch16_224")["kwargs"]["img_size"] == 32
    with pytest.raises(PoolError, match=r"did you mean 'resnet18\.2'"):
        loaded.info("resnet18.22")


def test_truncated_file(damaged: Path) -> None:
    file = damaged / "resnet18.2.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    message = _load_error(damaged)
    assert "block 'resnet18.2' file resnet18.2.safetensors is truncated or corrupt" in message
    assert message.endswith("rebuild the pool")


def test_file_cut_inside_its_header(damaged: Path) -> None:
    file = damaged / "vit_tiny_patch16_224.1.safetensors"
    file.write_bytes(file.read_bytes()[:5])
    assert "block 'vit_tiny_patch16_224.1' file vit_tiny_patch16_224.1.safetensors is truncated" in _load_error(damaged)


def test_missing_file(damaged: Path) -> None:
    (damaged / "resnet18.4.safetensors").unlink()
    assert "block 'resnet18.4' file resnet18.4.safetensors is missing" in _load_error(damaged)


def test_wrong_shape_in_manifest(damaged: Path) -> None:
    manifest = _manifest(damaged)
    manifest["blocks"][1]["tensors"]["layer1.0.conv1.weight"]["shape"] = [64, 64, 3, 4]
    _write_manifest(damaged, manifest)
    message = _load_error(damaged)
    assert "block 'resnet18.1' file resnet18.1.safetensors does not match the manifest" in message
    assert "layer1.0.conv1.weight" in message


def test_bad_json(damaged: Path) -> None:
    (damaged / MANIFEST).write_text('{"schema_version": 1, "blocks": [')
    assert "manifest.json is not valid JSON" in _load_error(damaged)


def test_unknown_schema_version(damaged: Path) -> None:
    manifest = _manifest(damaged)
    manifest["schema_version"] = 99
    _write_manifest(damaged, manifest)
    assert "schema_version 99" in _load_error(damaged)


def test_missing_required_key(damaged: Path) -> None:
    manifest = _manifest(damaged)
    del manifest["in_chans"]
    _write_manifest(damaged, manifest)
    assert "lacks key(s) in_chans" in _load_error(damaged)


def test_extra_tensor_in_file(damaged: Path) -> None:
    file = damaged / "resnet18.0.safetensors"
    state = safetensors.torch.load_file(str(file))
    state["smuggled"] = torch.zeros(3)
    safetensors.torch.save_file(state, str(file))
    message = _load_error(damaged)
    assert "block 'resnet18.0' file resnet18.0.safetensors" in message and "unlisted tensor(s) smuggled" in message


def test_missing_tensor_in_file(damaged: Path) -> None:
    file = damaged / "vit_tiny_patch16_224.0.safetensors"
    state = safetensors.torch.load_file(str(file))
    del state["cls_token"]
    safetensors.torch.save_file(state, str(file))
    message = _load_error(damaged)
    assert "block 'vit_tiny_patch16_224.0'" in message and "lacks tensor(s) cls_token" in message


def test_flipped_bytes_caught_by_checksum(damaged: Path) -> None:
    file = damaged / "resnet18.3.safetensors"
    data = bytearray(file.read_bytes())
    data[-8:] = bytes(8)  # same length, header intact: only the sha256 notices
    file.write_bytes(bytes(data))
    pool = Pool.load(damaged)  # headers are fine
    with pytest.raises(PoolError, match=r"block 'resnet18.3' file resnet18.3.safetensors .* sha256"):
        pool.block("resnet18.3")
    with pytest.raises(PoolError, match="sha256"):
        Pool.load(damaged, verify=True)


def test_not_a_pool(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match="no such folder"):
        Pool.load(tmp_path / "nowhere")
    with pytest.raises(PoolError, match=r"manifest\.json is missing"):
        Pool.load(tmp_path)


def test_write_is_atomic(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pairs, _ = built
    real = safetensors.torch.save_file
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    source = {"models": [{"model": m, "kwargs": k} for m, k in MODELS.items()]}
    path = tmp_path / "pool"
    with pytest.raises(OSError, match="disk full"):
        write_pool(path, blocks=pairs, input_size=32, in_chans=3, source=source)
    assert len(calls) == 3
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no half pool, no leftover temp folder

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    first = write_pool(path, blocks=pairs[:2], input_size=32, in_chans=3, source=source)
    with pytest.raises(PoolError, match="already exists; pass overwrite=True"):
        write_pool(path, blocks=pairs, input_size=32, in_chans=3, source=source)
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError):
        write_pool(path, blocks=pairs, input_size=32, in_chans=3, source=source, overwrite=True)
    assert Pool.load(path).names() == first.names()  # a failed overwrite keeps the old pool
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert len(write_pool(path, blocks=pairs, input_size=32, in_chans=3, source=source, overwrite=True)) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]


def _pickle_uses(path: Path) -> list[str]:
    """``torch.load``/``torch.save`` calls and pickle-family imports in one module."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in banned_modules]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in banned_modules or node.module == "torch.serialization":
                found.append(node.module)
            if node.module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append("from torch import load/save")
        elif isinstance(node, ast.Attribute) and node.attr in ("load", "save"):
            if isinstance(node.value, ast.Name) and node.value.id == "torch":
                found.append(f"torch.{node.attr} at line {node.lineno}")
    return found


def test_no_pickle_in_pools(tmp_path: Path) -> None:
    modules = sorted((REPO / "pools").glob("*.py"))
    assert {"store.py", "sources.py", "pretrain.py"} <= {p.name for p in modules}
    assert {p.name: _pickle_uses(p) for p in modules} == {p.name: [] for p in modules}
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, pickle\nimport safetensors.torch\nsafetensors.torch.load(b'')\ntorch.load('x')\n")
    assert _pickle_uses(probe) == ["pickle", "torch.load at line 4"]  # the checker sees them
