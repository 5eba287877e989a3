"""Device profiles: the catalogue of emulated hardware (DESIGN.md §4).

A catalogue is data: a TOML file of ``[[device]]`` rows, each with its memory, a DVFS
table (frequency -> effective training FLOP/s and power), idle and radio power, network
bandwidth and availability, and the public sources of those numbers. The shipped one is
``builtin.toml`` next to this module; ``docs/devices.md`` explains its numbers and the
file layout. Bad rows are one-line :class:`UserError` s naming file, row and column.

The hot path never touches the dataclasses: :meth:`Catalogue.as_arrays` gives numpy
arrays indexed by device, with DVFS tables padded with NaN to the longest one.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from emulator.errors import UserError
from emulator.registry import did_you_mean

__all__ = [
    "BUILTIN",
    "BUILTIN_PATH",
    "KINDS",
    "Catalogue",
    "DeviceProfile",
    "DvfsLevel",
    "catalogue_text",
    "format_table",
    "load_catalogue",
]

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).with_name("builtin.toml")
KINDS = ("sbc", "jetson", "phone", "laptop", "server")

GIB = 2**30  # memory_gb is in GiB, as RAM is sold
MBPS = 1e6  # uplink_mbps / downlink_mbps are in Mbit/s
GFLOPS = 1e9

# A name is used inside mix specs ("rpi4:0.5,v100:0.5", "homogeneous:rpi4"): no ':' ',' or spaces.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class DvfsLevel:
    """One operating point of a device."""

    freq_mhz: float
    flops: float  # effective FLOP/s of fp32 training work at this level (sustained, not peak)
    power_w: float  # whole-device power while computing at this level, W


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of emulated device. Units: bytes, W, bit/s, FLOP/s."""

    name: str  # key, e.g. "rpi4"
    label: str  # "Raspberry Pi 4 Model B (4 GB)"
    kind: str  # one of KINDS
    memory_bytes: int  # memory open to one training process (not total RAM)
    dvfs: tuple[DvfsLevel, ...]  # ascending freq_mhz, >= 1 level
    idle_power_w: float
    uplink_bps: float
    downlink_bps: float
    radio_power_w: float  # extra power while transmitting/receiving
    availability: float  # mean fraction of rounds the device is online, (0, 1]
    source: str  # public sources of every number, free text

    @property
    def max_level(self) -> DvfsLevel:
        return self.dvfs[-1]

    @property
    def min_level(self) -> DvfsLevel:
        return self.dvfs[0]

    @property
    def peak_flops(self) -> float:
        """Effective FLOP/s at the highest DVFS level."""
        return self.dvfs[-1].flops


