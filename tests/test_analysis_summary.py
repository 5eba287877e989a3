"""analysis.summary: every number recomputed here straight from the HDF5 datasets (h5py + numpy)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import analysis

STATUSES = ("ok", "oom", "dropped", "late", "unavailable")  # codes 0..4, docs/trace-schema.md


def direct(path: Path) -> dict:
    """The trace's tables, read with h5py; client rows limited to rounds with a /rounds row."""
    with h5py.File(path, "r", swmr=True) as f:
        rounds = f["rounds/table"][()]
        cr = f["client_rounds/table"][()]
        names = [n.decode() for n in f["devices/table"]["name"]]
        meter = f.attrs["meter"]
    cr = cr[np.isin(cr["round"], rounds["round"])]
    return {"rounds": rounds, "cr": cr, "names": names, "meter": meter}


def test_summarize_equals_direct_recomputation(small_traces: list[Path]) -> None:
    for path in small_traces:
        d = direct(path)
        rounds, cr, names = d["rounds"], d["cr"], d["names"]
        s = analysis.summarize(analysis.open(path))

        acc = rounds["test_accuracy"].astype(np.float64)
        evaluated = acc[~np.isnan(acc)]
        assert len(evaluated) == 2  # eval_every=2 over 4 rounds
        assert s["final_accuracy"] == pytest.approx(evaluated[-1])
        assert s["best_accuracy"] == pytest.approx(evaluated.max())
        assert s["rounds"] == len(rounds) == 4
        assert s["emulated_time_s"] == pytest.approx(rounds["emulated_time_s"][-1])
        assert s["wall_time_s"] == pytest.approx(rounds["wall_time_s"].sum())
        assert s["bytes_up"] == int(rounds["bytes_up"].sum()) == int(cr["bytes_up"].sum())
        assert s["bytes_down"] == int(rounds["bytes_down"].sum()) == int(cr["bytes_down"].sum())
        assert s["meter"] == d["meter"] == "none"

        # Energy: total and per device type.
        assert s["energy_j"] == pytest.approx(cr["energy_j"].sum())
        assert s["energy_j"] == pytest.approx(rounds["energy_j"].sum())
        assert math.isnan(s["energy_measured_j"])
        used = sorted(set(cr["device"].tolist()))
        assert list(s["energy_by_device"]) == [names[i] for i in used]
        for i in used:
            mine = cr[cr["device"] == i]
            got = s["energy_by_device"][names[i]]
            assert got["modelled_j"] == pytest.approx(mine["energy_j"].sum())
            assert math.isnan(got["measured_j"])
            mem = s["memory_by_device"][names[i]]
            assert mem["peak_bytes_max"] == mine["peak_memory_bytes"].max()
            assert mem["budget_bytes"] == mine["memory_budget_bytes"].max()
            over = (mine["peak_memory_bytes"] > mine["memory_budget_bytes"]).mean()
            assert mem["over_budget_share"] == pytest.approx(over)
        assert sum(v["modelled_j"] for v in s["energy_by_device"].values()) == pytest.approx(s["energy_j"])

        # Participation: shares of client-round rows by status code.
        shares = np.bincount(cr["status"], minlength=5) / len(cr)
        assert s["participation"] == pytest.approx(dict(zip(STATUSES, shares, strict=True)))
        assert sum(s["participation"].values()) == pytest.approx(1.0)
        assert s["participation"]["ok"] == pytest.approx(rounds["num_ok"].sum() / len(cr))
        assert s["participation"]["unavailable"] == pytest.approx(rounds["num_unavailable"].sum() / len(cr))

        assert s["finished"] and s["run"] == path.stem
        assert math.isnan(s["rounds_to_target"]) and math.isnan(s["emulated_time_to_target_s"])


def test_target_accuracy(small_traces: list[Path]) -> None:
    path = small_traces[1]
    rounds = direct(path)["rounds"]
    acc = rounds["test_accuracy"].astype(np.float64)
    run = analysis.open(path)

    target = float(np.nanmax(acc))  # reached exactly, at the first round with the best accuracy
    first = int(np.flatnonzero(acc >= target)[0])
    s = analysis.summarize(run, target_accuracy=target)
    assert s["target_accuracy"] == target
    assert s["rounds_to_target"] == first + 1
    assert s["emulated_time_to_target_s"] == pytest.approx(rounds["emulated_time_s"][first])

    low = analysis.summarize(run, target_accuracy=0.0)  # the first evaluated round reaches it
    first_eval = int(np.flatnonzero(~np.isnan(acc))[0])
    assert low["rounds_to_target"] == first_eval + 1
    assert low["emulated_time_to_target_s"] == pytest.approx(rounds["emulated_time_s"][first_eval])

    never = analysis.summarize(run, target_accuracy=1.01)
    assert math.isnan(never["rounds_to_target"]) and math.isnan(never["emulated_time_to_target_s"])


def test_measured_energy_with_a_meter(small_traces: list[Path], tmp_path: Path) -> None:
    # No GPU here: give a copy measured values (some missing, like meter_short windows) and meter=nvml.
    path = tmp_path / "metered.h5"
    shutil.copy(small_traces[0], path)
    with h5py.File(path, "a") as f:
        cr = f["client_rounds/table"][()]
        measured = cr["energy_j"] * 1.5 + 0.25
        measured[::5] = np.nan
        cr["energy_measured_j"] = measured
        f["client_rounds/table"][:] = cr
        rounds = f["rounds/table"][()]
        rounds["energy_measured_j"] = [np.nansum(measured[cr["round"] == r]) for r in rounds["round"]]
        f["rounds/table"][:] = rounds
        f.attrs["meter"] = "nvml"
        names = [n.decode() for n in f["devices/table"]["name"]]

    s = analysis.summarize(analysis.open(path))
    assert s["meter"] == "nvml"
    assert s["energy_measured_j"] == pytest.approx(np.nansum(measured))
    for i in sorted(set(cr["device"].tolist())):
        assert s["energy_by_device"][names[i]]["measured_j"] == pytest.approx(np.nansum(measured[cr["device"] == i]))


def test_summary_table(small_traces: list[Path]) -> None:
    runs = [analysis.open(p) for p in small_traces]
    table = analysis.summary_table(runs, target_accuracy=0.3)
    assert len(table) == 2
    assert table["run"].tolist() == [p.stem for p in small_traces]
    for i, path in enumerate(small_traces):
        d = direct(path)
        s = analysis.summarize(runs[i], target_accuracy=0.3)
        assert table.loc[i, "energy_j"] == pytest.approx(d["cr"]["energy_j"].sum())
        assert table.loc[i, "bytes_up"] == d["rounds"]["bytes_up"].sum()
        assert table.loc[i, "participation.ok"] == pytest.approx(s["participation"]["ok"])
        for name, values in s["energy_by_device"].items():
            assert table.loc[i, f"energy_by_device.{name}.modelled_j"] == pytest.approx(values["modelled_j"])
        for name, values in s["memory_by_device"].items():
            assert table.loc[i, f"memory_by_device.{name}.peak_bytes_max"] == values["peak_bytes_max"]
    # Flat: no dict-valued cells.
    assert not any(isinstance(v, dict) for v in table.to_numpy().ravel())

    # open_many's summary puts the run and the varying config keys in front.
    sweep = analysis.open_many(small_traces).summary_table(target_accuracy=0.3)
    assert list(sweep.columns[:1]) == ["run"] and "data.partition.alpha" in sweep.columns
    assert sweep["final_accuracy"].tolist() == pytest.approx(table["final_accuracy"].tolist())
