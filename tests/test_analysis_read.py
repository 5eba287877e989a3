"""analysis.read: traces into pandas, checked against the HDF5 datasets read directly with h5py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.read import SCHEMA_VERSIONS, STATUS_NAMES, TABLE_FIELDS
from emulator import records
from tests.conftest import fedemu_env


def raw(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r", swmr=True) as f:
        return f[name][()]


def raw_attrs(path: Path) -> dict:
    with h5py.File(path, "r", swmr=True) as f:
        return dict(f.attrs)


def decoded(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") for v in values]


def test_schema_copies_match_the_writer() -> None:
    # analysis copies the schema (it may not import the runtime); the copies must not drift.
    assert records.SCHEMA_VERSION in SCHEMA_VERSIONS
    assert tuple(STATUS_NAMES) == tuple(records.STATUS_NAMES)
    writer = {
        "clients": records.CLIENT_DTYPE, "devices": records.DEVICE_DTYPE, "rounds": records.ROUND_DTYPE,
        "client_rounds": records.CLIENT_ROUND_DTYPE, "events": records.EVENT_DTYPE,
        "nvml": records.NVML_SAMPLE_DTYPE,
    }
    assert set(TABLE_FIELDS) == set(writer)
    for group, dtype in writer.items():
        assert np.dtype(TABLE_FIELDS[group]) == dtype, group


def test_tables_equal_the_hdf5_datasets(small_traces: list[Path]) -> None:
    for path in small_traces:
        run = analysis.open(path)
        rounds = raw(path, "rounds/table")
        cr = raw(path, "client_rounds/table")
        clients = raw(path, "clients/table")
        devices = raw(path, "devices/table")
        events = raw(path, "events/table")
        nvml = raw(path, "nvml/table")

        assert len(run.rounds) == len(rounds) == 4
        assert len(run.client_rounds) == len(cr) > 0  # a finished run: no extra client rows
        assert len(run.clients) == len(clients) == 20
        assert len(run.devices) == len(devices) > 0
        assert len(run.events) == len(events) > 0
        assert len(run.nvml) == len(nvml)
        assert run.stitch.empty and run.rl.empty

        assert run.rounds["round"].tolist() == rounds["round"].tolist()
        np.testing.assert_array_equal(run.rounds["test_accuracy"].to_numpy(), rounds["test_accuracy"])
        np.testing.assert_array_equal(run.rounds["energy_j"].to_numpy(), rounds["energy_j"])
        np.testing.assert_array_equal(run.rounds["emulated_time_s"].to_numpy(), rounds["emulated_time_s"])
        assert run.client_rounds["client"].tolist() == cr["client"].tolist()
        assert run.client_rounds["status"].tolist() == cr["status"].tolist()
        np.testing.assert_array_equal(run.client_rounds["energy_j"].to_numpy(), cr["energy_j"])
        np.testing.assert_array_equal(run.client_rounds["peak_memory_bytes"].to_numpy(), cr["peak_memory_bytes"])
        assert run.clients["num_samples"].tolist() == clients["num_samples"].tolist()
        np.testing.assert_array_equal(run.label_counts, raw(path, "clients/label_counts"))

        # Byte strings come back as str.
        assert run.devices["name"].tolist() == decoded(devices["name"])
        assert run.devices["kind"].tolist() == decoded(devices["kind"])
        assert run.events["kind"].tolist() == decoded(events["kind"])
        assert run.events["message"].tolist() == decoded(events["message"])
        assert all(isinstance(v, str) for v in run.events["level"])

        attrs = raw_attrs(path)
        assert run.config == tomllib.loads(attrs["config"])
        assert run.meta["schema_version"] == 2
        assert run.meta["meter"] == attrs["meter"]
        assert run.meta["ranks"] == int(attrs["ranks"]) and isinstance(run.meta["ranks"], int)
        assert isinstance(run.meta["hosts"], list) and isinstance(run.meta["package_versions"], dict)
        assert isinstance(run.meta["gpus"], list) and isinstance(run.meta["gpu_sharing"], dict)
        assert "config" not in run.meta
        assert run.finished


def test_config_value(small_traces: list[Path]) -> None:
    alphas = [analysis.open(p).config_value("data.partition.alpha") for p in small_traces]
    assert alphas == [0.1, 1.0]
    run = analysis.open(small_traces[0])
    assert run.config_value("rounds") == 4
    assert run.config_value("data.partition") == run.config["data"]["partition"]
    with pytest.raises(KeyError, match=r"data\.nope"):
        run.config_value("data.nope")
    assert run.config_value("data.nope", None) is None


def test_status_name_mapping(small_traces: list[Path]) -> None:
    for path in small_traces:
        run = analysis.open(path)
        codes = raw(path, "client_rounds/table")["status"]
        col = run.client_rounds["status_name"]
        assert isinstance(col.dtype, pd.CategoricalDtype)
        assert list(col.cat.categories) == ["ok", "oom", "dropped", "late", "unavailable"]
        assert col.tolist() == [records.STATUS_NAMES[c] for c in codes]
        columns = list(run.client_rounds.columns)
        assert columns.index("status_name") == columns.index("status") + 1
    # The small mix has offline devices: both traces together show more than one status.
    statuses = set()
    for path in small_traces:
        statuses |= set(analysis.open(path).client_rounds["status_name"])
    assert {"ok", "unavailable"} <= statuses


def test_device_name_join(small_traces: list[Path]) -> None:
    for path in small_traces:
        run = analysis.open(path)
        names = decoded(raw(path, "devices/table")["name"])
        cr = raw(path, "client_rounds/table")
        clients = raw(path, "clients/table")
        assert run.client_rounds["device_name"].tolist() == [names[d] for d in cr["device"]]
        assert run.clients["device_name"].tolist() == [names[d] for d in clients["device"]]
        assert len(set(run.client_rounds["device_name"])) > 1  # a mix, not one device
        columns = list(run.client_rounds.columns)
        assert columns.index("device_name") == columns.index("device") + 1


def test_client_rows_without_a_round_row_are_dropped(small_traces: list[Path], tmp_path: Path) -> None:
    # A killed run can leave one more round of client rows than round rows (docs/trace-schema.md).
    path = tmp_path / "extra.h5"
    shutil.copy(small_traces[0], path)
    with h5py.File(path, "a") as f:
        ds = f["client_rounds/table"]
        extra = ds[:3].copy()
        extra["round"] = len(f["rounds/table"])
        n = ds.shape[0]
        ds.resize((n + len(extra),))
        ds[n:] = extra
    assert len(raw(path, "client_rounds/table")) == n + 3
    run = analysis.open(path)
    assert len(run.client_rounds) == n
    assert set(run.client_rounds["round"]) == set(run.rounds["round"])


def test_open_many(small_traces: list[Path]) -> None:
    pattern = str(small_traces[0].parent / "*.h5")
    runs = analysis.open_many(pattern)
    assert [r.path for r in runs.runs] == sorted(small_traces)
    assert "data.partition.alpha" in runs.varying
    assert "rounds" not in runs.varying  # the same in both runs

    n_rounds = [len(raw(p, "rounds/table")) for p in sorted(small_traces)]
    n_cr = [len(raw(p, "client_rounds/table")) for p in sorted(small_traces)]
    assert len(runs.rounds) == sum(n_rounds)
    assert len(runs.client_rounds) == sum(n_cr)
    stems = [p.stem for p, n in zip(sorted(small_traces), n_rounds, strict=True) for _ in range(n)]
    assert runs.rounds["run"].tolist() == stems
    assert runs.rounds.groupby("run")["data.partition.alpha"].first().to_dict() == {"alpha0.1": 0.1, "alpha1.0": 1.0}
    assert sorted(set(runs.client_rounds["data.partition.alpha"])) == [0.1, 1.0]
    assert runs.rounds.columns[0] == "run"
    assert isinstance(runs.client_rounds["status_name"].dtype, pd.CategoricalDtype)

    summary = runs.summary
    assert len(summary) == 2
    assert summary["data.partition.alpha"].tolist() == [0.1, 1.0]
    assert summary["run"].tolist() == ["alpha0.1", "alpha1.0"]

    # A list of paths and a directory work too.
    assert len(analysis.open_many(small_traces).runs) == 2
    assert len(analysis.open_many(small_traces[0].parent).runs) == 2


def test_open_many_without_matches(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing-*.h5")
    with pytest.raises(analysis.TraceError, match="nothing-"):
        analysis.open_many(pattern)


# -- corrupted and foreign files: each is one TraceError line naming the file ------------------


def _not_hdf5(path: Path, source: Path) -> None:
    path.write_text("round,accuracy\n0,0.5\n")


def _no_schema_version(path: Path, source: Path) -> None:
    with h5py.File(path, "w") as f:
        f["rounds/table"] = np.zeros(3)


def _schema_99(path: Path, source: Path) -> None:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99


def _rounds_deleted(path: Path, source: Path) -> None:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        del f["rounds/table"]


def _rounds_other_dtype(path: Path, source: Path) -> None:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        del f["rounds/table"]
        f["rounds/table"] = np.zeros(4, dtype=[("round", "<f8"), ("accuracy", "<f4")])


def _rounds_plain_floats(path: Path, source: Path) -> None:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        del f["rounds/table"]
        f["rounds/table"] = np.zeros(4)


def _events_group_deleted(path: Path, source: Path) -> None:
    shutil.copy(source, path)
    with h5py.File(path, "a") as f:
        del f["events"]


def _truncated(path: Path, source: Path) -> None:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "not HDF5": (_not_hdf5, "not an HDF5 file"),
    "no schema_version": (_no_schema_version, "not a fedemu trace"),
    "schema 99": (_schema_99, "unknown schema version 99.*knows version 2"),
    "/rounds/table deleted": (_rounds_deleted, "corrupted group /rounds"),
    "/rounds/table other dtype": (_rounds_other_dtype, "corrupted group /rounds:.*missing fields"),
    "/rounds/table not a table": (_rounds_plain_floats, "corrupted group /rounds:.*not a compound"),
    "/events deleted": (_events_group_deleted, "missing group /events"),
    "truncated": (_truncated, "truncated"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_files_raise_one_line(case: str, small_traces: list[Path], tmp_path: Path) -> None:
    make, pattern = CORRUPTIONS[case]
    path = tmp_path / "broken.h5"
    make(path, small_traces[0])
    start = time.monotonic()
    with pytest.raises(analysis.TraceError, match=pattern) as info:
        analysis.open(path)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "Traceback" not in message
    assert analysis.TraceError.EXIT_CODE == 2


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(analysis.TraceError, match="no such file") as info:
        analysis.open(tmp_path / "absent.h5")
    assert str(tmp_path / "absent.h5") in str(info.value)
    with pytest.raises(analysis.TraceError, match="directory"):
        analysis.open(tmp_path)


# -- live reading --------------------------------------------------------------------------------


def _try_open(path: Path) -> analysis.Run | None:
    try:
        return analysis.open(path)
    except analysis.TraceError:
        return None  # not created yet, or caught while the writer builds its layout


def test_reads_a_live_run_then_the_killed_file(tmp_path: Path) -> None:
    trace = tmp_path / "live.h5"
    cmd = [sys.executable, "-m", "emulator", "run"]
    for s in ["name=live", "data.dataset=synthetic", "data.num_samples=400", "data.num_classes=4",
              "data.image_size=16", "data.partition.num_clients=10", "clients_per_round=4", "rounds=100000",
              "eval_every=1", "deadline_s=0", "runtime.progress=none", "runtime.threads=1",
              f"output.trace={trace}"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=fedemu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        run = None
        while run is None or len(run.rounds) < 2:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run wrote no rounds in time"
            time.sleep(0.1)
            run = _try_open(trace)
        # The rounds flushed so far, each with all of its client rows.
        n = len(run.rounds)
        assert not run.finished
        assert run.rounds["round"].tolist() == list(range(n))
        assert run.client_rounds["round"].value_counts().sort_index().tolist() == run.rounds["cohort_size"].tolist()
        assert run.events["kind"].iloc[0] == "start"
        assert run.config_value("rounds") == 100000

        # Reading again shows the rounds written meanwhile.
        while len(run.rounds) <= n:
            assert proc.poll() is None
            assert time.monotonic() < deadline, "the run wrote no more rounds"
            time.sleep(0.1)
            run = analysis.open(trace)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The killed file (its SWMR flag still set) reads too.
    killed = analysis.open(trace)
    assert len(killed.rounds) >= len(run.rounds) and not killed.finished
    assert set(killed.client_rounds["round"]) == set(killed.rounds["round"])

    # A truncated copy of a killed file fails in bounded time (SWMR readers retry damaged metadata).
    half = tmp_path / "killed-half.h5"
    data = trace.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    start = time.monotonic()
    with pytest.raises(analysis.TraceError, match=str(half)):
        analysis.open(half)
    assert time.monotonic() - start < 20
