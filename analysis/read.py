"""Read fedemu HDF5 traces into pandas, through the documented schema only.

This module knows the trace only as ``docs/trace-schema.md`` describes it (schema version 2);
it never imports the runtime (DESIGN.md §2). The few constants it needs (table fields, status
names) are copied from that page; ``tests/test_analysis_read.py`` checks the copies against
the writer's own definitions so they cannot drift apart silently.

Every failure is a :class:`TraceError` with a one-line message naming the file.
"""

from __future__ import annotations

import builtins
import ctypes
import functools
import glob
import json
import os
import re
import tomllib
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

SCHEMA_VERSIONS = (2,)

# Status codes of /client_rounds `status` (docs/trace-schema.md, "Status codes"): code -> name.
STATUS_NAMES = ("ok", "oom", "dropped", "late", "unavailable")

# The tables of schema version 2 (docs/trace-schema.md, "Groups and datasets"): group -> fields
# of its compound `table` dataset, in order. Copied here because analysis never imports the
# runtime; a test compares them with the writer's dtypes.
TABLE_FIELDS: dict[str, list[tuple[str, str]]] = {
    "clients": [
        ("client", "<i4"), ("num_samples", "<i4"), ("device", "<i2"), ("speed", "<f4"), ("bandwidth", "<f4"),
    ],
    "devices": [
        ("name", "S32"), ("label", "S64"), ("kind", "S16"), ("memory_bytes", "<i8"), ("idle_power_w", "<f4"),
        ("uplink_bps", "<f8"), ("downlink_bps", "<f8"), ("radio_power_w", "<f4"), ("availability", "<f4"),
        ("num_levels", "<i2"), ("max_freq_mhz", "<f4"), ("max_flops", "<f8"), ("max_power_w", "<f4"),
    ],
    "rounds": [
        ("round", "<i4"), ("cohort_size", "<i4"), ("num_ok", "<i4"), ("train_loss", "<f4"),
        ("test_accuracy", "<f4"), ("test_loss", "<f4"), ("wall_time_s", "<f8"), ("bytes_down", "<i8"),
        ("bytes_up", "<i8"), ("unix_time_s", "<f8"), ("num_oom", "<i4"), ("num_late", "<i4"),
        ("num_dropped", "<i4"), ("num_unavailable", "<i4"), ("target_time_s", "<f8"), ("round_time_s", "<f8"),
        ("emulated_time_s", "<f8"), ("energy_j", "<f8"), ("energy_measured_j", "<f8"), ("accounting_s", "<f8"),
    ],
    "client_rounds": [
        ("round", "<i4"), ("client", "<i4"), ("rank", "<i4"), ("num_samples", "<i4"), ("steps", "<i4"),
        ("status", "u1"), ("train_loss", "<f4"), ("wall_time_s", "<f8"), ("bytes_down", "<i8"),
        ("bytes_up", "<i8"), ("device", "<i2"), ("level", "<i2"), ("freq_mhz", "<f4"), ("flops", "<f8"),
        ("compute_time_s", "<f8"), ("comm_time_s", "<f8"), ("wait_time_s", "<f8"), ("energy_compute_j", "<f8"),
        ("energy_comm_j", "<f8"), ("energy_idle_j", "<f8"), ("energy_j", "<f8"), ("energy_measured_j", "<f8"),
        ("meter_short", "u1"), ("peak_memory_bytes", "<i8"), ("memory_budget_bytes", "<i8"),
        ("cuda_peak_bytes", "<i8"),
    ],
    "events": [
        ("unix_time_s", "<f8"), ("round", "<i4"), ("rank", "<i4"), ("level", "S8"), ("kind", "S32"),
        ("message", "S480"),
    ],
    "nvml": [
        ("unix_time_s", "<f8"), ("rank", "<i4"), ("gpu", "<i4"), ("power_w", "<f4"), ("energy_j", "<f8"),
        ("memory_used_bytes", "<i8"), ("utilization_pct", "<f4"), ("sm_clock_mhz", "<f4"),
    ],
}
# Groups that later schema additions bring (DESIGN.md §7); read as plain tables when present.
OPTIONAL_GROUPS = ("stitch", "rl")
# Root attributes holding JSON text (docs/trace-schema.md, "Root attributes"); any other string
# that looks like a JSON list or object is parsed too.
JSON_ATTRS = ("hosts", "gpus", "gpu_sharing", "package_versions")

