"""A whole small emulation on the ranks of this test session (1 or 4 under the Makefile)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from emulator.comm import MPIComm
from emulator.config import load_config
from emulator.runner import run

pytestmark = pytest.mark.mpi


def test_small_run_uses_every_worker_and_writes_one_trace() -> None:
    comm = MPIComm()
    folder = comm.bcast(tempfile.mkdtemp(prefix="fedemu-mpi-") if comm.rank == 0 else None)
    trace = Path(folder) / "run.h5"
    cfg = load_config(None, [
        "data.dataset=synthetic", "data.num_samples=400", "data.num_classes=4", "data.image_size=8",
        "data.partition.num_clients=10", "clients_per_round=6", "rounds=2", "runtime.progress=none",
        "runtime.threads=1", f"output.trace={trace}",
    ])
    summary = run(cfg, comm)
    assert (summary is not None) == (comm.rank == 0)
    facts = None
    if comm.rank == 0:
        with h5py.File(trace, "r") as f:
            records = f["/client_rounds/table"][:]
            facts = {
                "rounds": len(f["/rounds/table"]),
                "ranks_attr": int(f.attrs["ranks"]),
                "used": sorted(set(np.unique(records["rank"][records["status"] == 0]).tolist())),
                "rows": len(records),
            }
    facts = comm.bcast(facts)
    assert facts["rounds"] == 2 and facts["rows"] == 12
    assert facts["ranks_attr"] == comm.size
    assert facts["used"] == ([0] if comm.size == 1 else list(range(1, comm.size)))
