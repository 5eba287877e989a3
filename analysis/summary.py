"""Per-run summary numbers from a :class:`analysis.read.Run`, and a side-by-side table of runs.

Everything comes from the trace's tables as ``docs/trace-schema.md`` defines them:
``/rounds`` for accuracy, time, energy and traffic totals, ``/client_rounds`` (finished
rounds only) for the per-device breakdowns and the participation shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.read import STATUS_NAMES, Run, flatten


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _measured_sum(values: pd.Series, meter: str) -> float:
    """Sum of measured energies: NaN without a meter or when no value was measured.

    Missing values (a client whose window was shorter than the counter's period) are skipped,
    as the writer does for the round totals.
    """
    finite = values.to_numpy(dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if meter == "none" or finite.size == 0:
        return math.nan
    return float(finite.sum())


def _target(rounds: pd.DataFrame, target_accuracy: float | None) -> tuple[float, float]:
    """(rounds_to_target, emulated_time_to_target_s) of the first evaluated round at the target."""
    if target_accuracy is None or math.isnan(target_accuracy):
        return math.nan, math.nan
    reached = rounds[rounds["test_accuracy"].to_numpy(dtype=np.float64) >= target_accuracy]
    if reached.empty:
        return math.nan, math.nan
    first = reached.iloc[0]
    return int(first["round"]) + 1, float(first["emulated_time_s"])


def summarize(run: Run, *, target_accuracy: float | None = None) -> dict[str, Any]:
    """The headline numbers of one run.

    Keys:

    - ``run`` (file stem), ``path``, ``finished`` (a ``finish`` event exists), ``meter`` (root attribute)
    - ``rounds``: finished rounds (rows of ``/rounds``)
    - ``final_accuracy``: test accuracy of the last evaluated round; ``best_accuracy``: the best
      over evaluated rounds (NaN when no round was evaluated)
    - ``target_accuracy``; ``rounds_to_target``: rounds run until the first evaluated round whose
      accuracy is at least the target (its 0-based index + 1), ``emulated_time_to_target_s``: that
      round's ``emulated_time_s``; NaN when never reached or no target is given
    - ``emulated_time_s``: the last round's ``emulated_time_s``; ``wall_time_s``: sum of the rounds'
      ``wall_time_s`` (the emulation itself, not start-up)
    - ``energy_j``: total modelled energy; ``energy_measured_j``: total measured (NVML) energy, NaN
      when the meter is ``none``
    - ``bytes_up``, ``bytes_down``: total traffic
    - ``algorithm``: from the stored config; ``peak_memory_bytes``: the largest peak memory of a client
      that ran (status ok); ``oom_clients``: distinct clients ever excluded for memory (status oom)
    - ``participation``: status name -> share of client-round rows (``ok``, ``oom``, ``dropped``,
      ``late``, ``unavailable``; they sum to 1; NaN when there are no rows)
    - ``energy_by_device``: device name -> ``{"modelled_j", "measured_j"}`` over its client rounds
    - ``memory_by_device``: device name -> ``{"peak_bytes_max", "budget_bytes", "over_budget_share"}``:
      the largest measured peak, the memory budget, and the share of its client rounds whose peak
      exceeds the budget (rows with a measured peak, ``peak_memory_bytes > 0``)
    """
    rounds = run.rounds
    cr = run.client_rounds
    meter = str(run.meta.get("meter", "none"))
    accuracy = rounds["test_accuracy"].to_numpy(dtype=np.float64)
    evaluated = accuracy[np.isfinite(accuracy)]
    rounds_to_target, time_to_target = _target(rounds, target_accuracy)

    total = len(cr)
    counts = cr["status_name"].value_counts()
    participation = {name: (int(counts.get(name, 0)) / total if total else math.nan) for name in STATUS_NAMES}

    energy_by_device: dict[str, dict[str, float]] = {}
    memory_by_device: dict[str, dict[str, float]] = {}
    for (_, name), rows in cr.groupby(["device", "device_name"], sort=True, dropna=False, observed=True):
        key = str(name)
        energy_by_device[key] = {
            "modelled_j": float(rows["energy_j"].sum()),
            "measured_j": _measured_sum(rows["energy_measured_j"], meter),
        }
        peak = rows["peak_memory_bytes"].to_numpy()
        budget = rows["memory_budget_bytes"].to_numpy()
        measured = peak > 0
        memory_by_device[key] = {
            "peak_bytes_max": int(peak.max()) if peak.size else 0,
            "budget_bytes": int(budget.max()) if budget.size else 0,
            "over_budget_share": float((peak[measured] > budget[measured]).mean()) if measured.any() else math.nan,
        }

    ok = cr["status_name"] == "ok"
    return {
        "run": run.name,
        "algorithm": str(run.config.get("algorithm", "")) if isinstance(run.config, dict) else "",
        "path": str(run.path),
        "finished": run.finished,
        "meter": meter,
        "rounds": len(rounds),
        "final_accuracy": float(evaluated[-1]) if evaluated.size else math.nan,
        "best_accuracy": float(evaluated.max()) if evaluated.size else math.nan,
        "target_accuracy": _float(target_accuracy),
        "rounds_to_target": rounds_to_target,
        "emulated_time_to_target_s": time_to_target,
        "emulated_time_s": float(rounds["emulated_time_s"].iloc[-1]) if len(rounds) else math.nan,
        "wall_time_s": float(rounds["wall_time_s"].sum()),
        "energy_j": float(rounds["energy_j"].sum()),
        "energy_measured_j": _measured_sum(rounds["energy_measured_j"], meter),
        "bytes_up": int(rounds["bytes_up"].sum()),
        "bytes_down": int(rounds["bytes_down"].sum()),
        "peak_memory_bytes": int(cr.loc[ok, "peak_memory_bytes"].max()) if ok.any() else 0,
        "oom_clients": int(cr.loc[cr["status_name"] == "oom", "client"].nunique()),
        "participation": participation,
        "energy_by_device": energy_by_device,
        "memory_by_device": memory_by_device,
    }


def summary_table(runs: Sequence[Run] | Run, *, target_accuracy: float | None = None) -> pd.DataFrame:
    """One row per run, flat columns (nested keys dotted: ``participation.ok``,
    ``energy_by_device.rpi4.modelled_j``, ...), for printing side by side (``table.T``).
    """
    if isinstance(runs, Run):
        runs = [runs]
    rows = [flatten(summarize(run, target_accuracy=target_accuracy)) for run in runs]
    return pd.DataFrame(rows, index=pd.RangeIndex(len(rows)))
