"""`fedemu watch RUN.h5`: the latest round of a running emulation, every few seconds.

Reads only the tail of `/rounds/table` through an SWMR handle kept open and refreshed, so it
costs the same on a 10-round and a 100,000-round trace (docs/trace-schema.md).
"""

from __future__ import annotations

import math
import sys
import time
import tomllib
from pathlib import Path
from typing import TextIO

import h5py
import numpy as np

from analysis.read import TraceError


def _line(row: np.void, total: int | None) -> str:
    acc = float(row["test_accuracy"])
    of = f"/{total}" if total else ""
    return (
        f"round {int(row['round']) + 1}{of}: test_acc {'n/a' if math.isnan(acc) else f'{acc:.4f}'}, "
        f"train_loss {float(row['train_loss']):.4f}, ok {int(row['num_ok'])}/{int(row['cohort_size'])} "
        f"(oom {int(row['num_oom'])}, late {int(row['num_late'])}, dropped {int(row['num_dropped'])}, "
        f"offline {int(row['num_unavailable'])}), emulated {float(row['emulated_time_s']):.1f} s, "
        f"energy {float(row['energy_j']):.1f} J, wall {float(row['wall_time_s']):.2f} s"
    )


def _open_when_ready(path: Path, interval_s: float, attempts: int = 20) -> h5py.File:
    """A run creates its trace, then switches it to SWMR: until then a reader is refused. Retry a while."""
    for attempt in range(attempts):
        try:
            return h5py.File(path, "r", swmr=True, locking="best-effort")
        except OSError as err:
            if not Path(path).exists() or attempt == attempts - 1:
                reason = str(err).splitlines()[0] if str(err) else "unreadable"
                raise TraceError(f"cannot watch {path}: {reason}") from None
            time.sleep(min(interval_s, 0.5))
    raise AssertionError("unreachable")


def watch(path: Path, *, interval_s: float = 5.0, stream: TextIO | None = None, max_polls: int | None = None) -> int:
    """Print the newest round whenever one appears; return when the run finished (or after max_polls)."""
    out = stream or sys.stdout
    f = _open_when_ready(path, interval_s)
    with f:
        if "rounds" not in f or "events" not in f:
            raise TraceError(f"{path} is not a fedemu trace (no /rounds or /events)")
        total = None
        if "config" in f.attrs:
            total = tomllib.loads(str(f.attrs["config"])).get("rounds")
        rounds, events = f["rounds/table"], f["events/table"]
        shown = 0
        polls = 0
        while True:
            rounds.refresh()
            events.refresh()
            n = rounds.shape[0]
            if n > shown:
                print(_line(rounds[n - 1], total), file=out, flush=True)
                shown = n
            kinds = {bytes(k).rstrip(b"\0").decode() for k in events["kind"][:]} if events.shape[0] else set()
            if "finish" in kinds or "error" in kinds:
                print("run finished" if "finish" in kinds else "run stopped with an error", file=out, flush=True)
                return 0
            polls += 1
            if max_polls is not None and polls >= max_polls:
                return 0
            time.sleep(interval_s)
