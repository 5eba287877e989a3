"""Real Slurm: a one-node cluster on this machine (slurm/local_cluster.sh), real sbatch, real traces.

Slow and opt-in (`--runslow`); needs root (the script installs slurm-wlm and munge with apt-get if
missing). Finished jobs stay in `scontrol show job` for 10 minutes (MinJobAge in the local
slurm.conf), which is how the tests learn the final state without an accounting daemon.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from tests.conftest import BIN, REPO, fedemu_env

pytestmark = [pytest.mark.slow]

SCRIPT = REPO / "slurm" / "local_cluster.sh"
TINY = """name = "tiny"
rounds = 2
clients_per_round = 4
algorithm = "fedavg"
[data]
dataset = "digits"
image_size = 16
[data.partition]
num_clients = 20
[model]
name = "tiny_cnn"
[train]
batch_size = 16
[runtime]
progress = "lines"
"""
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """Start the local cluster for this module; stop it afterwards unless it was already up."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    was_up = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    start = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    yield
    if not was_up:
        stop = subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def fedemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedemu"), *args], capture_output=True, text=True, env=fedemu_env(),
                          cwd=REPO, timeout=120)


def job_states(job_id: str) -> dict[str, str]:
    """JobId -> JobState for a job or every task of an array, from `scontrol show job -o`."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    states = {}
    for line in proc.stdout.splitlines():
        # An array task has a JobId of its own; name it <ArrayJobId>_<ArrayTaskId> as Slurm's tools do.
        ident = re.search(r"ArrayJobId=(\d+) ArrayTaskId=(\d+)", line) or re.search(r"JobId=(\d+)", line)
        state = re.search(r"JobState=(\S+)", line)
        if ident and state:
            states["_".join(ident.groups())] = state.group(1)
    return states


def wait_for(job_id: str, *, tasks: int = 1, timeout_s: float = 240) -> dict[str, str]:
    """Wait until ``tasks`` records of the job are in a final state; their states."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = job_states(job_id)
        if len(states) >= tasks and all(s in FINAL for s in states.values()):
            return states
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s: {states}")


def submit(*args: str) -> str:
    proc = fedemu(*args)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), proc.stdout
    return job_id


def check_trace(path: Path, *, rounds: int, ranks: int) -> dict:
    with h5py.File(path, "r") as f:
        assert f["/rounds/table"].shape == (rounds,)
        assert int(f.attrs["ranks"]) == ranks
        return tomllib.loads(str(f.attrs["config"]))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_submit_runs_a_two_rank_job(cluster: None, tmp_path: Path, launcher: str) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    root = tmp_path / "out"
    job_id = submit("slurm", "submit", str(config), "--set", "seed=3", "--nodes", "1", "--ntasks-per-node", "2",
                    "--time", "10", "--launcher", launcher, "--output-root", str(root))
    config.unlink()  # the job carries its config: the submit-time file is not needed any more
    assert wait_for(job_id) == {job_id: "COMPLETED"}, (root / f"tiny-{job_id}.out").read_text()
    run_dir = root / f"tiny-{job_id}"
    cfg = check_trace(run_dir / "trace.h5", rounds=2, ranks=2)
    assert cfg["seed"] == 3 and cfg["name"] == "tiny"
    assert tomllib.loads((run_dir / "config.toml").read_text())["seed"] == 3
    assert (root / f"tiny-{job_id}.sbatch").is_file()
    log = (root / f"tiny-{job_id}.out").read_text()
    assert f"fedemu: job {job_id}, run tiny, restart 0" in log
    first = "srun --mpi=pmi2 --kill-on-bad-exit=1" if launcher == "srun" else f"{BIN / 'mpiexec'} -n 2"
    assert f"fedemu: launching: {first} {BIN / 'python'} -m mpi4py -m emulator run {run_dir}/config.toml" in log
    assert "round 2/2" in log and "2 rank(s)" in log
    assert "fedemu: step ended with status 0" in log


