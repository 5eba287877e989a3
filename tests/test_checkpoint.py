"""Checkpoints: the file format, finding the run to resume, and an in-process stop + resume."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from emulator import checkpoint
from emulator.comm import SingleComm
from emulator.config import load_config, to_toml
from emulator.errors import UserError
from emulator.runner import run
from tests.conftest import REPO, fedemu_env

CONFIG = REPO / "examples" / "fedavg-digits.toml"
FAST = ["data.partition.num_clients=20", "clients_per_round=4", "train.local_epochs=1", "runtime.threads=1",
        "runtime.progress=none"]
# Columns that depend on the wall clock, not on what was computed.
CLOCK = {"wall_time_s", "unix_time_s", "accounting_s", "meter_short"}


def _cfg(trace: Path, *more: str):  # type: ignore[no-untyped-def]
    return load_config(CONFIG, [*FAST, f"output.trace={trace}", *more])


def test_save_read_keep_and_temporary_files(tmp_path: Path) -> None:
    folder = tmp_path / "x.ckpt"
    for r in range(4):
        checkpoint.save(folder, round=r, arrays={"a/w": np.arange(5, dtype=np.float32) * r,
                                                 "b": np.zeros(0, np.int64)},
                        meta={"note": f"r{r}", "nested": {"k": [1, 2]}}, keep=2)
    (folder / ".round-000009.safetensors.tmp-1").write_bytes(b"half written")
    assert sorted(p.name for p in folder.glob("round-*")) == ["round-000002.safetensors", "round-000003.safetensors"]
    got = checkpoint.latest(folder)
    assert got is not None and got.round == 3
    assert got.meta["note"] == "r3" and got.meta["nested"] == {"k": [1, 2]}
    np.testing.assert_array_equal(got.section("a")["w"], np.arange(5, dtype=np.float32) * 3)
    assert got.arrays["b"].shape == (0,)
    peeked = checkpoint.peek(folder)
    assert peeked is not None and peeked[0] == got.path and peeked[1]["round"] == 3
    assert checkpoint.latest(tmp_path / "none.ckpt") is None


def test_damaged_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    folder = tmp_path / "x.ckpt"
    path = checkpoint.save(folder, round=0, arrays={"w": np.ones(64, np.float32)}, meta={})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt") as err:
        checkpoint.read(path)
    assert "\n" not in str(err.value)
    path.write_bytes(bytes(data[:20]))  # truncated
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.read(path)


def test_resolve_resume_accepts_trace_folder_and_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "job-7"
    run_dir.mkdir()
    trace = run_dir / "trace.h5"
    trace.write_bytes(b"")
    checkpoint.checkpoint_dir(trace).mkdir()
    assert checkpoint.checkpoint_dir(trace) == run_dir / "trace.ckpt"
    assert checkpoint.resolve_resume(trace) == trace
    assert checkpoint.resolve_resume(run_dir / "trace.ckpt") == trace
    assert checkpoint.resolve_resume(run_dir) == trace
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no trace with a checkpoint"):
        checkpoint.resolve_resume(empty)
    for name in ("a.h5", "b.h5"):
        (empty / name).write_bytes(b"")
        checkpoint.checkpoint_dir(empty / name).mkdir()
    with pytest.raises(UserError, match="several runs in it"):
        checkpoint.resolve_resume(empty)
    with pytest.raises(UserError, match="no such"):
        checkpoint.resolve_resume(tmp_path / "missing")


def test_config_differences_allow_only_how_long_and_how(tmp_path: Path) -> None:
    base = _cfg(tmp_path / "t.h5")
    saved = to_toml(base)
    longer = tomllib.loads(to_toml(_cfg(tmp_path / "u.h5", "rounds=50", "runtime.threads=2", "checkpoint.keep=5")))
    assert checkpoint.config_differences(saved, longer) == []
    other = tomllib.loads(to_toml(_cfg(tmp_path / "t.h5", "seed=4", "train.lr=0.1")))
    assert [d[0] for d in checkpoint.config_differences(saved, other)] == ["seed", "train.lr"]


def _tables(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return {k: f[f"{k}/table"][:] for k in ("rounds", "client_rounds", "events")}


def _assert_same_rounds(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key in ("rounds", "client_rounds"):
        assert len(a[key]) == len(b[key]), key
        for col in a[key].dtype.names:
            if col in CLOCK:
                continue
            if a[key].dtype[col].kind == "f":
                np.testing.assert_allclose(a[key][col], b[key][col], rtol=1e-6, err_msg=f"{key}.{col}")
            else:
                assert np.array_equal(a[key][col], b[key][col]), f"{key}.{col}"


def test_stopped_run_resumes_to_the_uninterrupted_trace(tmp_path: Path) -> None:
    whole = tmp_path / "whole.h5"
    run(_cfg(whole, "rounds=6"), SingleComm())
    part = tmp_path / "part.h5"
    run(_cfg(part, "rounds=3"), SingleComm())  # a finished run: checkpointed at its end
    assert checkpoint.latest(checkpoint.checkpoint_dir(part)).round == 2  # type: ignore[union-attr]
    summary = run(_cfg(part, "rounds=6", "output.overwrite=true"), SingleComm(), resume=True)
    assert summary is not None and summary.rounds["round"].tolist() == list(range(6))
    a, b = _tables(whole), _tables(part)
    _assert_same_rounds(a, b)
    kinds = [k.decode() for k in b["events"]["kind"]]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds.count("finish") == 2
    with h5py.File(part, "r") as f:
        assert int(f.attrs["resumes"]) == 1
        assert tomllib.loads(str(f.attrs["config"]))["rounds"] == 6


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path: Path) -> None:
    """A round that finished but was not checkpointed (every = 2) is run again, not duplicated."""
    whole = tmp_path / "whole.h5"
    run(_cfg(whole, "rounds=5"), SingleComm())
    part = tmp_path / "part.h5"
    run(_cfg(part, "rounds=3", "checkpoint.every=2"), SingleComm())
    folder = checkpoint.checkpoint_dir(part)
    (folder / "round-000002.safetensors").unlink()  # as if killed before the end-of-run checkpoint
    assert checkpoint.latest(folder).round == 1  # type: ignore[union-attr]
    assert len(_tables(part)["rounds"]) == 3
    run(_cfg(part, "rounds=5", "checkpoint.every=2", "output.overwrite=true"), SingleComm(), resume=True)
    _assert_same_rounds(_tables(whole), _tables(part))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator", *args], capture_output=True, text=True,
                          env=fedemu_env(), cwd=REPO, timeout=300)


def test_cli_resume_checks_the_config_and_knows_when_it_is_done(tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    sets = [a for s in [*FAST, "rounds=2", f"output.trace={trace}"] for a in ("--set", s)]
    assert _cli("run", str(CONFIG), *sets).returncode == 0
    done = _cli("run", "--resume", str(trace))
    assert done.returncode == 0 and "already has all 2 rounds" in done.stderr
    changed = _cli("run", str(CONFIG), *sets, "--set", "seed=9", "--resume", str(tmp_path))
    assert changed.returncode == 2
    assert changed.stderr.strip().count("\n") == 0
    assert "seed = 9 differs from the checkpointed run's 0" in changed.stderr
    more = _cli("run", "--resume", str(tmp_path), "--set", "rounds=3")
    assert more.returncode == 0, more.stderr
    with h5py.File(trace, "r") as f:
        assert f["rounds/table"]["round"].tolist() == [0, 1, 2]
    missing = _cli("run", "--resume", str(tmp_path / "nope.h5"))
    assert missing.returncode == 2 and "no checkpoint yet; give the CONFIG" in missing.stderr
