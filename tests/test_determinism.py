"""Any rank count gives the same trace: 1 process, then 2 and 4 real MPI ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, fedemu_env, mpiexec

# Small but real: synthetic images, a tiny CNN, three rounds of FedAvg.
SETTINGS = [
    "data.dataset=synthetic", "data.num_samples=600", "data.num_classes=4", "data.image_size=8",
    "data.channels=1", "data.partition.num_clients=12", "data.partition.alpha=1.0",
    "clients_per_round=7", "rounds=3", "train.local_epochs=2", "train.batch_size=8", "train.lr=0.02",
    # Equal threads per rank: torch's CPU kernels reduce in a thread-count-dependent order.
    "runtime.threads=1", "runtime.progress=none",
]
# Stated tolerance: rank partial sums are added in a different float64 order, then rounded to
# float32, so a weight can differ by one float32 ulp; losses agree far below this.
RTOL = 1e-5


def _run(ranks: int, trace: Path) -> None:
    args = ["-m", "emulator", "run", str(REPO / "examples" / "fedavg-digits.toml")]
    for s in [*SETTINGS, f"output.trace={trace}"]:
        args += ["--set", s]
    if ranks == 4:  # launched by hand, as a cluster user would
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", *args]
    else:  # no launcher at 1 rank; `--ranks 2` re-launches itself under mpiexec
        cmd = [sys.executable, *args, "--ranks", str(ranks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=fedemu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.mpi
def test_one_two_and_four_ranks_agree(tmp_path: Path) -> None:
    tables = {}
    for ranks in (1, 2, 4):
        path = tmp_path / f"r{ranks}.h5"
        _run(ranks, path)
        with h5py.File(path, "r") as f:
            tables[ranks] = (f["/rounds/table"][:], f["/client_rounds/table"][:], int(f.attrs["ranks"]))
    base_rounds, base_clients, _ = tables[1]
    assert len(base_rounds) == 3 and len(base_clients) == 3 * 7
    assert base_rounds["test_accuracy"][-1] > 0.4  # it trained (4 classes: chance is 0.25)
    for ranks in (2, 4):
        rounds, clients, stored_ranks = tables[ranks]
        assert stored_ranks == ranks
        for col in ("round", "cohort_size", "num_ok", "bytes_down", "bytes_up"):
            assert np.array_equal(rounds[col], base_rounds[col]), col
        for col in ("test_accuracy", "test_loss", "train_loss"):
            np.testing.assert_allclose(rounds[col], base_rounds[col], rtol=RTOL, err_msg=col)
        for col in ("round", "client", "num_samples", "steps", "status", "bytes_down", "bytes_up", "device",
                    "level", "peak_memory_bytes", "memory_budget_bytes"):
            assert np.array_equal(clients[col], base_clients[col]), col
        for col in ("train_loss", "flops", "compute_time_s", "comm_time_s", "wait_time_s", "energy_j"):
            np.testing.assert_allclose(clients[col], base_clients[col], rtol=RTOL, err_msg=col)
        # The clients that trained really were spread over the worker ranks (rank 0 only serves).
        ran = clients["status"] == 0
        assert set(np.unique(clients["rank"][ran])) == set(range(1, ranks))
        assert (clients["rank"][~ran] == -1).all()
    assert set(np.unique(base_clients["rank"][base_clients["status"] == 0])) == {0}
