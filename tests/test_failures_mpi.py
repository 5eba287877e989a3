"""Real MPI jobs that get killed, signalled, fail or hang: resume, stop, /events, the watchdog.

Each test launches ``fedemu run --ranks 3`` (mpiexec, 1 server + 2 workers) as a user would.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from emulator import checkpoint
from emulator.stopping import EXIT_INTERRUPTED
from emulator.watchdog import EXIT_TIMEOUT
from tests.conftest import REPO, fedemu_env

pytestmark = [pytest.mark.mpi]

CONFIG = REPO / "examples" / "fedavg-digits.toml"
SETTINGS = ["data.partition.num_clients=20", "clients_per_round=4", "train.local_epochs=1",
            "runtime.threads=1", "runtime.progress=lines"]
CLOCK = {"wall_time_s", "unix_time_s", "accounting_s", "rank", "meter_short"}  # wall-clock facts
RTOL = 1e-5  # rank partial sums add in another order (see tests/test_determinism.py)


def _cmd(trace: Path, *more: str, ranks: int = 3, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "emulator", "run"]
    cmd += ["--resume", str(trace)] if resume else [str(CONFIG)]
    for s in [*([] if resume else [*SETTINGS, f"output.trace={trace}"]), *more]:
        cmd += ["--set", s]
    return [*cmd, "--ranks", str(ranks)]


def _start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # A session of its own, so a kill reaches mpiexec and every rank.
    return subprocess.Popen(cmd, env=env or fedemu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=REPO)


def _rounds(path: Path) -> int:
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return len(f["/rounds/table"])
    except (OSError, KeyError):
        return 0


def _wait_rounds(proc: subprocess.Popen[str], trace: Path, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _rounds(trace) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {n} rounds after {timeout} s"
        time.sleep(0.05)


def _tables(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return {k: f[f"{k}/table"][:] for k in ("rounds", "client_rounds", "events")}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key in ("rounds", "client_rounds"):
        assert len(a[key]) == len(b[key]), key
        for col in a[key].dtype.names:
            if col in CLOCK:
                continue
            if a[key].dtype[col].kind == "f":
                np.testing.assert_allclose(a[key][col], b[key][col], rtol=RTOL, err_msg=f"{key}.{col}")
            else:
                assert np.array_equal(a[key][col], b[key][col]), f"{key}.{col}"


def _events(path: Path) -> list[tuple[str, int, int, str]]:
    ev = _tables(path)["events"]
    return [(k.decode(), int(r), int(rd), m.decode()) for k, r, rd, m in
            zip(ev["kind"], ev["rank"], ev["round"], ev["message"], strict=True)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    trace = tmp_path_factory.mktemp("whole") / "whole.h5"
    proc = subprocess.run(_cmd(trace, "rounds=12"), capture_output=True, text=True, env=fedemu_env(),
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _tables(trace)


def test_sigkill_at_a_random_round_then_resume_gives_the_same_rounds(
    tmp_path: Path, uninterrupted: dict[str, np.ndarray]
) -> None:
    kill_after = random.Random(os.getpid()).randint(2, 9)  # a different round on different runs
    trace = tmp_path / "t.h5"
    proc = _start(_cmd(trace, "rounds=12"))
    _wait_rounds(proc, trace, kill_after)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    written = _rounds(trace)
    assert written >= kill_after and written < 12, written
    # Resume on another rank count: the trace must not depend on it.
    resumed = subprocess.run(_cmd(trace, ranks=2, resume=True), capture_output=True, text=True,
                             env=fedemu_env(), timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _tables(trace)
    assert got["rounds"]["round"].tolist() == list(range(12)), f"killed after round {kill_after}"
    _assert_same(uninterrupted, got)
    kinds = [e[0] for e in _events(trace)]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds[-1] == "finish"


def test_sigusr1_finishes_the_round_checkpoints_and_exits_75(
    tmp_path: Path, uninterrupted: dict[str, np.ndarray]
) -> None:
    trace = tmp_path / "t.h5"
    proc = _start(_cmd(trace, "rounds=12"))
    _wait_rounds(proc, trace, 3)
    os.killpg(proc.pid, signal.SIGUSR1)  # what srun / the job script passes on near the time limit
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "fedemu: SIGUSR1: finishing this round, checkpointing, then stopping" in err
    # An orderly stop: every rank finalizes, nothing calls MPI_Abort (which kills the other ranks
    # mid-exit and leaves MPICH's shared-memory segment behind for the next step).
    assert "MPI_Abort" not in err, err[-3000:]
    assert f"continue with: fedemu run --resume {trace}" in err
    done = _rounds(trace)
    saved = checkpoint.latest(checkpoint.checkpoint_dir(trace))
    assert saved is not None and saved.round == done - 1 and saved.meta["reason"] in ("round", "SIGUSR1")
    assert _events(trace)[-1][0] == "stop"
    resumed = subprocess.run(_cmd(trace, resume=True), capture_output=True, text=True, env=fedemu_env(),
                             timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(uninterrupted, _tables(trace))


def test_a_second_signal_abandons_a_stuck_round(tmp_path: Path, uninterrupted: dict[str, np.ndarray]) -> None:
    trace = tmp_path / "t.h5"
    env = {**fedemu_env(), "FEDEMU_INJECT": "hang:1:4"}  # rank 1 never finishes round 4
    proc = _start(_cmd(trace, "rounds=12"), env=env)
    _wait_rounds(proc, trace, 4)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first signal waits for the round
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "abandoned" in err
    assert _rounds(trace) == 4
    assert any(e[0] == "abandoned" and e[2] == 4 for e in _events(trace)), _events(trace)
    assert checkpoint.latest(checkpoint.checkpoint_dir(trace)).round == 3  # type: ignore[union-attr]
    resumed = subprocess.run(_cmd(trace, resume=True), capture_output=True, text=True, env=fedemu_env(),
                             timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(uninterrupted, _tables(trace))


def test_an_exception_on_a_worker_ends_the_job_with_its_message(tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    env = {**fedemu_env(), "FEDEMU_INJECT": "fail:2:3"}
    proc = _start(_cmd(trace, "rounds=50"), env=env)
    _wait_rounds(proc, trace, 3)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 8  # promptly: rank 0 aborts, it does not wait out the worker
    assert proc.returncode != 0
    line = "fedemu: error: rank 2 failed: InjectedFailure: injected failure on rank 2 in round 3"
    assert line in err
    assert "Traceback" in err and "faults.py" in err  # the failing rank's own traceback
    failed = [e for e in _events(trace) if e[0] == "error"]
    assert failed == [("error", 2, 3, "InjectedFailure: injected failure on rank 2 in round 3 (FEDEMU_INJECT)")]
    assert _rounds(trace) == 3


def test_watchdog_dumps_every_rank_and_aborts_a_hung_round(tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    env = {**fedemu_env(), "FEDEMU_INJECT": "hang:1:2"}
    proc = _start(_cmd(trace, "rounds=50", "runtime.round_timeout_s=3"), env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_TIMEOUT, err[-3000:]
    for rank in (0, 1, 2):
        assert f"fedemu: watchdog: rank {rank}: round 2 ran longer than runtime.round_timeout_s = 3 s" in err
    assert 'faults.py", line' in err  # rank 1's main thread, caught where it hangs
    assert "fedemu: error: watchdog: round 2" in err
    assert [e[0] for e in _events(trace)][-1] == "watchdog"
    assert _rounds(trace) == 2
