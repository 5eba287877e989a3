"""`fedemu pools build | pretrain | show | probe` on real pools in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cli import main
from pools import Pool

MODELS = "pool.models=test_resnet,test_efficientnet,test_convnext"


def test_build_then_show_lists_every_block_with_its_signature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pool"
    assert main(["pools", "build", "--set", MODELS, "--set", f"pool.path={path}", "--set", "pool.source=timm"]) == 0
    assert "wrote pool" in capsys.readouterr().out
    assert main(["pools", "show", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    pool = Pool.load(path)
    assert len(pool) == 14 and {i.family for i in pool.infos} == {"resnet", "efficientnet", "convnext"}
    for info in pool.infos:
        line = next(row for row in out if row.startswith(info.name + " "))
        assert f"{info.output.channels}@/{info.output.reduction}" in line
        assert f"{info.input.channels}@/{info.input.reduction}" in line
        assert f"{info.params:,}" in line
    assert any(row.startswith("joins: ") for row in out)


def test_pretrain_writes_a_resumable_pool_and_logs_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pre"
    args = ["pools", "pretrain", "--set", "pool.models=test_resnet,test_convnext", "--set", f"pool.path={path}",
            "--set", "pool.pretrain.num_samples=300", "--set", "pool.pretrain.num_classes=4",
            "--set", "pool.pretrain.epochs=2", "--set", "runtime.progress=lines"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pretrain test_resnet epoch 2/2: mean loss" in out and "pretrain test_convnext epoch 1/2" in out
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and len(manifest["blocks"]) == 9
    assert main(["pools", "probe", "--set", f"pool.path={path}", "--set", "data.dataset=synthetic",
                 "--set", "data.num_samples=200", "--set", "data.num_classes=3"]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines() if r.startswith("test_")]
    assert [r[0] for r in rows] == ["test_resnet", "test_convnext"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])


def test_pool_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pools", "show", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert main(["pools", "build", "--set", "pool.models=resnet1B", "--set", f"pool.path={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "pool.models[0] = 'resnet1B'" in err and "did you mean" in err
    assert not (tmp_path / "x").exists()
