"""Runs side by side on the questions fedemu exists for: accuracy, memory, energy, time, traffic."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from analysis.read import Run
from analysis.summary import summarize

ROWS = (
    ("final test accuracy", "final_accuracy", 1.0, "{:.4f}"),
    ("peak client memory (MB)", "peak_memory_bytes", 1e-6, "{:.2f}"),
    ("total client energy (J)", "energy_j", 1.0, "{:.1f}"),
    ("emulated time (s)", "emulated_time_s", 1.0, "{:.1f}"),
    ("bytes moved (MB)", "bytes_moved", 1e-6, "{:.2f}"),
    ("clients excluded for memory", "oom_clients", 1.0, "{:.0f}"),
    ("rounds", "rounds", 1.0, "{:.0f}"),
)


def compare_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Rows = the quantities above, columns = the runs (named by algorithm, else file stem),
    plus ``change`` columns relative to the first run for every later one (in %)."""
    summaries = [summarize(run) for run in runs]
    names = []
    for s in summaries:
        name = s["algorithm"] or s["run"]
        names.append(name if name not in names else s["run"])
    data: dict[str, list[str]] = {}
    values = []
    for s in summaries:
        s = dict(s, bytes_moved=s["bytes_up"] + s["bytes_down"])
        values.append([float(s[key]) * scale for _, key, scale, _ in ROWS])
    for name, vals in zip(names, values, strict=True):
        data[name] = [fmt.format(v) if math.isfinite(v) else "-" for v, (_, _, _, fmt) in zip(vals, ROWS, strict=True)]
    base = values[0]
    for name, vals in zip(names[1:], values[1:], strict=True):
        data[f"{name} vs {names[0]}"] = [_change(v, b) for v, b in zip(vals, base, strict=True)]
    return pd.DataFrame(data, index=[label for label, *_ in ROWS])


def _change(value: float, base: float) -> str:
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return "-"
    return f"{100.0 * (value - base) / abs(base):+.1f}%"
