"""FedPEFT and RaFFM on the ranks of this session give what one process gives (any rank count).

Rank 0 first runs each config alone (single-process Comm) as the reference, then every rank runs it
together; rank 0 compares the final global state, the per-round accuracy/loss and the algorithm's own
trace tables, and broadcasts the verdict so every rank asserts the same thing (no rank hangs on a failure).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from emulator import runner
from emulator.comm import MPIComm, SingleComm
from emulator.config import load_config

pytestmark = pytest.mark.mpi

BASE = [
    "model.name=test_vit", "data.dataset=synthetic", "data.num_samples=240", "data.num_classes=4",
    "data.image_size=32", "data.partition.num_clients=8", "clients_per_round=5", "rounds=2",
    "train.batch_size=16", "runtime.progress=none", "runtime.threads=1", "devices.mix=small",
]
CASES = {
    "fedpeft-adapter": ["algorithm=fedpeft", "fedpeft.variant=adapter"],
    "fedpeft-prompt-dp-code": ["algorithm=fedpeft", "fedpeft.variant=prompt", "fedpeft.dp=true",
                               "fedpeft.faithful_to_code=true"],
    # Budgets scaled so the Small mix's Raspberry Pis only hold subnetworks: heterogeneous aggregation.
    "raffm": ["algorithm=raffm", "devices.memory_fraction=0.001", "raffm.head_ratios=[0.5,1.0]",
              "raffm.mlp_ratios=[0.25,0.5,1.0]"],
    "raffm-code": ["algorithm=raffm", "raffm.faithful_to_code=true", "raffm.head_ratios=[0.5,1.0]",
                   "raffm.mlp_ratios=[0.25,0.5,1.0]"],
}
TABLES = {"fedpeft": ["fedpeft/rounds"], "raffm": ["raffm/clients", "raffm/eval"]}


def _tables(path: Path, algorithm: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {key: f[key][:] for key in TABLES[algorithm]}


@pytest.mark.parametrize("case", list(CASES))
def test_same_final_state_as_one_process(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    comm = MPIComm()
    folder = Path(comm.bcast(tempfile.mkdtemp(prefix="fedemu-alg-mpi-") if comm.rank == 0 else None))
    captured: dict[str, Any] = {}
    real = runner.create_algorithm

    def capture(name: str, **kwargs: Any) -> Any:
        captured["algorithm"] = real(name, **kwargs)
        return captured["algorithm"]

    monkeypatch.setattr(runner, "create_algorithm", capture)
    overrides = BASE + CASES[case]
    algorithm = load_config(None, overrides).algorithm

    reference = None
    if comm.rank == 0:
        single = runner.run(load_config(None, [*overrides, f"output.trace={folder / 'one.h5'}"]), SingleComm())
        assert single is not None
        reference = (captured["algorithm"].global_params.copy(), single.rounds, _tables(folder / "one.h5", algorithm))

    summary = runner.run(load_config(None, [*overrides, f"output.trace={folder / 'many.h5'}"]), comm)
    verdict = None
    if comm.rank == 0:
        assert summary is not None and reference is not None
        params, rounds, tables = reference
        mine = captured["algorithm"].global_params
        other = _tables(folder / "many.h5", algorithm)
        verdict = {
            "state": bool(np.allclose(mine, params, rtol=1e-5, atol=1e-7)),
            "accuracy": summary.rounds["test_accuracy"].tolist() == rounds["test_accuracy"].tolist(),
            "loss": bool(np.allclose(summary.rounds["test_loss"], rounds["test_loss"], rtol=1e-5)),
            "ok": summary.rounds["num_ok"].tolist() == rounds["num_ok"].tolist(),
            "tables": all(
                other[k].dtype == tables[k].dtype and len(other[k]) == len(tables[k]) and all(
                    np.allclose(other[k][c], tables[k][c], rtol=1e-5, equal_nan=True) for c in tables[k].dtype.names
                    if c != "variant"
                ) for k in tables
            ),
            "trained": int(rounds["num_ok"].sum()),
            "max_diff": float(np.max(np.abs(mine - params))),
        }
    verdict = comm.bcast(verdict)
    assert verdict["trained"] > 0, verdict
    assert verdict["state"] and verdict["accuracy"] and verdict["loss"], verdict
    assert verdict["ok"] and verdict["tables"], verdict
