"""Pretraining pools on a synthetic source dataset: pool written, resumable, deterministic; linear probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from pools.errors import PoolError
from pools.pretrain import _load_checkpoint, _make_optimizer, _save_checkpoint, linear_probe, pretrain_pool
from pools.sources import build_pool
from pools.store import Pool

MODEL = "test_resnet"
NUM_CLASSES = 4
BATCH = 64
# CPU: the resume test compares weights bit for bit, which GPU kernels do not promise
SETTINGS = dict(
    models=[MODEL], num_classes=NUM_CLASSES, epochs=2, batch_size=BATCH, lr=0.05, seed=11, input_size=32, device="cpu"
)


def gratings(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional images: a grating whose orientation is the class, random phase/frequency/colour + noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.pi * y / NUM_CLASSES + rng.normal(0, 0.08, n)
    freq = rng.uniform(0.25, 0.45, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = np.sin(
        freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
        + phase[:, None, None]
    )
    colour = rng.uniform(0.3, 1.0, (n, 3))
    img = 0.5 + 0.35 * wave[:, None] * colour[:, :, None, None] + rng.normal(0, 0.25, (n, 3, size, size))
    return np.clip(img * 255, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="module")
def data():
    x, y = gratings(384, seed=0)
    x_test, y_test = gratings(256, seed=1)
    return x, y, x_test, y_test


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory: pytest.TempPathFactory):
    """One full run; returns (pool, batches seen as (epoch, batch) pairs)."""
    x, y, _, _ = data
    seen: list[tuple[int, int]] = []
    path = tmp_path_factory.mktemp("pretrain") / "pool"
    pool = pretrain_pool(
        path,
        x=x,
        y=y,
        dataset={"name": "gratings", "seed": 0},
        progress=False,
        on_batch=lambda **kw: seen.append((kw["epoch"], kw["batch"])),
        **SETTINGS,
    )
    return pool, seen


def _weights(pool: Pool) -> dict[str, torch.Tensor]:
    out = {}
    for info in pool.infos:
        out.update(safetensors.torch.load_file(str(pool.path / f"{info.name}.safetensors")))
    return out


def test_pretrain_writes_a_pool(uninterrupted, data) -> None:
    pool, seen = uninterrupted
    x = data[0]
    batches = len(x) // BATCH
    assert seen == [(e, b) for e in range(2) for b in range(batches)]
    assert isinstance(pool, Pool) and pool.names() == [f"{MODEL}.{i}" for i in range(5)]
    assert not pool.path.with_name("pool.partial").exists()  # checkpoints deleted once the pool is written
    src = Pool.load(pool.path).source
    assert src["kind"] == "pretrain" and src["epochs"] == 2 and src["seed"] == 11
    assert src["dataset"]["name"] == "gratings" and src["dataset"]["samples"] == len(x)
    assert src["models"][0]["kwargs"] == {"num_classes": NUM_CLASSES, "in_chans": 3}
    mean = x.astype(np.float64).mean(axis=(0, 2, 3)) / 255
    assert src["models"][0]["mean"] == pytest.approx(mean.tolist()) == src["normalize"]["mean"]


def test_interrupt_and_resume_equals_uninterrupted(uninterrupted, data, tmp_path: Path) -> None:
    pool_a, _ = uninterrupted
    x, y, _, _ = data
    path = tmp_path / "pool"
    ckpt = tmp_path / "ckpt"
    first: list[int] = []
    stopped = pretrain_pool(
        path,
        x=x,
        y=y,
        checkpoint_dir=ckpt,
        progress=False,
        max_epochs_this_call=1,
        on_batch=lambda **kw: first.append(kw["epoch"]),
        **SETTINGS,
    )
    assert stopped is None and not path.exists()
    assert set(first) == {0} and len(first) == len(x) // BATCH
    assert (ckpt / "state.json").is_file() and list(ckpt.glob("*.safetensors"))

    with pytest.raises(PoolError, match="different pretraining run"):  # other settings never mix with a checkpoint
        pretrain_pool(path, x=x, y=y, checkpoint_dir=ckpt, progress=False, **{**SETTINGS, "lr": 0.01})

    second: list[int] = []
    pool_b = pretrain_pool(
        path,
        x=x,
        y=y,
        checkpoint_dir=ckpt,
        progress=False,
        on_batch=lambda **kw: second.append(kw["epoch"]),
        **SETTINGS,
    )
    assert set(second) == {1} and len(second) == len(x) // BATCH  # epoch 1 was not redone
    assert pool_b is not None and not ckpt.exists()
    a, b = _weights(pool_a), _weights(pool_b)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run


def test_adamw_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    opt = _make_optimizer("adamw", model, 1e-3, 0.01)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    _save_checkpoint(tmp_path / "c.safetensors", model, opt, epochs_done=1, fp="x")
    clone = timm.create_model(MODEL, num_classes=3)
    opt2 = _make_optimizer("adamw", clone, 1e-3, 0.01)
    _load_checkpoint(tmp_path / "c.safetensors", clone, opt2, "cpu")
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 10
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters(), strict=True))


def test_bad_inputs(data, tmp_path: Path) -> None:
    x, y, _, _ = data
    with pytest.raises(PoolError, match="uint8 array"):
        pretrain_pool(tmp_path / "p", x=x.astype(np.float32), y=y, **SETTINGS)
    with pytest.raises(PoolError, match=r"labels must lie in \[0, num_classes=4\)"):
        pretrain_pool(tmp_path / "p", x=x, y=y + 1, **SETTINGS)
    with pytest.raises(PoolError, match="optimizer"):
        pretrain_pool(tmp_path / "p", x=x, y=y, optimizer="lbfgs", **SETTINGS)


def test_linear_probe_pretrained_beats_random(uninterrupted, data, tmp_path: Path) -> None:
    pretrained, _ = uninterrupted
    x, y, x_test, y_test = data
    torch.manual_seed(0)  # build_pool draws its random init from torch's global generator
    random = build_pool(tmp_path / "random", models=[MODEL], input_size=32)
    chain = [f"{MODEL}.{i}" for i in range(3)]
    acc_pre = linear_probe(pretrained, chain, x, y, x_test, y_test, NUM_CLASSES)
    acc_rnd = linear_probe(random, chain, x, y, x_test, y_test, NUM_CLASSES)
    assert acc_pre > acc_rnd + 0.15, (acc_pre, acc_rnd)
    assert acc_pre > 0.8


def test_linear_probe_stitched_chain(data, tmp_path: Path) -> None:
    x, y, x_test, y_test = data
    pool = build_pool(tmp_path / "mixed", models=[MODEL, "test_vit"], input_size=32, vit_groups=2)
    chain = [f"{MODEL}.0", f"{MODEL}.1", "test_vit.1"]  # map -> tokens through a stitching layer
    acc = linear_probe(pool, chain, x[:128], y[:128], x_test[:64], y_test[:64], NUM_CLASSES)
    assert 0.0 <= acc <= 1.0
    assert acc == linear_probe(pool, chain, x[:128], y[:128], x_test[:64], y_test[:64], NUM_CLASSES)  # seeded
    with pytest.raises(PoolError, match="does not take the image"):
        linear_probe(pool, ["test_vit.1"], x, y, x_test, y_test, NUM_CLASSES)


def test_killed_mid_epoch_redoes_only_that_epoch(uninterrupted, data, tmp_path: Path) -> None:
    pool_a, _ = uninterrupted
    x, y, _, _ = data

    def crash(**kw) -> None:
        if (kw["epoch"], kw["batch"]) == (1, 2):
            raise KeyboardInterrupt  # as if the job were killed during the second epoch

    with pytest.raises(KeyboardInterrupt):
        pretrain_pool(tmp_path / "pool", x=x, y=y, progress=False, on_batch=crash, **SETTINGS)
    assert not (tmp_path / "pool").exists() and (tmp_path / "pool.partial").is_dir()
    seen: list[tuple[int, int]] = []
    pool_b = pretrain_pool(
        tmp_path / "pool",
        x=x,
        y=y,
        progress=False,
        on_batch=lambda **kw: seen.append((kw["epoch"], kw["batch"])),
        **SETTINGS,
    )
    assert seen == [(1, b) for b in range(len(x) // BATCH)]
    a, b = _weights(pool_a), _weights(pool_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