_MISSING = object()


class TraceError(Exception):
    """A trace that cannot be read; the message is one line and names the file."""

    EXIT_CODE = 2  # the CLI prints the message and exits with this status

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def _reason(err: BaseException) -> str:
    """The first line of an h5py/HDF5 error, never a traceback."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _decode_column(values: np.ndarray) -> np.ndarray:
    """Fixed-length NUL-padded UTF-8 byte strings as Python ``str`` (numpy drops the padding)."""
    return np.array([v.decode("utf-8", "replace") for v in values.tolist()], dtype=object)


def _frame(rows: np.ndarray) -> pd.DataFrame:
    """A structured array as a DataFrame, byte-string fields decoded to ``str``."""
    columns: dict[str, Any] = {}
    for name in rows.dtype.names or ():
        col = rows[name]
        if col.dtype.kind == "S":
            columns[name] = pd.Series(_decode_column(col), dtype="str")
        elif col.ndim == 1:
            columns[name] = col
        else:  # an array-valued field: one object per row
            columns[name] = list(col)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(rows)))


def _status_names(codes: pd.Series) -> pd.Categorical:
    raw = codes.to_numpy().astype(np.int64)
    raw = np.where((raw >= 0) & (raw < len(STATUS_NAMES)), raw, -1)  # unknown code -> NaN
    return pd.Categorical.from_codes(raw, categories=list(STATUS_NAMES))


def _device_names(index: pd.Series, devices: pd.DataFrame) -> pd.Series:
    names = devices["name"].tolist() if "name" in devices else []
    lookup = {i: n for i, n in enumerate(names)}
    return pd.Series([lookup.get(int(i)) for i in index.to_numpy()], index=index.index, dtype="str")


def _insert_after(frame: pd.DataFrame, after: str, name: str, values: Any) -> None:
    frame.insert(frame.columns.get_loc(after) + 1, name, values)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


class Run:
    """Everything in one trace file, read at once into pandas (the file is closed afterwards).

    Tables (docs/trace-schema.md): ``rounds``, ``client_rounds``, ``clients``, ``devices``, ``events``,
    ``nvml``, plus ``stitch`` and ``rl`` (empty until the run writes those groups). Byte strings
    are decoded to ``str``; ``client_rounds`` gets a categorical ``status_name`` next to
    ``status``; ``client_rounds`` and ``clients`` get ``device_name`` next to ``device``.
    ``client_rounds`` only keeps rows of rounds that have a ``/rounds`` row (a killed or live run
    can hold one more round of client rows).
    """

    path: Path
    config: dict
    meta: dict
    rounds: pd.DataFrame
    client_rounds: pd.DataFrame
    clients: pd.DataFrame
    devices: pd.DataFrame
    events: pd.DataFrame
    nvml: pd.DataFrame
    stitch: pd.DataFrame
    rl: pd.DataFrame
    label_counts: np.ndarray
    finished: bool

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = Path(path)
        self._read(f)

    # -- reading ---------------------------------------------------------------------------

    def _error(self, problem: str) -> TraceError:
        return TraceError(f"trace {self.path}: {problem}")

    def _read(self, f: h5py.File) -> None:
        attrs = {key: _attr_value(f.attrs[key]) for key in f.attrs.keys()}
        text = attrs.pop("config", "")
        try:
            self.config = tomllib.loads(text) if isinstance(text, str) else {}
        except tomllib.TOMLDecodeError as err:
            raise self._error(f"corrupted root attribute 'config': not TOML ({_reason(err)})") from None
        for key, value in attrs.items():
            if isinstance(value, str) and (key in JSON_ATTRS or value.lstrip()[:1] in ("[", "{")):
                try:
                    attrs[key] = json.loads(value)
                except ValueError:
                    pass  # not JSON after all: keep the text
        self.meta = attrs

        # /rounds before /client_rounds: the writer appends a round's client rows before its
        # round row, so on a live file every round read here has all its client rows.
        rounds = self._table(f, "rounds")
        client_rounds = self._table(f, "client_rounds")
        devices = self._table(f, "devices")
        clients = self._table(f, "clients")
        events = self._table(f, "events")
        nvml = self._table(f, "nvml")
        self.label_counts = self._label_counts(f, len(clients))
        self.stitch = self._optional(f, "stitch")
        self.rl = self._optional(f, "rl")

        self.devices = _frame(devices)
        self.rounds = _frame(rounds)
        self.events = _frame(events)
        self.nvml = _frame(nvml)
        self.clients = _frame(clients)
        _insert_after(self.clients, "device", "device_name", _device_names(self.clients["device"], self.devices))

        finished_rounds = np.isin(client_rounds["round"], rounds["round"])
        cr = _frame(client_rounds[finished_rounds])
        _insert_after(cr, "status", "status_name", _status_names(cr["status"]))
        _insert_after(cr, "device", "device_name", _device_names(cr["device"], self.devices))
        self.client_rounds = cr
        self.finished = bool((self.events["kind"] == "finish").any())

    def _dataset(self, f: h5py.File, name: str) -> h5py.Dataset:
        group, _, leaf = name.rpartition("/")
        node = f.get(group, getclass=True)
        if node is None:
            raise self._error(f"corrupted trace: missing group /{group}")
        if node is not h5py.Group:
            raise self._error(f"corrupted group /{group}: not a group")
        ds = f[group].get(leaf, getclass=True)
        if ds is None:
            raise self._error(f"corrupted group /{group}: missing dataset {leaf!r}")
        if ds is not h5py.Dataset:
            raise self._error(f"corrupted group /{group}: {leaf!r} is not a dataset")
        ds = f[name]
        try:
            ds.refresh()  # the newest rows a live writer has flushed
        except (OSError, RuntimeError, ValueError):
            pass  # nothing newer to see; read what is there
        return ds

    def _read_all(self, ds: h5py.Dataset) -> np.ndarray:
        try:
            return ds[()]
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
            raise self._error(f"unreadable data in {ds.name}: {_reason(err)}") from None

    def _table(self, f: h5py.File, group: str) -> np.ndarray:
        ds = self._dataset(f, f"{group}/table")
        expected = TABLE_FIELDS[group]
        problems = []
        fields = ds.dtype.fields
        if ds.ndim != 1:
            problems.append(f"{ds.ndim}-D, expected 1-D")
        if fields is None:
            problems.append(f"dtype {ds.dtype} is not a compound type")
        else:
            missing = [name for name, _ in expected if name not in fields]
            wrong = [
                f"{name} is {fields[name][0]} (expected {np.dtype(kind)})"
                for name, kind in expected
                if name in fields and fields[name][0] != np.dtype(kind)
            ]
            if missing:
                problems.append("missing fields " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
            problems.extend(wrong[:3])
        if problems:
            raise self._error(f"corrupted group /{group}: table " + "; ".join(problems))
        rows = self._read_all(ds)
        return rows[[name for name, _ in expected]] if len(fields) != len(expected) else rows

    def _label_counts(self, f: h5py.File, num_clients: int) -> np.ndarray:
        ds = self._dataset(f, "clients/label_counts")
        if ds.ndim != 2 or ds.dtype.kind not in "iu":
            raise self._error(f"corrupted group /clients: label_counts is {ds.dtype} {ds.shape}, "
                              "expected a 2-D integer array")
        counts = self._read_all(ds)
        if counts.shape[0] != num_clients:
            raise self._error(f"corrupted group /clients: label_counts has {counts.shape[0]} rows "
                              f"for {num_clients} clients")
        return counts

    def _optional(self, f: h5py.File, group: str) -> pd.DataFrame:
        node = f.get(group)
        if not isinstance(node, h5py.Group) or not isinstance(node.get("table"), h5py.Dataset):
            return pd.DataFrame()
        ds = self._dataset(f, f"{group}/table")
        if ds.dtype.fields is None or ds.ndim != 1:
            raise self._error(f"corrupted group /{group}: table is {ds.dtype} {ds.shape}, expected a 1-D table")
        return _frame(self._read_all(ds))

    # -- convenience -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The file stem (what ``open_many`` puts in its ``run`` column)."""
        return self.path.stem

    @property
    def schema_version(self) -> int:
        return int(self.meta["schema_version"])

    def config_value(self, dotted: str, default: Any = _MISSING) -> Any:
        """The resolved config value at a dotted key, e.g. ``"data.partition.alpha"``.

        Raises ``KeyError`` naming the key when it is absent and no ``default`` is given.
        """
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise KeyError(f"{dotted!r} is not in the config of trace {self.path}")
                return default
            node = node[part]
        return node

    def flat_config(self) -> dict[str, Any]:
        """The config as one flat dict of dotted keys."""
        return flatten(self.config)

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return f"Run({str(self.path)!r}, rounds={len(self.rounds)}, {state})"


