"""A SIGKILLed run keeps every finished round readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import REPO, fedemu_env


def _rounds_so_far(path: Path) -> int:
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            return len(f["/rounds/table"])
    except (OSError, KeyError):
        return 0  # not created yet, or caught between creation and SWMR start


def test_sigkill_mid_run_keeps_finished_rounds(tmp_path: Path) -> None:
    trace = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "emulator", "run", str(REPO / "examples" / "fedavg-digits.toml")]
    for s in ["rounds=100000", "runtime.progress=lines", "runtime.threads=1", f"output.trace={trace}",
              "data.partition.num_clients=20", "clients_per_round=3"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=fedemu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _rounds_so_far(trace) < 4:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run wrote no rounds in time"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # The killed writer left its SWMR flag set: readers open with swmr=True (docs/trace-schema.md).
    with h5py.File(trace, "r", libver="latest", swmr=True) as f:
        rounds = f["/rounds/table"][:]
        records = f["/client_rounds/table"][:]
        kinds = [k.decode() for k in f["/events/table"][:]["kind"]]
        assert "[data.partition]" in f.attrs["config"]
    n = len(rounds)
    assert n >= 4
    assert rounds["round"].tolist() == list(range(n))
    assert np.isfinite(rounds["test_accuracy"]).all()
    # Every finished round has all of its client rows.
    assert len(records) == 3 * n
    assert np.array_equal(np.bincount(records["round"], minlength=n), np.full(n, 3))
    assert kinds[0] == "start" and "finish" not in kinds
