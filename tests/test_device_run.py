"""FedAvg on an emulated device population: what the trace records per client and round."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from emulator.comm import SingleComm
from emulator.config import load_config
from emulator.records import STATUS_LATE, STATUS_OK, STATUS_OOM, STATUS_UNAVAILABLE
from emulator.runner import run

# A user catalogue added to the builtin one: a microcontroller-class board too small to train.
TINY_BOARD = """
[[device]]
name = "tiny_board"
label = "A 200 KB microcontroller board (test device)"
kind = "sbc"
memory_gb = 0.0002
idle_power_w = 0.1
uplink_mbps = 1.0
downlink_mbps = 2.0
radio_power_w = 0.2
availability = 0.5
source = "made up for the tests"
dvfs = [ { freq_mhz = 100, gflops = 0.05, power_w = 0.3 }, { freq_mhz = 200, gflops = 0.1, power_w = 0.5 } ]
"""

BASE = [
    "data.dataset=synthetic", "data.num_samples=800", "data.num_classes=4", "data.image_size=16",
    "data.channels=3", "data.partition.num_clients=24", "data.partition.name=iid", "clients_per_round=12",
    "rounds=3", "train.batch_size=16", "runtime.progress=none", "runtime.threads=1",
]


def trace_of(tmp_path: Path, name: str, *extra: str) -> h5py.File:
    cfg = load_config(None, [*BASE, *extra, f"output.trace={tmp_path / name}"])
    summary = run(cfg, SingleComm())
    assert summary is not None
    return h5py.File(summary.trace_path, "r", swmr=True)


@pytest.fixture()
def catalogue(tmp_path: Path) -> Path:
    path = tmp_path / "boards.toml"
    path.write_text(TINY_BOARD)
    return path


def test_small_mix_trace_has_every_accounting_column(tmp_path: Path, catalogue: Path) -> None:
    with trace_of(tmp_path, "mix.h5", "devices.mix=tiny_board:0.5,xps15:0.5",
                  f"devices.extra_catalogue={catalogue}") as f:
        names = [n.decode() for n in f["/devices/table"][:]["name"]]
        clients = f["/clients/table"][:]
        rec = f["/client_rounds/table"][:]
        rounds = f["/rounds/table"][:]
        assert f.attrs["meter"] == "none" and "tiny_board" in f.attrs["catalogue"]
    tiny, xps = names.index("tiny_board"), names.index("xps15")
    assert np.bincount(clients["device"], minlength=len(names))[[tiny, xps]].tolist() == [12, 12]
    assert np.array_equal(rec["device"], clients["device"][rec["client"]])

    ok, oom, off = (rec["status"] == s for s in (STATUS_OK, STATUS_OOM, STATUS_UNAVAILABLE))
    # The 200 KB board cannot hold a training step of this CNN; the laptop can.
    assert (rec["device"][oom] == tiny).all() and oom.sum() > 0
    assert (rec["device"][ok] == xps).all() and ok.sum() > 0
    assert (rec["peak_memory_bytes"][oom] > rec["memory_budget_bytes"][oom]).all()
    assert (rec["peak_memory_bytes"][ok] <= rec["memory_budget_bytes"][ok]).all()
    assert (rec["memory_budget_bytes"][rec["device"] == tiny] == int(0.0002 * 2**30)).all()
    # Clients that did not train for real: no rank, no steps, no upload.
    assert (rec["rank"][~ok] == -1).all() and (rec["steps"][~ok] == 0).all() and (rec["bytes_up"][~ok] == 0).all()
    assert (rec["rank"][ok] == 0).all() and (rec["steps"][ok] > 0).all()
    # Offline clients cost nothing; oom clients downloaded the model, failed and left.
    assert (rec["energy_j"][off] == 0).all() and (rec["bytes_down"][off] == 0).all()
    assert (rec["energy_compute_j"][oom] == 0).all() and (rec["comm_time_s"][oom] > 0).all()
    # Times and energies are consistent.
    np.testing.assert_allclose(
        rec["energy_j"], rec["energy_compute_j"] + rec["energy_comm_j"] + rec["energy_idle_j"], rtol=1e-12
    )
    assert (rec["compute_time_s"][ok] > 0).all() and np.isfinite(rec["freq_mhz"][ok]).all()
    assert np.isnan(rec["energy_measured_j"]).all()  # no meter here
    for r in range(3):
        mine = rec[rec["round"] == r]
        done = mine["compute_time_s"] + mine["comm_time_s"]
        assert rounds["round_time_s"][r] == pytest.approx(done[mine["status"] == STATUS_OK].max())
        assert rounds["energy_j"][r] == pytest.approx(mine["energy_j"].sum())
        assert rounds["num_oom"][r] == (mine["status"] == STATUS_OOM).sum()
        assert rounds["num_unavailable"][r] == (mine["status"] == STATUS_UNAVAILABLE).sum()
    np.testing.assert_allclose(rounds["emulated_time_s"], np.cumsum(rounds["round_time_s"]))


def test_energy_optimizer_saves_energy_at_the_same_round_time(tmp_path: Path) -> None:
    mix = ["devices.mix=small", "devices.jitter=0", "devices.noise=0", "devices.availability=false"]
    with trace_of(tmp_path, "max.h5", *mix, "devices.frequency=max") as f:
        fixed = f["/rounds/table"][:]
        fixed_levels = f["/client_rounds/table"][:]["freq_mhz"]
    with trace_of(tmp_path, "opt.h5", *mix, "devices.frequency=optimizer") as f:
        opt = f["/rounds/table"][:]
        opt_levels = f["/client_rounds/table"][:]["freq_mhz"]
    np.testing.assert_allclose(opt["round_time_s"], fixed["round_time_s"], rtol=1e-9)
    assert (opt["energy_j"] < fixed["energy_j"]).all()
    assert (opt_levels <= fixed_levels).all() and (opt_levels < fixed_levels).any()


def test_deadline_and_overcommit(tmp_path: Path) -> None:
    with trace_of(tmp_path, "free.h5", "devices.mix=small", "devices.availability=false") as f:
        free = f["/client_rounds/table"][:]
    done = (free["compute_time_s"] + free["comm_time_s"])[free["round"] == 0]
    deadline = float(np.median(done))
    with trace_of(tmp_path, "dl.h5", "devices.mix=small", "devices.availability=false",
                  f"deadline_s={deadline}", "devices.frequency=max") as f:
        rec = f["/client_rounds/table"][:]
        rounds = f["/rounds/table"][:]
    late = rec["status"] == STATUS_LATE
    assert late.any() and (rounds["round_time_s"][rounds["num_late"] > 0] == deadline).all()
    assert ((rec["compute_time_s"] + rec["comm_time_s"])[rec["status"] == STATUS_OK] <= deadline + 1e-9).all()
    with trace_of(tmp_path, "oc.h5", "devices.mix=small", "devices.availability=false",
                  "overcommit=1.5", "clients_per_round=8") as f:
        rounds = f["/rounds/table"][:]
    assert (rounds["cohort_size"] == 12).all() and (rounds["num_ok"] == 8).all()
    assert (rounds["num_dropped"] == 4).all()


def test_sleep_mode_stretches_wall_time_to_emulated_time_over_dilation(tmp_path: Path) -> None:
    common = ["devices.mix=xsmall", "devices.availability=false", "rounds=2", "clients_per_round=6"]
    with trace_of(tmp_path, "virtual.h5", *common) as f:
        virtual = f["/client_rounds/table"][:]
    emulated = virtual["compute_time_s"] + virtual["comm_time_s"]
    dilation = float(np.median(emulated)) / 0.25  # about a quarter second of real time per client
    with trace_of(tmp_path, "sleep.h5", *common, "devices.throttle=sleep", f"devices.dilation={dilation}") as f:
        slept = f["/client_rounds/table"][:]
    np.testing.assert_allclose(slept["compute_time_s"], virtual["compute_time_s"])  # same emulation
    ran = slept["status"] == STATUS_OK
    target = emulated[ran] / dilation
    assert ran.sum() == 12
    np.testing.assert_allclose(slept["wall_time_s"][ran], target, rtol=0.10)
    assert (virtual["wall_time_s"][ran] < 0.5 * target).all()  # without sleeping it is much faster