@dataclass(frozen=True)
class Catalogue:
    """An ordered set of device profiles; a device's index is its position."""

    devices: tuple[DeviceProfile, ...]
    path: str  # where it came from: "builtin", a file, or "a + b" when files were merged
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, dev in enumerate(self.devices):
            if dev.name in index:
                raise ValueError(f"device {dev.name!r} twice in catalogue {self.path}")
            index[dev.name] = i
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, i: int) -> DeviceProfile:
        return self.devices[i]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        """Device names in catalogue (index) order."""
        return [d.name for d in self.devices]

    def index(self, name: str, *, key: str = "device") -> int:
        """The index of device ``name``; a one-line UserError with "did you mean" otherwise."""
        try:
            return self._index[name]
        except KeyError:
            raise UserError(
                f"{key} = {name!r}: not in device catalogue {self.path}; {did_you_mean(name, self.names())}"
            ) from None

    def get(self, name: str, *, key: str = "device") -> DeviceProfile:
        return self.devices[self.index(name, key=key)]

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        n = len(self.devices)
        levels = max((len(d.dvfs) for d in self.devices), default=1)
        out: dict[str, np.ndarray] = {
            "memory_bytes": np.array([d.memory_bytes for d in self.devices], dtype=np.int64),
            "idle_power_w": np.array([d.idle_power_w for d in self.devices], dtype=np.float64),
            "uplink_bps": np.array([d.uplink_bps for d in self.devices], dtype=np.float64),
            "downlink_bps": np.array([d.downlink_bps for d in self.devices], dtype=np.float64),
            "radio_power_w": np.array([d.radio_power_w for d in self.devices], dtype=np.float64),
            "availability": np.array([d.availability for d in self.devices], dtype=np.float64),
            "num_levels": np.array([len(d.dvfs) for d in self.devices], dtype=np.int64),
        }
        for col in ("freq_mhz", "flops", "power_w"):
            table = np.full((n, levels), np.nan, dtype=np.float64)
            for i, dev in enumerate(self.devices):
                table[i, : len(dev.dvfs)] = [getattr(level, col) for level in dev.dvfs]
            out[col] = table
        for arr in out.values():
            arr.setflags(write=False)
        return out

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Per-device arrays (read-only, computed once) for vectorised cost models.

        ``memory_bytes`` (int64), ``idle_power_w``, ``uplink_bps``, ``downlink_bps``,
        ``radio_power_w``, ``availability`` (float64) are ``[D]``; ``freq_mhz``, ``flops``
        and ``power_w`` are ``[D, L]`` with L the most DVFS levels of any device, padded
        with NaN; ``num_levels`` (int64, ``[D]``) says how many entries of a row are real.
        """
        return dict(self._arrays)


# ---------------------------------------------------------------------------------------------
# Loading and validation


@dataclass(frozen=True)
class _Column:
    kind: str  # "str" | "number" | "dvfs"
    check: str = ""  # "", ">0", ">=0", "(0,1]"


_COLUMNS: dict[str, _Column] = {
    "name": _Column("str"),
    "label": _Column("str"),
    "kind": _Column("str"),
    "memory_gb": _Column("number", ">0"),
    "idle_power_w": _Column("number", ">=0"),
    "uplink_mbps": _Column("number", ">0"),
    "downlink_mbps": _Column("number", ">0"),
    "radio_power_w": _Column("number", ">=0"),
    "availability": _Column("number", "(0,1]"),
    "source": _Column("str"),
    "dvfs": _Column("dvfs"),
}
_LEVEL_COLUMNS: dict[str, _Column] = {
    "freq_mhz": _Column("number", ">0"),
    "gflops": _Column("number", ">0"),
    "power_w": _Column("number", ">0"),
}


def _fmt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Row:
    """Error messages for one ``[[device]]`` row: file, 1-based row number, name."""

    def __init__(self, path: str, row: int, name: str | None) -> None:
        self.path, self.row, self.name = path, row, name

    def where(self) -> str:
        named = f" ({self.name!r})" if self.name else ""
        return f"{self.path}: device #{self.row}{named}"

    def error(self, column: str, problem: str, value: object = ...) -> UserError:
        shown = "" if value is ... else f" = {_fmt(value)}"
        return UserError(f"{self.where()} column {column!r}{shown}: {problem}")


def _check_value(row: _Row, column: str, spec: _Column, value: object) -> Any:
    if spec.kind == "str":
        if not isinstance(value, str):
            raise row.error(column, "must be a string", value)
        if not value.strip():
            raise row.error(column, "must not be empty", value)
        return value
    # numbers: TOML ints and floats, never booleans
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise row.error(column, "must be a number", value)
    x = float(value)
    if not math.isfinite(x):
        raise row.error(column, "must be a finite number", value)
    if spec.check == ">0" and not x > 0:
        raise row.error(column, "must be > 0", value)
    if spec.check == ">=0" and not x >= 0:
        raise row.error(column, "must be >= 0", value)
    if spec.check == "(0,1]" and not 0 < x <= 1:
        raise row.error(column, "must be in (0, 1]", value)
    return x


def _unknown_columns(row: _Row, table: dict[str, Any], allowed: Sequence[str], prefix: str = "") -> None:
    for col in table:
        if col not in allowed:
            raise row.error(prefix + col, f"unknown column; {did_you_mean(col, list(allowed))}")


def _parse_dvfs(row: _Row, value: object) -> tuple[DvfsLevel, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise row.error("dvfs", "must be an array of tables like { freq_mhz = 1500, gflops = 5.0, power_w = 6.4 }")
    if not value:
        raise row.error("dvfs", "needs at least one level", value)
    levels: list[DvfsLevel] = []
    for j, level in enumerate(value, start=1):
        prefix = f"dvfs[{j}]."
        _unknown_columns(row, level, list(_LEVEL_COLUMNS), prefix)
        got: dict[str, float] = {}
        for col, spec in _LEVEL_COLUMNS.items():
            if col not in level:
                raise row.error(prefix + col, "missing (every DVFS level needs freq_mhz, gflops and power_w)")
            got[col] = _check_value(row, prefix + col, spec, level[col])
        if levels and not got["freq_mhz"] > levels[-1].freq_mhz:
            raise row.error(
                prefix + "freq_mhz",
                f"must be greater than dvfs[{j - 1}].freq_mhz = {levels[-1].freq_mhz:g}"
                " (levels in ascending frequency)",
                level["freq_mhz"],
            )
        levels.append(DvfsLevel(freq_mhz=got["freq_mhz"], flops=got["gflops"] * GFLOPS, power_w=got["power_w"]))
    return tuple(levels)


def _parse_device(path: str, row_no: int, table: object) -> DeviceProfile:
    if not isinstance(table, dict):
        raise UserError(f"{path}: device #{row_no}: must be a table ([[device]])")
    raw_name = table.get("name")
    row = _Row(path, row_no, raw_name if isinstance(raw_name, str) and raw_name else None)
    _unknown_columns(row, table, list(_COLUMNS))
    for col in _COLUMNS:
        if col not in table:
            raise row.error(col, "missing (required)")
    got: dict[str, Any] = {}
    for col, spec in _COLUMNS.items():
        got[col] = _parse_dvfs(row, table[col]) if spec.kind == "dvfs" else _check_value(row, col, spec, table[col])
    if not _NAME_RE.fullmatch(got["name"]):
        raise row.error("name", "use letters, digits, '_', '.' and '-' only (no spaces, ':' or ',')", got["name"])
    if got["kind"] not in KINDS:
        hint = did_you_mean(got["kind"], list(KINDS))
        hint = f"; {hint}" if hint.startswith("did you mean") else ""
        raise row.error("kind", f"must be one of {', '.join(KINDS)}{hint}", got["kind"])
    return DeviceProfile(
        name=got["name"],
        label=got["label"],
        kind=got["kind"],
        memory_bytes=round(got["memory_gb"] * GIB),
        dvfs=got["dvfs"],
        idle_power_w=got["idle_power_w"],
        uplink_bps=got["uplink_mbps"] * MBPS,
        downlink_bps=got["downlink_mbps"] * MBPS,
        radio_power_w=got["radio_power_w"],
        availability=got["availability"],
        source=got["source"],
    )


def _read_file(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """(display name, TOML text) of ``spec``: ``"builtin"`` or a path."""
    if os.fspath(spec) == BUILTIN:
        return BUILTIN, BUILTIN_PATH.read_text(encoding="utf-8")
    shown = os.fspath(spec)
    if not shown.strip():
        raise UserError("device catalogue: empty file name; use 'builtin' or a TOML file")
    path = Path(shown)
    if not path.is_file():
        if path.is_dir():
            raise UserError(f"{shown}: is a directory, not a catalogue TOML file")
        raise UserError(f"{shown}: catalogue file not found")
    try:
        return shown, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{shown}: cannot read catalogue file ({exc})") from None


def _parse_file(shown: str, text: str) -> list[DeviceProfile]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        raise UserError(f"{shown}: invalid TOML: {message}") from None
    for key in doc:
        if key != "device":
            raise UserError(f"{shown}: unknown top-level key {key!r}; a catalogue is a list of [[device]] tables")
    rows = doc.get("device")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{shown}: no devices; a catalogue is a list of [[device]] tables")
    devices: list[DeviceProfile] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(rows, start=1):
        dev = _parse_device(shown, i, table)
        if dev.name in seen:
            raise UserError(f"{shown}: device #{i} ({dev.name!r}) is already defined as device #{seen[dev.name]}")
        seen[dev.name] = i
        devices.append(dev)
    return devices


def load_catalogue(
    spec: str | os.PathLike[str] = BUILTIN, *, extra: Sequence[str | os.PathLike[str]] = ()
) -> Catalogue:
    """Read a catalogue: ``"builtin"`` (the shipped one) or a TOML file, plus ``extra`` files.

    The devices of each ``extra`` file are appended in order; a name defined in two
    files is an error naming both. Every problem is a one-line :class:`UserError`.
    """
    devices: list[DeviceProfile] = []
    origin: dict[str, tuple[str, int]] = {}
    shown_all: list[str] = []
    for item in [spec, *extra]:
        shown, text = _read_file(item)
        shown_all.append(shown)
        for row, dev in enumerate(_parse_file(shown, text), start=1):
            if dev.name in origin:
                first, first_row = origin[dev.name]
                raise UserError(
                    f"{shown}: device #{row} ({dev.name!r}) is already defined in {first} (device #{first_row})"
                )
            origin[dev.name] = (shown, row)
            devices.append(dev)
    return Catalogue(devices=tuple(devices), path=" + ".join(shown_all))


# ---------------------------------------------------------------------------------------------
# Output


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)  # a JSON string is a valid TOML basic string


def _toml_num(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


def catalogue_text(catalogue: Catalogue) -> str:
    """The catalogue as TOML in the input layout (``load_catalogue`` reads it back)."""
    out = [f"# device catalogue: {catalogue.path}"]
    for d in catalogue.devices:
        out += [
            "",
            "[[device]]",
            f"name = {_toml_str(d.name)}",
            f"label = {_toml_str(d.label)}",
            f"kind = {_toml_str(d.kind)}",
            f"memory_gb = {_toml_num(d.memory_bytes / GIB)}",
            f"idle_power_w = {_toml_num(d.idle_power_w)}",
            f"uplink_mbps = {_toml_num(d.uplink_bps / MBPS)}",
            f"downlink_mbps = {_toml_num(d.downlink_bps / MBPS)}",
            f"radio_power_w = {_toml_num(d.radio_power_w)}",
            f"availability = {_toml_num(d.availability)}",
            f"source = {_toml_str(d.source)}",
            "dvfs = [",
        ]
        out += [
            f"  {{ freq_mhz = {_toml_num(lv.freq_mhz)}, gflops = {_toml_num(lv.flops / GFLOPS)}, "
            f"power_w = {_toml_num(lv.power_w)} }},"
            for lv in d.dvfs
        ]
        out.append("]")
    return "\n".join(out) + "\n"


def _num(x: float) -> str:
    """Three significant figures without exponents: 2930, 469, 15.8, 5.27, 0.50."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _span(lo: float, hi: float) -> str:
    return _num(lo) if _num(lo) == _num(hi) else f"{_num(lo)}-{_num(hi)}"


def format_table(catalogue: Catalogue) -> str:
    """A fixed-width table of the catalogue for ``fedemu devices``: a header and one line per device."""
    header = (
        "name",
        "label",
        "kind",
        "mem GiB",
        "MHz",
        "GFLOP/s",
        "active W",
        "idle W",
        "up/down Mbit/s",
        "radio W",
        "avail",
    )
    rows = [header]
    for d in catalogue.devices:
        rows.append(
            (
                d.name,
                d.label,
                d.kind,
                f"{d.memory_bytes / GIB:.1f}",
                _span(d.min_level.freq_mhz, d.max_level.freq_mhz),
                _span(d.min_level.flops / GFLOPS, d.max_level.flops / GFLOPS),
                _span(min(lv.power_w for lv in d.dvfs), max(lv.power_w for lv in d.dvfs)),
                _num(d.idle_power_w),
                f"{_num(d.uplink_bps / MBPS)}/{_num(d.downlink_bps / MBPS)}",
                _num(d.radio_power_w),
                f"{d.availability:.2f}",
            )
        )
    numeric = {3, 4, 5, 6, 7, 8, 9, 10}
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
