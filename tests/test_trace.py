"""The HDF5 trace: round trip, live SWMR readers, survival of SIGKILL, misuse."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from emulator import records
from emulator.errors import UserError
from emulator.trace import TraceWriter, open_trace, read_table

REPO = Path(__file__).resolve().parents[1]

# Deterministic rows, shared with the child processes (prepended to their scripts) so
# the parent can recompute exactly what a killed writer wrote.
ROWS_SRC = textwrap.dedent(
    """
    import numpy as np
    from emulator import records

    def rows_for(r):
        k = 3 + r % 4  # cohort size varies, so rounds straddle chunk boundaries
        rows = np.zeros(k, dtype=records.CLIENT_ROUND_DTYPE)
        rows["round"] = r
        rows["client"] = (np.arange(k) * 7 + r) % 40
        rows["rank"] = 1 + np.arange(k) % 3
        rows["num_samples"] = 100 + rows["client"]
        rows["steps"] = 5 + r
        rows["status"] = np.arange(k) % len(records.STATUS_NAMES)
        rows["train_loss"] = 2.5 / (1 + r) + 0.01 * np.arange(k)
        rows["wall_time_s"] = 0.125 * (r + 1) + np.arange(k)
        rows["bytes_down"] = 4 * 1_000_003
        rows["bytes_up"] = 4 * 1_000_003 + r
        row = np.zeros(1, dtype=records.ROUND_DTYPE)
        row["round"] = r
        row["cohort_size"] = k
        row["num_ok"] = int((rows["status"] == records.STATUS_OK).sum())
        row["train_loss"] = rows["train_loss"].mean()
        row["test_accuracy"] = 0.5 + r / 1000 if r % 3 == 0 else np.nan
        row["test_loss"] = 1.0 / (1 + r) if r % 3 == 0 else np.nan
        row["wall_time_s"] = 0.25 * r
        row["bytes_down"] = rows["bytes_down"].sum()
        row["bytes_up"] = rows["bytes_up"].sum()
        row["unix_time_s"] = 1.7e9 + r
        return row, rows

    def static_tables():
        clients = np.zeros(40, dtype=records.CLIENT_DTYPE)
        clients["client"] = np.arange(40)
        clients["num_samples"] = 100 + np.arange(40)
        label_counts = (np.arange(400, dtype=np.int32).reshape(40, 10) % 17)
        return clients, label_counts
    """
)
_ns: dict[str, Any] = {}
exec(ROWS_SRC, _ns)
rows_for = _ns["rows_for"]
static_tables = _ns["static_tables"]

ATTRS = {
    "config": '[run]\nseed = 7\nname = "café"\n' + "# padding\n" * 5000,  # > 64 KiB header limit
    "package_versions": json.dumps({"numpy": np.__version__, "h5py": h5py.__version__}),
    "mpi_library": "MPICH 4.2",
    "ranks": 4,
    "seed": 7,
    "lr": 0.05,
    "resumed": False,
}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ROWS_SRC + textwrap.dedent(script)],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or a failure (with its stderr) after ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            pytest.fail(f"child silent for {timeout} s; stderr: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    if not line:
        pytest.fail(f"child exited {proc.wait()}; stderr: {proc.communicate()[1]}")
    return line.strip()


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill the child if still running and release its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def new_writer(path: Path, **kwargs: Any) -> TraceWriter:
    clients, label_counts = static_tables()
    return TraceWriter(path, attrs=ATTRS, clients=clients, label_counts=label_counts, **kwargs)


def expected(rounds: range) -> tuple[np.ndarray, np.ndarray]:
    pairs = [rows_for(r) for r in rounds]
    return (
        np.concatenate([np.zeros(0, records.ROUND_DTYPE)] + [p[0] for p in pairs]),
        np.concatenate([np.zeros(0, records.CLIENT_ROUND_DTYPE)] + [p[1] for p in pairs]),
    )


def assert_rows_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert len(got) == len(want)
    # Byte equality compares NaN test_accuracy exactly too.
    assert got.tobytes() == want.tobytes()


@pytest.mark.timeout(30)
def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "run.h5"  # parents are created
    long = "é" * 300 + "tail"  # 604 bytes, 2-byte characters straddle the 480-byte cut
    with new_writer(path) as w:
        for r in range(6):
            w.append_round(*rows_for(r))
        w.append_round(np.zeros(1, records.ROUND_DTYPE), np.zeros(0, records.CLIENT_ROUND_DTYPE))
        w.event("start", "run started", round=-1, rank=0)
        w.event("eval", long, level="warning", round=3, rank=2)
        w.event("k" * 50, "x", level="error")

    rounds, client_rounds = expected(range(6))
    rounds = np.concatenate([rounds, np.zeros(1, records.ROUND_DTYPE)])
    assert_rows_equal(read_table(path, "rounds"), rounds)
    assert_rows_equal(read_table(path, "client_rounds"), client_rounds)
    clients, label_counts = static_tables()
    assert_rows_equal(read_table(path, "clients"), clients)

    with open_trace(path) as f:
        assert f.attrs["schema_version"] == records.SCHEMA_VERSION
        for key, value in ATTRS.items():
            assert f.attrs[key] == value, key
        np.testing.assert_array_equal(f["clients/label_counts"][:], label_counts)
        assert f["clients/label_counts"].dtype == np.int32
        for name in ("clients/table", "clients/label_counts", "client_rounds/table"):
            ds = f[name]
            assert ds.chunks is not None and ds.compression == "gzip" and ds.shuffle, name
        assert f["events/table"].compression == "gzip"
        # One row per flush: compression would only grow the file under SWMR (see trace.py).
        assert f["rounds/table"].chunks is not None
        assert f["rounds/table"].compression is None

    events = read_table(path, "events")
    assert events["kind"].tolist() == [b"start", b"eval", b"k" * 32]
    assert events["level"].tolist() == [b"info", b"warning", b"error"]
    assert events["round"].tolist() == [-1, 3, -1]
    assert events["rank"].tolist() == [0, 2, 0]
    assert abs(events["unix_time_s"][0] - time.time()) < 60
    assert events["message"][0].decode() == "run started"
    msg = events["message"][1]
    assert len(msg) <= 480
    text = msg.decode("utf-8")  # still valid UTF-8 after the cut
    assert text.endswith("\u2026") and text[:-1] == "é" * len(text[:-1])
    assert len(text) > 230


@pytest.mark.timeout(30)
def test_client_rounds_chunks_follow_cohort_and_stay_compact(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    k, n = 50, 200
    rng = np.random.default_rng(0)
    with new_writer(path, cohort_size=k) as w:
        for r in range(n):
            row, _ = rows_for(r)
            rows = np.zeros(k, records.CLIENT_ROUND_DTYPE)
            rows["round"] = r
            rows["client"] = rng.permutation(1000)[:k]
            rows["train_loss"] = rng.random(k)
            rows["wall_time_s"] = rng.random(k)
            w.append_round(row, rows)
    with open_trace(path) as f:
        assert f["client_rounds/table"].chunks == (k,)
        assert f["client_rounds/table"].shape == (k * n,)
    # Each round writes one whole chunk once; a chunk rewritten by several flushes would
    # leave dead copies behind (SWMR never reuses file space) and exceed the raw size.
    raw = k * n * records.CLIENT_ROUND_DTYPE.itemsize
    assert path.stat().st_size < raw


@pytest.mark.timeout(30)
def test_swmr_reader_sees_rounds_while_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    w = new_writer(path)
    # A separate process: HDF5 would share one open file between handles of one process.
    reader = spawn(
        f"""
        import sys, h5py
        f = h5py.File({str(path)!r}, "r", swmr=True)
        rounds, client_rounds = f["rounds/table"], f["client_rounds/table"]
        for line in sys.stdin:
            rounds.refresh()
            client_rounds.refresh()
            last = int(rounds[-1]["round"]) if rounds.shape[0] else -1
            print(rounds.shape[0], client_rounds.shape[0], last, flush=True)
        """
    )
    try:
        assert reader.stdin is not None
        seen, written = [], 0
        for upto in (0, 2, 5):
            for r in range(written, upto):
                w.append_round(*rows_for(r))
            written = upto
            reader.stdin.write("check\n")
            reader.stdin.flush()
            seen.append(tuple(int(x) for x in readline(reader, 10).split()))
        want = [(n, len(expected(range(n))[1]), n - 1) for n in (0, 2, 5)]
        assert seen == want
        reader.stdin.close()
        assert reader.wait(timeout=10) == 0
    finally:
        stop(reader)
        w.close()


@pytest.mark.timeout(60)
def test_sigkilled_writer_keeps_every_finished_round(tmp_path: Path) -> None:
    path = tmp_path / "killed.h5"
    writer = spawn(
        f"""
        import time
        from pathlib import Path
        from emulator.trace import TraceWriter
        clients, label_counts = static_tables()
        w = TraceWriter(Path({str(path)!r}), attrs={{"seed": 7}}, clients=clients,
                        label_counts=label_counts)
        w.event("start", "writer up")
        print("ready", flush=True)
        r = 0
        while True:
            w.append_round(*rows_for(r))
            r += 1
            time.sleep(0.02)
        """
    )
    try:
        assert readline(writer, 20) == "ready"
        deadline = time.monotonic() + 20
        with h5py.File(path, "r", swmr=True) as f:
            ds = f["rounds/table"]
            while True:
                ds.refresh()
                if ds.shape[0] >= 5:
                    break
                assert time.monotonic() < deadline, "writer made no progress"
                time.sleep(0.01)
            seen = ds.shape[0]
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=10) == -signal.SIGKILL
    finally:
        stop(writer)

    # A plain h5py.File(path, "r") refuses a file whose SWMR writer died ("already open
    # for write"); open_trace uses swmr=True, which reads it as it was last flushed.
    rounds = read_table(path, "rounds")
    n = len(rounds)
    assert n >= seen >= 5
    want_rounds, want_clients = expected(range(n))
    assert_rows_equal(rounds, want_rounds)
    client_rounds = read_table(path, "client_rounds")
    # Client rows go in before their round row, so there may be one round more of them.
    assert_rows_equal(client_rounds[: len(want_clients)], want_clients)
    assert len(client_rounds) - len(want_clients) <= len(rows_for(n)[1])
    assert read_table(path, "events")["kind"].tolist() == [b"start"]
    with open_trace(path) as f:
        assert f.attrs["seed"] == 7


@pytest.mark.timeout(30)
def test_existing_path_needs_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with new_writer(path) as w:
        for r in range(3):
            w.append_round(*rows_for(r))
    with pytest.raises(UserError) as err:
        new_writer(path)
    msg = str(err.value)
    assert str(path) in msg and "output.overwrite=true" in msg and "\n" not in msg
    assert len(read_table(path, "rounds")) == 3  # untouched

    with new_writer(path, overwrite=True) as w:
        w.append_round(*rows_for(0))
    assert len(read_table(path, "rounds")) == 1


@pytest.mark.timeout(30)
def test_uncreatable_path_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot create trace file"):
        new_writer(blocker / "run.h5")
    with pytest.raises(UserError, match="is a directory"):
        new_writer(tmp_path, overwrite=True)


@pytest.mark.timeout(30)
def test_wrong_input_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    with new_writer(path) as w:
        row, rows = rows_for(0)
        with pytest.raises(TypeError, match="round_row"):
            w.append_round(rows, rows)  # client rows where the round row goes
        with pytest.raises(TypeError, match="client_rows"):
            w.append_round(row, rows.astype([(n, "<f8") for n in rows.dtype.names]))
        with pytest.raises(TypeError, match="client_rows"):
            w.append_round(row, rows.tolist())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="exactly one row"):
            w.append_round(np.concatenate([row, row]), rows)
        with pytest.raises(ValueError, match="level"):
            w.event("x", "y", level="debug")
        w.append_round(row, rows)
    assert len(read_table(path, "rounds")) == 1  # the refused calls wrote nothing
    assert len(read_table(path, "client_rounds")) == len(rows)
    assert len(read_table(path, "events")) == 0
    with pytest.raises(ValueError, match="closed"):
        w.append_round(row, rows)
    w.close()  # idempotent

    bad = tmp_path / "bad.h5"
    clients, label_counts = static_tables()
    with pytest.raises(ValueError, match="label_counts"):
        TraceWriter(bad, attrs={}, clients=clients, label_counts=label_counts[:-1])
    with pytest.raises(TypeError, match="attribute"):
        TraceWriter(bad, attrs={"x": [1, 2]}, clients=clients, label_counts=label_counts)  # type: ignore[dict-item]
    assert not bad.exists()  # validated before the file is created


@pytest.mark.timeout(30)
def test_reader_refuses_unknown_schema(tmp_path: Path) -> None:
    future = tmp_path / "future.h5"
    with h5py.File(future, "w") as f:
        f.attrs["schema_version"] = records.SCHEMA_VERSION + 1
        f.create_dataset("rounds/table", data=np.zeros(1, records.ROUND_DTYPE))
    with pytest.raises(UserError, match="schema version"):
        read_table(future, "rounds")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(UserError, match="not a fedemu trace"):
        read_table(other, "rounds")
    with pytest.raises(UserError, match="cannot read trace"):
        read_table(tmp_path / "missing.h5", "rounds")


@pytest.mark.timeout(30)
def test_write_seconds_grows(tmp_path: Path) -> None:
    with new_writer(tmp_path / "run.h5") as w:
        assert w.write_seconds == 0.0
        w.append_round(*rows_for(0))
        after_round = w.write_seconds
        assert after_round > 0.0
        w.event("eval", "done")
        assert w.write_seconds > after_round
