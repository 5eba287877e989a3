"""FedStitch on the ranks of this session (1 or 4): the same stitched model and scores as one process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from emulator.comm import MPIComm, SingleComm
from emulator.config import load_config
from emulator.runner import run
from tests.conftest import REPO

pytestmark = pytest.mark.mpi


def test_fedstitch_matches_the_single_process_run() -> None:
    comm = MPIComm()
    folder = Path(comm.bcast(tempfile.mkdtemp(prefix="fedemu-mpi-stitch-") if comm.rank == 0 else None))
    if comm.rank == 0:
        from pools import build_pool

        torch.manual_seed(0)
        build_pool(folder / "pool", models=["test_resnet", "test_efficientnet", "test_convnext"], input_size=32)
    comm.barrier()

    def cfg(trace: Path):
        return load_config(str(REPO / "examples" / "quickstart.toml"), [
            f"pool.path={folder / 'pool'}", f"output.trace={trace}", "stitch.weighting=data",
            "runtime.progress=none", "runtime.threads=1", "data.partition.num_clients=16", "clients_per_round=6",
            "rounds=5",
        ])

    summary = run(cfg(folder / "mpi.h5"), comm)
    facts = None
    if comm.rank == 0:
        single = run(cfg(folder / "one.h5"), SingleComm())
        tables = {}
        for name in ("mpi", "one"):
            with h5py.File(folder / f"{name}.h5", "r") as f:
                tables[name] = (f["stitch/steps"][:], f["stitch/scores"][:], f["client_rounds/table"][:])
        (s1, sc1, cr1), (s2, sc2, cr2) = tables["mpi"], tables["one"]
        facts = {
            "blocks": (s1["chosen_block"].tolist(), s2["chosen_block"].tolist()),
            "scores_close": bool(np.allclose(sc1["score"], sc2["score"], rtol=1e-5, equal_nan=True)),
            "acc": (float(summary.rounds["test_accuracy"][-1]), float(single.rounds["test_accuracy"][-1])),
            "ranks_used": sorted(set(cr1["rank"][cr1["status"] == 0].tolist())),
            "same_flops": bool(np.allclose(cr1["flops"], cr2["flops"], rtol=1e-9)),
        }
    facts = comm.bcast(facts)
    assert facts["blocks"][0] == facts["blocks"][1]
    assert facts["scores_close"] and facts["same_flops"]
    assert facts["acc"][0] == pytest.approx(facts["acc"][1], abs=1e-6)
    assert facts["ranks_used"] == ([0] if comm.size == 1 else list(range(1, comm.size)))
