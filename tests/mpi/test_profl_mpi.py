"""ProFL on the ranks of this session (1 or 4) gives the run of a single process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from emulator.comm import MPIComm, SingleComm
from emulator.config import load_config
from emulator.runner import run

pytestmark = pytest.mark.mpi

SETTINGS = [
    "algorithm=profl", "model.name=test_convnext", "data.dataset=synthetic", "data.num_samples=400",
    "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=10", "data.partition.alpha=1.0",
    "clients_per_round=5", "train.batch_size=16", "rounds=20", "profl.num_blocks=3", "profl.shrink_rounds=1",
    "profl.window=2", "profl.min_rounds_per_block=2", "profl.max_rounds_per_block=3",
    # Equal threads per rank: torch's CPU kernels reduce in a thread-count-dependent order.
    "runtime.threads=1", "runtime.progress=none",
]
# Rank partial sums are added in another float64 order, then rounded to float32 (tests/test_determinism.py).
RTOL = 1e-5


def _tables(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {"rounds": f["/rounds/table"][:], "clients": f["/client_rounds/table"][:],
                "profl": f["/profl/rounds"][:], "ranks": np.array(int(f.attrs["ranks"]))}


def test_profl_on_mpi_ranks_equals_one_process() -> None:
    comm = MPIComm()
    folder = Path(comm.bcast(tempfile.mkdtemp(prefix="fedemu-profl-") if comm.rank == 0 else None))
    cfg = load_config(None, [*SETTINGS, f"output.trace={folder / 'mpi.h5'}"])
    summary = run(cfg, comm)
    assert (summary is not None) == (comm.rank == 0)
    failures: list[str] = []
    if comm.rank == 0:
        alone = run(load_config(None, [*SETTINGS, f"output.trace={folder / 'one.h5'}"]), SingleComm())
        assert alone is not None
        got, ref = _tables(folder / "mpi.h5"), _tables(folder / "one.h5")
        failures = _compare(got, ref, comm.size)
    failures = comm.bcast(failures)
    assert failures == []


def _compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], size: int) -> list[str]:
    out = []
    if int(got["ranks"]) != size:
        out.append(f"ranks attribute {int(got['ranks'])} != {size}")
    if len(ref["rounds"]) >= 20 or len(ref["profl"]) != len(ref["rounds"]):
        out.append(f"the reference did not stop early: {len(ref['rounds'])} rounds")
    stages = {s.decode() for s in ref["profl"]["stage"]}
    if stages != {"shrink", "grow"}:
        out.append(f"stages {stages}")
    for table, exact, close in (
        ("rounds", ("round", "cohort_size", "num_ok", "num_oom", "bytes_down", "bytes_up"),
         ("test_accuracy", "test_loss", "train_loss")),
        ("clients", ("round", "client", "status", "steps", "bytes_down", "bytes_up", "peak_memory_bytes"),
         ("train_loss", "flops")),
        ("profl", ("round", "stage", "block", "block_round", "below", "frozen", "trainable_params",
                   "peak_train_bytes", "bytes_down", "bytes_up", "weight"), ("em",)),
    ):
        a, b = got[table], ref[table]
        if len(a) != len(b):
            out.append(f"{table}: {len(a)} rows != {len(b)}")
            continue
        out += [f"{table}.{c} differs" for c in exact if not np.array_equal(a[c], b[c])]
        out += [f"{table}.{c} not within rtol {RTOL}" for c in close
                if not np.allclose(a[c], b[c], rtol=RTOL, atol=0, equal_nan=True)]
    ran = got["clients"]["status"] == 0
    used = set(np.unique(got["clients"]["rank"][ran]).tolist())
    if used != ({0} if size == 1 else set(range(1, size))):
        out.append(f"ranks that trained: {used}")
    return out
