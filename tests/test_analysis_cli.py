"""`fedemu watch` and `fedemu reproduce` on real traces."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import analysis
from analysis.reproduce import CLAIMS, _accuracy, _energy, _memory, reproduction_rows
from analysis.watch import watch
from emulator.cli import main
from tests.conftest import REPO, fedemu_env


def test_watch_a_finished_run_prints_its_last_round(small_traces: list[Path]) -> None:
    out = io.StringIO()
    assert watch(small_traces[0], interval_s=0.01, stream=out) == 0
    lines = out.getvalue().splitlines()
    with h5py.File(small_traces[0], "r", swmr=True) as f:
        last = f["/rounds/table"][-1]
    assert lines[0].startswith(f"round {int(last['round']) + 1}/4: test_acc {float(last['test_accuracy']):.4f}")
    assert lines[-1] == "run finished"


def test_watch_follows_a_live_run(tmp_path: Path) -> None:
    trace = tmp_path / "live.h5"
    cmd = [sys.executable, "-m", "emulator", "run", str(REPO / "examples" / "fedavg-digits.toml"), "--set", "rounds=6",
           "--set", "runtime.progress=none", "--set", f"output.trace={trace}", "--set", "runtime.threads=1"]
    proc = subprocess.Popen(cmd, env=fedemu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if trace.exists():
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.1)
        out = io.StringIO()
        assert watch(trace, interval_s=0.05, stream=out, max_polls=4000) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "run finished"
    assert lines[-2].startswith("round 6/6:")


def test_reproduce_says_what_is_not_measurable_yet(
    small_traces: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rows = reproduction_rows([analysis.open(p) for p in small_traces])
    assert len(rows) == len(CLAIMS) == 10
    assert all(r["measured"].startswith("not yet measurable: no '") for r in rows)
    assert main(["reproduce", str(small_traces[0].parent)]) == 0
    out = capsys.readouterr().out
    assert "up to -79.5%" in out and "not yet measurable: no 'fedstitch' run in the suite" in out
    assert main(["reproduce", str(small_traces[0].parent / "nothing-here")]) == 2


def test_claim_measures_agree_with_the_trace(small_traces: list[Path]) -> None:
    a, b = (analysis.open(p) for p in small_traces)
    with h5py.File(small_traces[0], "r", swmr=True) as fa, h5py.File(small_traces[1], "r", swmr=True) as fb:
        ra, rb = fa["/rounds/table"][:], fb["/rounds/table"][:]
        ca, cb = fa["/client_rounds/table"][:], fb["/client_rounds/table"][:]
    acc_a, acc_b = ra["test_accuracy"][-1], rb["test_accuracy"][-1]
    assert _accuracy(a, b).startswith(f"{(acc_a - acc_b) * 100:+.2f} pp")
    assert _energy(a, b) == f"{(ca['energy_j'].sum() - cb['energy_j'].sum()) / cb['energy_j'].sum() * 100:+.1f}%"
    peak_a = ca["peak_memory_bytes"][ca["status"] == 0].max()
    peak_b = cb["peak_memory_bytes"][cb["status"] == 0].max()
    assert _memory(a, b) == f"{(peak_a - peak_b) / peak_b * 100:+.1f}%"
    assert np.isfinite(acc_a) and np.isfinite(acc_b)


def test_report_command_writes_both_files(small_traces: list[Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *map(str, small_traces), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "index.html").is_file()
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.h5" in err
