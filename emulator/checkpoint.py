"""Round-boundary checkpoints written by rank 0, and finding the one to resume from.

A checkpoint is one safetensors file per saved round, ``<trace>.ckpt/round-<r>.safetensors``:
the arrays (the algorithm's ``state_dict`` under ``algorithm/``, the device planner's energy
optimizer state under ``planner/``) and, in the safetensors header, one JSON document with the
rest: the round counter, the resolved config, the server's counters, the trace's row counts at
that moment, and a SHA-256 of the tensor bytes. No pickle anywhere; a file is written to a
temporary name, fsynced and renamed, so a job killed at any instant leaves either the old set
of checkpoints or the new one, never a torn file. Every draw of a run is keyed by
(seed, stream, round, client) (``emulator/seeding.py``), so the round counter is all the
random state a resumed run needs besides what the algorithm saves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from emulator.errors import UserError

SCHEMA = 1
_NAME = re.compile(r"round-(\d{6,})\.safetensors")
_META_KEY = "fedemu"
# Config keys a resumed run may change: how long it runs and how it runs, not what it computes.
RESUMABLE_CHANGES = ("rounds", "output.", "runtime.", "checkpoint.")


def checkpoint_dir(trace: Path) -> Path:
    """Where a run keeps its checkpoints: beside its trace (``runs/x.h5`` -> ``runs/x.ckpt/``)."""
    trace = Path(trace)
    return trace.with_name(trace.stem + ".ckpt")


@dataclass
class Checkpoint:
    """One saved round boundary: ``round`` is the last finished round."""

    path: Path
    round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def section(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays saved under ``prefix/``, without the prefix."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.arrays.items() if k.startswith(prefix + "/")}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def save(folder: Path, *, round: int, arrays: dict[str, np.ndarray], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of ``round`` atomically; keep the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    doc = {"schema": SCHEMA, "round": int(round), "sha256": _digest(clean),
           "saved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **meta}
    final = folder / f"round-{round:06d}.safetensors"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        save_file(clean, str(tmp), metadata={_META_KEY: json.dumps(doc)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    for old in _listing(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _listing(folder: Path) -> list[Path]:
    """Checkpoint files in round order (temporary files are not listed)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _unreadable(path: Path, err: BaseException) -> UserError:
    return UserError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                     "delete it to resume from the one before")


def _header(path: Path) -> dict[str, Any]:
    """The JSON document in a checkpoint's safetensors header, without reading its arrays."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        return json.loads(header["__metadata__"][_META_KEY])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _unreadable(path, err) from None


def peek(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint's path and JSON document (arrays not read, not verified), or None."""
    files = _listing(Path(folder))
    return (files[-1], _header(files[-1])) if files else None


def read(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; a damaged one is a one-line UserError."""
    doc = _header(path)
    try:
        arrays = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise _unreadable(path, err) from None
    if doc.get("schema") != SCHEMA:
        raise UserError(f"checkpoint {path} has schema {doc.get('schema')}, this fedemu reads {SCHEMA}")
    if _digest(arrays) != doc.get("sha256"):
        raise UserError(f"checkpoint {path} is corrupt (its arrays do not match their SHA-256); "
                        "delete it to resume from the one before")
    return Checkpoint(path=Path(path), round=int(doc["round"]), arrays=arrays, meta=doc)


def latest(folder: Path) -> Checkpoint | None:
    """The newest checkpoint in ``folder``, or None when there is none yet."""
    files = _listing(Path(folder))
    return read(files[-1]) if files else None


def resolve_resume(target: Path) -> Path:
    """The trace a ``--resume`` argument means: a trace file, its ``.ckpt`` folder, or a run folder."""
    target = Path(target)
    if target.suffix == ".ckpt" and target.is_dir():
        return target.with_name(target.stem + ".h5")
    if target.is_dir():
        traces = sorted(p for p in target.glob("*.h5") if checkpoint_dir(p).is_dir() or p.name == "trace.h5")
        if len(traces) == 1:
            return traces[0]
        if not traces:
            raise UserError(f"--resume {target}: no trace with a checkpoint folder in it "
                            "(a run keeps <trace>.h5 and <trace>.ckpt/ side by side)")
        raise UserError(f"--resume {target}: several runs in it ({', '.join(p.name for p in traces)}); "
                        "name the trace file")
    if target.suffix == ".h5" or target.exists():
        return target
    raise UserError(f"--resume {target}: no such trace, checkpoint folder or run folder")


def config_differences(saved_toml: str, new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, new) for every config key that differs, besides the ones a resume may change."""
    saved = tomllib.loads(saved_toml)

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(new)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys
            if a.get(k) != b.get(k) and not any(k == p or (p.endswith(".") and k.startswith(p))
                                                for p in RESUMABLE_CHANGES)]
