"""FedAvg learns, in one process through the single-process Comm."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from emulator.comm import SingleComm
from emulator.config import load_config
from emulator.runner import run


def test_fedavg_on_synthetic_learns_well_above_chance(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "data.dataset=synthetic", "data.num_samples=1500", "data.num_classes=5", "data.image_size=12",
        "data.partition.num_clients=20", "data.partition.name=iid", "clients_per_round=8",
        "rounds=5", "train.local_epochs=2", "train.batch_size=16", "runtime.progress=none",
        f"output.trace={tmp_path / 'fedavg.h5'}", "runtime.threads=1", "devices.availability=false",
    ])
    summary = run(cfg, SingleComm())
    assert summary is not None
    acc = summary.rounds["test_accuracy"]
    assert acc[-1] > 0.6, acc  # chance is 0.2
    assert acc[-1] > acc[0]
    with h5py.File(summary.trace_path, "r") as f:
        assert len(f["/rounds/table"]) == 5
        records = f["/client_rounds/table"][:]
        assert len(records) == 5 * 8
        assert (records["status"] == 0).all() and (records["steps"] > 0).all()
        assert np.all(records["bytes_up"] == records["bytes_down"])
        assert "[data.partition]" in f.attrs["config"]
        events = f["/events/table"][:]
        assert [e.decode() for e in events["kind"]] == ["start", "meter", "finish"]  # meter: none here


def test_eval_every_leaves_nan_between_evaluations(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "data.dataset=synthetic", "data.num_samples=200", "data.image_size=8", "data.num_classes=3",
        "data.partition.num_clients=4", "clients_per_round=2", "rounds=5", "eval_every=2",
        "runtime.progress=none", f"output.trace={tmp_path / 't.h5'}",
    ])
    summary = run(cfg, SingleComm())
    assert summary is not None
    evaluated = ~np.isnan(summary.rounds["test_accuracy"])
    assert evaluated.tolist() == [False, True, False, True, True]  # and always the last round
