"""Pool sources: the registry, build_pool from timm (random init, weights file, hub offline), bad names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from pools.errors import PoolError
from pools.sources import SOURCES, build_pool, create_pool, create_timm, get_source
from pools.store import Pool
from tests.conftest import fedemu_env

PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _save_weights(name: str, file: Path, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(name, **kwargs).state_dict().items()}
    safetensors.torch.save_file(state, str(file))
    return state


def test_registry_names_and_did_you_mean() -> None:
    assert {"timm", "pretrain"} <= set(SOURCES)
    assert get_source("timm") is build_pool
    with pytest.raises(PoolError, match=r"unknown pool source 'tim'; did you mean 'timm'"):
        get_source("tim")


def test_build_pool_random_init(tmp_path: Path) -> None:
    pool = create_pool("timm", tmp_path / "p", models=["test_resnet", "test_vit"], input_size=32, vit_groups=2)
    assert pool.models() == ["test_resnet", "test_vit"]
    assert pool.names()[-2:] == ["test_vit.0", "test_vit.1"] and len(pool) == 5 + 2
    specs = {s["model"]: s for s in pool.source["models"]}
    assert pool.source["kind"] == "timm" and specs["test_resnet"]["pretrained"] == "none"
    assert specs["test_vit"]["kwargs"] == {"num_classes": 0, "in_chans": 3, "img_size": 32}
    assert pool.info("test_vit.1").output.kind == "tokens" and pool.info("test_resnet.4").output.reduction == 32
    again = Pool.load(pool.path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = again.block("test_resnet.1")(again.block("test_resnet.0")(x))
    assert out.shape == (2, *pool.info("test_resnet.1").output.shape(32)) and torch.isfinite(out).all()
    with pytest.raises(PoolError, match="already exists"):
        build_pool(tmp_path / "p", models=["test_resnet"], input_size=32)


def test_build_pool_from_a_weights_file(tmp_path: Path) -> None:
    file = tmp_path / "test_resnet.safetensors"
    saved = _save_weights("test_resnet", file, seed=7)  # with its 1000-class head: dropped on loading
    pool = build_pool(tmp_path / "p", models=["test_resnet"], pretrained=file, input_size=32)
    loaded = Pool.load(pool.path)
    compared = 0
    for name in loaded.names():
        for key, value in loaded.block(name).state_dict().items():
            assert torch.equal(value, saved[key]), key
            compared += 1
    assert compared == len(saved) - 2  # every tensor but fc.weight/fc.bias
    record = loaded.source["models"][0]["pretrained"]
    assert record["file"] == str(file.resolve()) and len(record["sha256"]) == 64
    fresh = build_pool(tmp_path / "q", models=["test_resnet"], input_size=32)
    key = "conv1.0.weight"
    assert not torch.equal(fresh.block("test_resnet.0").state_dict()[key], saved[key])  # weights really loaded


def test_weights_file_of_another_architecture(tmp_path: Path) -> None:
    file = tmp_path / "vit.safetensors"
    _save_weights("test_vit", file, seed=0, num_classes=0)
    with pytest.raises(PoolError, match=r"model 'test_resnet': weights file .*vit.safetensors does not fit"):
        build_pool(tmp_path / "p", models=["test_resnet"], pretrained=file, input_size=32)
    with pytest.raises(PoolError, match="does not exist"):
        build_pool(tmp_path / "p", models=["test_resnet"], pretrained=tmp_path / "nope.safetensors", input_size=32)
    with pytest.raises(PoolError, match="give a dict"):
        build_pool(tmp_path / "p", models=["test_resnet", "test_vit"], pretrained=file, input_size=32)
    assert not (tmp_path / "p").exists()


def test_hub_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(PoolError) as info:
        build_pool(tmp_path / "p", models=["resnet18"], pretrained="hub", input_size=32)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and message.startswith("model 'resnet18': pretrained='hub'")
    assert "timm/resnet18" in message and "HF_HUB_OFFLINE" in message and str(tmp_path / "hf") in message
    assert "pretrained=<path to a .safetensors file>" in message
    assert not (tmp_path / "p").exists()


def test_hub_unreachable_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", *PROXIES):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(PoolError, match=r"model 'test_vit': .*no network \(127.0.0.1:9 unreachable"):
        create_timm("test_vit", pretrained="hub", input_size=32, in_chans=3)
    assert time.monotonic() - start < 10


HUB_SCRIPT = """
import json, sys
from pools.errors import PoolError
from pools.sources import build_pool
out = {}
pool = build_pool(sys.argv[1] + "/cached", models=["test_resnet"], pretrained="hub", input_size=32)
out["weight"] = pool.block("test_resnet.0").state_dict()["conv1.0.weight"].flatten()[:5].tolist()
try:
    build_pool(sys.argv[1] + "/uncached", models=["test_vit"], pretrained="hub", input_size=32)
except PoolError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def test_hub_uses_the_local_cache_offline(tmp_path: Path) -> None:
    """timm's own hub loading, in a fresh process: a populated HF cache works offline, an empty one fails fast."""
    snapshot = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(commit)
    saved = _save_weights("test_resnet", snapshot / "snapshots" / commit / "model.safetensors", seed=3)
    env = fedemu_env()
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(var, None)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["weight"] == pytest.approx(saved["conv1.0.weight"].flatten()[:5].tolist())
    assert out["error"].startswith("model 'test_vit': pretrained='hub' weights (Hugging Face repo timm/test_vit")
    assert time.monotonic() - start < 60
    assert os.path.isdir(tmp_path / "cached") and not os.path.exists(tmp_path / "uncached")


def test_unknown_model_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(PoolError, match=r"unknown timm model 'resnet81'; did you mean .*resnet18"):
        build_pool(tmp_path / "p", models=["resnet18", "resnet81"], input_size=32)
    with pytest.raises(PoolError, match="cannot be cut into blocks"):
        build_pool(tmp_path / "p", models=["test_byobnet"], input_size=32)
    with pytest.raises(PoolError, match="more than once"):
        build_pool(tmp_path / "p", models=["test_vit", "test_vit"], input_size=32)
    assert not (tmp_path / "p").exists()