@pytest.mark.timeout(400)
def test_sweep_runs_one_array_task_per_seed(cluster: None, tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    sweep = tmp_path / "seeds.toml"
    sweep.write_text('base = "tiny.toml"\n[grid]\nseed = [0, 1]\n')
    root = tmp_path / "out"
    job_id = submit("slurm", "sweep", str(sweep), "--ntasks-per-node", "2", "--output-root", str(root))
    states = wait_for(job_id, tasks=2)
    assert states == {f"{job_id}_0": "COMPLETED", f"{job_id}_1": "COMPLETED"}, states
    for seed in (0, 1):
        run_dir = root / f"tiny-seed{seed}-{job_id}_{seed}"
        cfg = check_trace(run_dir / "trace.h5", rounds=2, ranks=2)
        assert cfg["seed"] == seed and cfg["name"] == f"tiny-seed{seed}"
        assert "fedemu: step ended with status 0" in (root / f"seeds-{job_id}_{seed}.out").read_text()
    assert sorted(p.name for p in root.glob("*/trace.h5")) == ["trace.h5", "trace.h5"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_time_limit_signal_requeues_and_resumes(cluster: None, tmp_path: Path, launcher: str) -> None:
    """SIGUSR1 to the batch shell (what --signal=B:USR1@S does near the limit): stop, requeue, --resume.

    With srun the requeued job's step has the same job and step ids as the stopped one: it starts
    only if the stopped step ended cleanly (no MPI_Abort, no stale MPICH shared-memory segment).
    """
    config = tmp_path / "long.toml"
    config.write_text(TINY.replace("rounds = 2", "rounds = 300").replace('name = "tiny"', 'name = "long"'))
    root = tmp_path / "out"
    job_id = submit("slurm", "submit", str(config), "--signal-seconds", "10", "--launcher", launcher,
                    "--output-root", str(root))
    log = root / f"long-{job_id}.out"
    deadline = time.monotonic() + 120
    while "round 1/" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    # Slurm holds a requeued job back for a while (BeginTime); let it start at once.
    deadline = time.monotonic() + 120
    while "restart 1" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    run_dir = root / f"long-{job_id}"
    # The second start resumes from the checkpoint and runs the remaining rounds to the end.
    assert wait_for(job_id, timeout_s=300) == {job_id: "COMPLETED"}, log.read_text()
    text = log.read_text()
    assert "fedemu: SIGUSR1 (time limit near): stopping the step" in text
    assert "fedemu: SIGUSR1: finishing this round, checkpointing, then stopping" in text
    assert f"requeueing {job_id}" in text and "step ended with status 75; requeueing" in text
    assert "MPI_Abort" not in text and "srun: Warning" not in text
    assert f"fedemu: job {job_id}, run long, restart 1" in text
    assert f"--set output.trace={run_dir}/trace.h5 --resume {run_dir}\n" in text
    with h5py.File(run_dir / "trace.h5", "r") as f:
        assert f["/rounds/table"]["round"].tolist() == list(range(300))  # none missing, none twice
        kinds = [k.decode() for k in f["/events/table"]["kind"]]
        assert int(f.attrs["resumes"]) == 1
    assert kinds.count("stop") == 1 and kinds.count("resume") == 1 and kinds[-1] == "finish"


@pytest.mark.timeout(200)
def test_sbatch_failure_is_one_line(cluster: None, tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    proc = fedemu("slurm", "submit", str(config), "--partition", "nosuch", "--output-root", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fedemu: error: sbatch failed: sbatch: error: ")
    assert "partition" in proc.stderr.lower()


def test_local_cluster_status_and_idempotent_start(cluster: None) -> None:
    again = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "starting" not in again.stdout  # nothing was started twice
    status = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout
    assert "slurmctld: running" in status.stdout and "debug*" in status.stdout
    assert shutil.which("sbatch")