# Metadata read attempts of a SWMR reader. A SWMR reader retries a metadata read whose checksum
# fails (the writer may be rewriting it), sleeping 1 ns, 2 ns, 4 ns, ... between tries; HDF5's
# default of 100 tries makes a damaged file (e.g. truncated) hang for hours. 30 tries wait ~1 s.
SWMR_READ_ATTEMPTS = 30


@functools.cache
def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library h5py uses (for ``H5Pset_metadata_read_attempts``, which h5py does not wrap)."""
    candidates: list[str] = []
    try:
        with builtins.open("/proc/self/maps") as maps:  # Linux: the copy already loaded
            candidates += re.findall(r"(/\S*/libhdf5(?:-[0-9a-f]+)?\.(?:so|dylib)\S*)", maps.read())
    except OSError:
        pass
    h5py_dir = Path(h5py.__file__).resolve().parent
    for libs in (h5py_dir.parent / "h5py.libs", h5py_dir / ".dylibs"):  # wheels bundle it here
        candidates += [str(p) for p in sorted(libs.glob("libhdf5*")) if "_hl" not in p.name]
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
            lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
            lib.H5Pset_metadata_read_attempts.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _open_swmr(path: Path) -> h5py.File:
    """``h5py.File(path, "r", swmr=True, locking="best-effort")`` with :data:`SWMR_READ_ATTEMPTS`."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_file_locking(True, True)  # best-effort: parallel file systems often lack locks
    lib = _hdf5_library()
    if lib is not None:
        lib.H5Pset_metadata_read_attempts(fapl.id, SWMR_READ_ATTEMPTS)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def _open_file(path: Path) -> h5py.File:
    """Open a finished trace plainly, a live or killed one (SWMR flag set) in SWMR read mode."""
    try:
        # A finished file opens plainly, and HDF5 then checks its size against the stored end,
        # so a truncated copy fails here at once, with a clear reason.
        return h5py.File(path, "r", locking="best-effort")
    except OSError as err:
        plain = err
    try:
        hdf5 = h5py.is_hdf5(path)
    except OSError:
        hdf5 = True
    if not hdf5:
        raise TraceError(f"trace {path}: not an HDF5 file") from None
    if "truncated" in str(plain):
        raise TraceError(f"trace {path}: unreadable HDF5 file, truncated ({_reason(plain)})") from None
    try:
        # A writer still has it (live run) or had it (killed run): swmr=True reads both.
        return _open_swmr(path)
    except (OSError, RuntimeError, ValueError) as err:
        raise TraceError(f"trace {path}: unreadable HDF5 file ({_reason(err)})") from None


