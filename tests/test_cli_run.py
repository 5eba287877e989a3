"""The run command end to end: progress lines, the summary table, and the 3-rank quickstart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from emulator.cli import main
from tests.conftest import REPO, fedemu_env


def test_batch_log_gets_one_line_per_round_then_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.h5"
    code = main(["run", str(REPO / "examples" / "fedavg-digits.toml"), "--set", "rounds=3",
                 "--set", "runtime.progress=lines", "--set", f"output.trace={trace}"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[1] for line in out if line.startswith("round ")] == ["1/3", "2/3", "3/3"]
    assert any(line.startswith("fedemu: fedavg-digits: fedavg on digits, 3 rounds") for line in out)
    assert out[-1] == f"trace: {trace}"
    assert trace.is_file()


def test_existing_trace_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.h5"
    trace.write_bytes(b"precious")
    assert main(["run", "--set", f"output.trace={trace}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert trace.read_bytes() == b"precious"


@pytest.mark.slow
def test_quickstart_on_three_ranks_learns_digits(tmp_path: Path) -> None:
    """What `make run` does, with the trace redirected."""
    trace = tmp_path / "q.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "run", str(REPO / "examples" / "fedavg-digits.toml"), "--ranks", "3",
         "--set", f"output.trace={trace}"],
        capture_output=True, text=True, env=fedemu_env(), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final test accuracy" in proc.stdout
    with h5py.File(trace, "r") as f:
        acc = f["/rounds/table"][:]["test_accuracy"]
        assert int(f.attrs["ranks"]) == 3
    assert acc[-1] > 0.8  # 10 classes: chance is 0.1
