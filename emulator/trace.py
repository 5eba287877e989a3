"""The run trace: one HDF5 file written by rank 0, readable while the run goes on.

The writer opens the file with ``libver="latest"``, creates the whole layout, then
switches to SWMR (single writer, multiple readers) mode: from then on no object may
be created, only datasets extended. Every append extends, writes and flushes its
datasets, so a reader opening with ``swmr=True`` sees each finished round, and a job
killed with SIGKILL keeps every round whose append returned. ``docs/trace-schema.md``
documents the layout and each column.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from emulator import records
from emulator.errors import UserError

# Chunking and compression. Under SWMR, HDF5 never reuses the file space of a chunk it
# rewrites, and a compressed chunk is rewritten (to a new place) by every flush that
# touches it. So a compressed table must get one flush per chunk to stay small:
# - client_rounds: one chunk per round (chunk = cohort size), each written once, full;
#   measured 15-24 B/row against 49 B raw, while a 2048-row chunk flushed every 50 rows
#   grew the file to 270 B/row.
# - rounds: one row per flush, so any compression costs space (178 B/row with 8-row
#   chunks against 58 B/row raw, measured); stored uncompressed, written in place.
# - events: rows are mostly NUL padding, so small compressed chunks still win (257 B/row
#   against 536 B raw) and events are few.
DEFAULT_CLIENT_ROUNDS_CHUNK = 128  # when the caller gives no cohort size
MAX_CLIENT_ROUNDS_CHUNK = 65536  # ~3 MiB of rows
ROUNDS_CHUNK = 256  # 56 B/row -> 14 KiB
EVENTS_CHUNK = 8
STATIC_CHUNK_BYTES = 1 << 20  # static tables are written once; chunked for compression
ALGORITHM_CHUNK_BYTES = 1 << 14  # algorithm tables: written per round, uncompressed, like /rounds
GZIP_LEVEL = 1  # higher levels cost time every round for a few percent of size

EVENT_LEVELS = ("info", "warning", "error")
GROUPS = ("clients", "devices", "rounds", "client_rounds", "events", "nvml")
NVML_CHUNK = 1024
_TABLE_DTYPES = {
    "clients": records.CLIENT_DTYPE,
    "devices": records.DEVICE_DTYPE,
    "nvml": records.NVML_SAMPLE_DTYPE,
    "rounds": records.ROUND_DTYPE,
    "client_rounds": records.CLIENT_ROUND_DTYPE,
    "events": records.EVENT_DTYPE,
}
_ELLIPSIS = "\u2026".encode()


def _fit_utf8(text: str, width: int, *, mark: bool = False) -> bytes:
    """``text`` as UTF-8 in at most ``width`` bytes, never cutting a character in half.

    With ``mark`` a cut string ends in an ellipsis so readers can tell it was truncated.
    """
    raw = text.encode("utf-8", "replace")
    if len(raw) <= width:
        return raw
    keep = width - len(_ELLIPSIS) if mark else width
    # Dropping the bytes of a half-cut trailing character: "ignore" on a prefix of
    # valid UTF-8 only ever discards that incomplete tail.
    cut = raw[:keep].decode("utf-8", "ignore").encode("utf-8")
    return cut + _ELLIPSIS if mark else cut


def _check_table(rows: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if not isinstance(rows, np.ndarray) or rows.dtype != dtype:
        got = rows.dtype if isinstance(rows, np.ndarray) else type(rows).__name__
        raise TypeError(f"{what} must be a numpy array of the records.py dtype, got {got}")
    return np.ascontiguousarray(rows.reshape(-1))


class TraceWriter:
    """Appends rounds and events to a SWMR HDF5 trace; rank 0 only (h5py is serial).

    Usable as a context manager; :meth:`close` is idempotent.
    """

    def __init__(
        self,
        path: Path,
        *,
        attrs: Mapping[str, str | int | float | bool],
        clients: np.ndarray,
        label_counts: np.ndarray,
        devices: np.ndarray | None = None,
        overwrite: bool = False,
        cohort_size: int | None = None,
        tables: Mapping[str, np.dtype] | None = None,
    ) -> None:
        """Create the trace at ``path`` with its whole layout, then enter SWMR mode.

        ``cohort_size``: the number of client rows ``append_round`` usually gets; it
        sizes the chunks of ``/client_rounds`` so each round writes one whole chunk.
        ``tables``: an algorithm's own extendable datasets, ``"group/name" -> dtype``
        (SWMR allows no new objects later, so they are declared here); see :meth:`append`.
        """
        self.path = Path(path)
        self.write_seconds = 0.0
        self._file: h5py.File | None = None

        # Validate everything before touching the disk, so a bad call leaves no
        # half-written file that the next run would refuse to overwrite.
        clients = _check_table(clients, records.CLIENT_DTYPE, "clients")
        label_counts = self._check_label_counts(label_counts, len(clients))
        if devices is None:
            devices = np.zeros(0, dtype=records.DEVICE_DTYPE)
        devices = _check_table(devices, records.DEVICE_DTYPE, "devices")
        if cohort_size is None:
            cr_chunk = DEFAULT_CLIENT_ROUNDS_CHUNK
        elif isinstance(cohort_size, int | np.integer) and cohort_size >= 1:
            cr_chunk = min(int(cohort_size), MAX_CLIENT_ROUNDS_CHUNK)
        else:
            raise ValueError(f"cohort_size must be a positive int, got {cohort_size!r}")
        for key, value in attrs.items():
            if key == "schema_version":
                raise ValueError("attrs must not set 'schema_version'; the writer sets it")
            if not isinstance(value, str | int | float | bool | np.generic):
                raise TypeError(f"attribute {key!r} has unsupported type {type(value).__name__}")

        tables = dict(tables or {})
        for key in tables:
            group = key.split("/")[0]
            if key.count("/") != 1 or group in GROUPS or not all(key.split("/")):
                raise ValueError(f"algorithm table {key!r} must be 'group/name' outside {GROUPS}")
        if self.path.is_dir():
            raise UserError(f"trace path {self.path} is a directory; set output.trace to a file")
        if self.path.exists() and not overwrite:
            raise UserError(
                f"trace file {self.path} already exists; pass --set output.overwrite=true "
                "or choose another output.trace"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # "best-effort" locking: parallel file systems often have no POSIX locks.
            f = h5py.File(self.path, "w", libver="latest", locking="best-effort")
        except OSError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot create trace file {self.path}: {reason}") from None

        try:
            self._create_layout(f, attrs, clients, label_counts, devices, cr_chunk)
            for key, dtype in tables.items():
                dt = np.dtype(dtype)
                # Appended once per round like /rounds: uncompressed (see the chunking note above).
                f.create_dataset(key, shape=(0,), maxshape=(None,), dtype=dt,
                                 chunks=(max(1, min(4096, ALGORITHM_CHUNK_BYTES // dt.itemsize)),))
            # Flushes the layout and attributes; from here on only appends are allowed.
            f.swmr_mode = True
        except BaseException:
            f.close()
            self.path.unlink(missing_ok=True)
            raise
        self._file = f
        self._rounds: h5py.Dataset = f["rounds/table"]
        self._client_rounds: h5py.Dataset = f["client_rounds/table"]
        self._events: h5py.Dataset = f["events/table"]
        self._nvml: h5py.Dataset = f["nvml/table"]
        self._tables: dict[str, h5py.Dataset] = {key: f[key] for key in tables}

    @classmethod
    def resume(
        cls,
        path: Path,
        *,
        lengths: Mapping[str, int],
        attrs: Mapping[str, str | int | float | bool],
        tables: Mapping[str, np.dtype] | None = None,
    ) -> TraceWriter:
        """Continue the trace at ``path`` from a checkpoint that saw ``lengths`` rows per table.

        Rows written after that checkpoint (a round that finished but was not checkpointed, or
        half of one) are dropped; ``/events`` keeps every row (what happened before a kill is
        worth keeping). The old file is read (``swmr=True``: a killed writer leaves it flagged
        open), copied into a new file beside it, and renamed over it only when the copy is
        complete, so a job killed while resuming still has the old trace. ``attrs`` replace the
        old root attributes of the same name.
        """
        path = Path(path)
        tables = dict(tables or {})
        try:
            old = h5py.File(path, "r", swmr=True, locking="best-effort")
        except OSError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"cannot resume trace {path}: {reason}") from None
        with old:
            if old.attrs.get("schema_version") != records.SCHEMA_VERSION:
                raise UserError(f"cannot resume trace {path}: schema version {old.attrs.get('schema_version')}, "
                                f"this fedemu writes {records.SCHEMA_VERSION}")
            merged = {k: v for k, v in old.attrs.items() if k != "schema_version"}
            merged.update(attrs)
            rows: dict[str, np.ndarray] = {}
            for key in [f"{g}/table" for g in ("rounds", "client_rounds", "nvml")] + list(tables):
                if key not in old:
                    raise UserError(f"cannot resume trace {path}: it has no {key} (another algorithm's trace?)")
                n = int(lengths.get(key, -1))
                if n < 0 or n > old[key].shape[0]:
                    raise UserError(f"cannot resume trace {path}: {key} has {old[key].shape[0]} rows, "
                                    f"the checkpoint expects {n}; the trace does not belong to this checkpoint")
                rows[key] = old[key][:n]
            rows["events/table"] = old["events/table"][:]
            chunk = old["client_rounds/table"].chunks[0]
            writer = cls(path.with_name(path.name + ".resume-tmp"), attrs=merged,
                         clients=old["clients/table"][:], label_counts=old["clients/label_counts"][:],
                         devices=old["devices/table"][:], overwrite=True, cohort_size=chunk, tables=tables)
        try:
            f = writer._live()
            for key, data in rows.items():
                if len(data):
                    writer._append(f[key], data)
            f.flush()
            os.replace(writer.path, path)  # HDF5 keeps writing through its open descriptor
        except BaseException:
            writer.close()
            writer.path.unlink(missing_ok=True)
            raise
        writer.path = path
        return writer

    def read(self, key: str) -> np.ndarray:
        """Every row written so far to ``key`` (e.g. ``"rounds/table"``)."""
        return self._live()[key][:]

    def lengths(self) -> dict[str, int]:
        """Rows in every table that grows per round (what a checkpoint records)."""
        f = self._live()
        keys = [f"{g}/table" for g in ("rounds", "client_rounds", "nvml", "events")] + list(self._tables)
        return {key: int(f[key].shape[0]) for key in keys}

    @staticmethod
    def _check_label_counts(label_counts: np.ndarray, num_clients: int) -> np.ndarray:
        counts = np.asarray(label_counts)
        if (
            counts.dtype.kind not in "iu"
            or counts.ndim != 2
            or counts.shape[0] != num_clients
            or counts.size == 0
        ):
            raise ValueError(
                f"label_counts must be a non-empty integer [num_clients={num_clients}, "
                f"num_classes] array, got {counts.dtype} {counts.shape}"
            )
        if counts.min() < 0 or counts.max() > np.iinfo(np.int32).max:
            raise ValueError("label_counts must fit in int32 and be non-negative")
        return counts.astype(np.int32)

    @staticmethod
    def _create_layout(
        f: h5py.File,
        attrs: Mapping[str, str | int | float | bool],
        clients: np.ndarray,
        label_counts: np.ndarray,
        devices: np.ndarray,
        client_rounds_chunk: int,
    ) -> None:
        f.attrs["schema_version"] = records.SCHEMA_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value
        packing = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True}

        # Static tables: fixed size, chunked only because compression requires it.
        n, k = label_counts.shape
        f.create_group("clients")
        f.create_dataset(
            "clients/table",
            data=clients,
            chunks=(min(n, STATIC_CHUNK_BYTES // clients.dtype.itemsize),),
            **packing,
        )
        f.create_dataset(
            "clients/label_counts",
            data=label_counts,
            chunks=(max(1, min(n, STATIC_CHUNK_BYTES // (4 * k))), k),
            **packing,
        )
        f.create_group("devices")
        f.create_dataset("devices/table", data=devices)
        for group, chunk, compress in (
            ("nvml", NVML_CHUNK, True),
            ("rounds", ROUNDS_CHUNK, False),
            ("client_rounds", client_rounds_chunk, True),
            ("events", EVENTS_CHUNK, True),
        ):
            f.create_group(group)
            f.create_dataset(
                f"{group}/table",
                shape=(0,),
                maxshape=(None,),
                dtype=_TABLE_DTYPES[group],
                chunks=(chunk,),
                **(packing if compress else {}),
            )

    def _live(self) -> h5py.File:
        if self._file is None:
            raise ValueError(f"trace {self.path} is closed")
        return self._file

    @staticmethod
    def _append(ds: h5py.Dataset, rows: np.ndarray) -> None:
        start = ds.shape[0]
        ds.resize((start + len(rows),))
        ds[start:] = rows
        # H5Dflush: new rows become visible to SWMR readers and survive a killed process
        # (they reach the OS; no fsync, so not a power cut).
        ds.flush()

    def append_round(self, round_row: np.ndarray, client_rows: np.ndarray) -> None:
        """Append one ``ROUND_DTYPE`` row and its ``CLIENT_ROUND_DTYPE`` rows (k >= 0)."""
        self._live()
        row = _check_table(round_row, records.ROUND_DTYPE, "round_row")
        if len(row) != 1:
            raise ValueError(f"round_row must hold exactly one row, got {len(row)}")
        rows = _check_table(client_rows, records.CLIENT_ROUND_DTYPE, "client_rows")
        t0 = time.perf_counter()
        # Client rows first: a reader that sees round r in /rounds finds its clients too.
        if len(rows):
            self._append(self._client_rounds, rows)
        self._append(self._rounds, row)
        self.write_seconds += time.perf_counter() - t0

    def append_nvml(self, samples: np.ndarray) -> None:
        """Append background NVML samples (``NVML_SAMPLE_DTYPE``); nothing to do when empty."""
        self._live()
        rows = _check_table(samples, records.NVML_SAMPLE_DTYPE, "samples")
        if len(rows):
            t0 = time.perf_counter()
            self._append(self._nvml, rows)
            self.write_seconds += time.perf_counter() - t0

    def append(self, key: str, rows: np.ndarray) -> int:
        """Append rows to an algorithm table declared at creation; returns the index of the first row.

        Ragged data (e.g. a score matrix per step) goes into a flat value table, with its
        start index and shape in a row of the step table.
        """
        self._live()
        ds = self._tables.get(key)
        if ds is None:
            raise ValueError(f"trace table {key!r} was not declared; declared: {sorted(self._tables)}")
        rows = np.asarray(rows, dtype=ds.dtype).reshape(-1)
        start = ds.shape[0]
        if len(rows):
            t0 = time.perf_counter()
            self._append(ds, rows)
            self.write_seconds += time.perf_counter() - t0
        return start

    def event(
        self,
        kind: str,
        message: str,
        *,
        level: str = "info",
        round: int = -1,
        rank: int = 0,
    ) -> None:
        """Append one event and flush it at once, so it survives a crash that follows."""
        self._live()
        if level not in EVENT_LEVELS:
            raise ValueError(f"event level must be one of {EVENT_LEVELS}, got {level!r}")
        t0 = time.perf_counter()
        row = np.zeros(1, dtype=records.EVENT_DTYPE)
        row["unix_time_s"] = time.time()
        row["round"] = round
        row["rank"] = rank
        row["level"] = level.encode()
        row["kind"] = _fit_utf8(kind, records.EVENT_DTYPE["kind"].itemsize)
        row["message"] = _fit_utf8(message, records.EVENT_DTYPE["message"].itemsize, mark=True)
        self._append(self._events, row)
        self.write_seconds += time.perf_counter() - t0

    def flush(self) -> None:
        """Flush the whole file (appends already flush their datasets)."""
        t0 = time.perf_counter()
        self._live().flush()
        self.write_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            f.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_trace(path: Path) -> h5py.File:
    """Open a trace for reading, live, finished or killed alike; checks the schema version.

    ``swmr=True`` is required: it reads a file still being written, and a file whose
    writer was killed (a plain open refuses those with "file is already open for write").
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r", swmr=True, locking="best-effort")
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read trace {path}: {reason}") from None
    version = f.attrs.get("schema_version")
    if version is None:
        f.close()
        raise UserError(f"{path} is not a fedemu trace (no schema_version attribute)")
    if version != records.SCHEMA_VERSION:
        f.close()
        raise UserError(
            f"trace {path} has schema version {version}, this fedemu reads version "
            f"{records.SCHEMA_VERSION}; use the fedemu version that wrote it"
        )
    return f


def read_table(path: Path, group: str) -> np.ndarray:
    """All rows of ``/<group>/table`` (one of :data:`GROUPS`) as a structured array."""
    if group not in GROUPS:
        raise ValueError(f"unknown trace group {group!r}; choose one of {GROUPS}")
    with open_trace(path) as f:
        return f[f"{group}/table"][:]