def open(path: str | os.PathLike) -> Run:
    """Read a whole trace: live (rounds flushed so far), finished, or killed (SWMR flag left set).

    Raises :class:`TraceError` (one line naming the file) for a missing file, a file that is
    not HDF5 or not a fedemu trace, an unknown schema version, a missing or wrongly typed
    group or dataset, and data HDF5 cannot read (e.g. a file truncated on disk).
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace {path}: no such file")
    if path.is_dir():
        raise TraceError(f"trace {path}: is a directory, not a trace file")
    f = _open_file(path)
    try:
        with f:
            version = _attr_value(f.attrs.get("schema_version"))
            if version is None:
                raise TraceError(f"trace {path}: not a fedemu trace (no schema_version attribute)")
            if version not in SCHEMA_VERSIONS:
                known = ", ".join(str(v) for v in SCHEMA_VERSIONS)
                raise TraceError(f"trace {path}: unknown schema version {version!r}; this reader knows "
                                 f"version {known}")
            return Run(path, f)
    except TraceError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise TraceError(f"trace {path}: unreadable data ({_reason(err)})") from None


def _varying(runs: Sequence[Run]) -> list[str]:
    """Config keys (dotted) whose value is not the same in every run, in first-seen order."""
    flats = [r.flat_config() for r in runs]
    keys: dict[str, None] = {}
    for flat in flats:
        keys.update(dict.fromkeys(flat))
    return [k for k in keys if any(flat.get(k, _MISSING) != flats[0].get(k, _MISSING) for flat in flats[1:])]


class Runs:
    """Several traces (a sweep) side by side.

    ``runs``: the :class:`Run` objects; ``varying``: the dotted config keys that differ between
    them. ``rounds``, ``client_rounds`` and ``summary`` concatenate the runs with a ``run``
    column (the file stem) and one column per varying config key in front.
    """

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        self.varying = _varying(self.runs)
        stems = [r.name for r in self.runs]
        self.names = stems if len(set(stems)) == len(stems) else [str(r.path) for r in self.runs]

    def _labels(self, i: int) -> dict[str, Any]:
        run = self.runs[i]
        labels: dict[str, Any] = {"run": self.names[i]}
        for key in self.varying:
            value = run.config_value(key, None)
            labels[key] = tuple(value) if isinstance(value, list) else value
        return labels

    def _concat(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
        parts = []
        for i, frame in enumerate(frames):
            frame = frame.copy()
            for pos, (key, value) in enumerate(self._labels(i).items()):
                frame.insert(pos, key, pd.Series([value] * len(frame), index=frame.index, dtype=object))
            parts.append(frame)
        out = pd.concat(parts, ignore_index=True)
        for key in ["run", *self.varying]:
            out[key] = out[key].infer_objects()
        return out

    @cached_property
    def rounds(self) -> pd.DataFrame:
        return self._concat([r.rounds for r in self.runs])

    @cached_property
    def client_rounds(self) -> pd.DataFrame:
        return self._concat([r.client_rounds for r in self.runs])

    @cached_property
    def summary(self) -> pd.DataFrame:
        return self.summary_table()

    def summary_table(self, *, target_accuracy: float | None = None) -> pd.DataFrame:
        """:func:`analysis.summary.summary_table` with the ``run`` and varying config columns in front."""
        from analysis.summary import summary_table

        table = summary_table(self.runs, target_accuracy=target_accuracy).drop(columns=["run"], errors="ignore")
        return self._concat([table.iloc[[i]] for i in range(len(self.runs))])

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __getitem__(self, i: int) -> Run:
        return self.runs[i]

    def __repr__(self) -> str:
        return f"Runs({len(self.runs)} runs, varying {self.varying})"


def open_many(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> Runs:
    """Open several traces: a glob pattern (matches sorted), a directory (its ``*.h5``), or paths.

    Raises :class:`TraceError` naming the pattern when nothing matches, and the first
    unreadable trace's error otherwise.
    """
    if isinstance(pattern, str | os.PathLike):
        text = os.fspath(pattern)
        if Path(text).is_dir():
            paths = sorted(Path(text).glob("*.h5"))
        elif glob.has_magic(text):
            paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        else:
            paths = [Path(text)] if Path(text).exists() else []
        if not paths:
            raise TraceError(f"no trace files match {text!r}")
    else:
        paths = [Path(p) for p in pattern]
        if not paths:
            raise TraceError("no trace files given")
    return Runs([open(p) for p in paths])

