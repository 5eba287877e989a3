"""`fedemu reproduce SUITE_DIR`: each seed paper's headline claim beside what this emulator measured.

SUITE_DIR holds the traces of the runs of `examples/paper-suite/` (one per method and setting).
A method run is compared with the FedAvg run of the same dataset and device mix. A claim whose
method has no run in the folder (or is not implemented yet) says so; nothing is filled in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.read import Run, TraceError
from analysis.read import open as open_run
from analysis.summary import summarize


@dataclass(frozen=True)
class Claim:
    paper: str
    method: str  # the algorithm name in the trace's config
    baseline: str  # what the paper compared with
    quantity: str
    claimed: str
    measure: Callable[[Run, Run], str]  # (method run, fedavg run) -> the measured figure


def _pct_change(new: float, old: float) -> str:
    if not old or math.isnan(old) or math.isnan(new):
        return "n/a"
    return f"{(new - old) / old * 100:+.1f}%"


def _peak(run: Run) -> float:
    rows = run.client_rounds
    ok = rows[rows["status_name"] == "ok"]
    return float(ok["peak_memory_bytes"].max()) if len(ok) else math.nan


def _accuracy(method: Run, base: Run) -> str:
    a, b = summarize(method)["final_accuracy"], summarize(base)["final_accuracy"]
    return f"{(a - b) * 100:+.2f} pp ({a:.4f} vs {b:.4f})"


def _memory(method: Run, base: Run) -> str:
    return _pct_change(_peak(method), _peak(base))


def _energy(method: Run, base: Run) -> str:
    return _pct_change(summarize(method)["energy_j"], summarize(base)["energy_j"])


def _speedup(method: Run, base: Run) -> str:
    target = summarize(base)["final_accuracy"]
    t_method = summarize(method, target_accuracy=target)["emulated_time_to_target_s"]
    t_base = summarize(base, target_accuracy=target)["emulated_time_to_target_s"]
    if math.isnan(t_method) or math.isnan(t_base) or t_method <= 0:
        return "n/a (target accuracy not reached)"
    return f"{t_base / t_method:.2f}x (emulated time to FedAvg's final accuracy)"


def _payload(method: Run, base: Run) -> str:
    def per_round_mb(run: Run) -> float:
        ok = run.client_rounds[run.client_rounds["status_name"] == "ok"]
        return float(ok["bytes_up"].mean()) / 1e6 if len(ok) else math.nan

    return f"{per_round_mb(base):.2f} MB -> {per_round_mb(method):.2f} MB per client upload"


def _round_time(method: Run, base: Run) -> str:
    a, b = method.rounds["round_time_s"].mean(), base.rounds["round_time_s"].mean()
    return f"{b / a:.2f}x faster per round" if a > 0 else "n/a"


def _traffic(method: Run, base: Run) -> str:
    def gb(run: Run) -> float:
        s = summarize(run)
        return (s["bytes_up"] + s["bytes_down"]) / 1e9

    return f"{gb(method):.3f} vs {gb(base):.3f} GB"


def _kwh(method: Run, base: Run) -> str:
    return f"{summarize(method)['energy_j'] / 3.6e6:.6f} vs {summarize(base)['energy_j'] / 3.6e6:.6f} kWh"


CLAIMS = (
    Claim("FedStitch (arXiv 2409.07202)", "fedstitch", "FedAvg", "accuracy", "up to +20.93%", _accuracy),
    Claim("FedStitch (arXiv 2409.07202)", "fedstitch", "FedAvg", "client memory", "up to -79.5%", _memory),
    Claim("FedStitch (arXiv 2409.07202)", "fedstitch", "FedAvg", "energy", "up to -89.41%", _energy),
    Claim("FedStitch (arXiv 2409.07202)", "fedstitch", "FedAvg", "speedup", "up to 8.12x", _speedup),
    Claim("ProFL (arXiv 2404.13349)", "profl", "FedAvg", "peak memory", "up to -57.4%", _memory),
    Claim("ProFL (arXiv 2404.13349)", "profl", "FedAvg", "accuracy", "up to +82.4%", _accuracy),
    Claim("FedPEFT (arXiv 2210.01708)", "fedpeft", "full fine-tune (FedAvg)", "bytes per round",
          "~328 MB -> ~0.68 MB (ViT-B)", _payload),
    Claim("RaFFM (arXiv 2310.00247)", "raffm", "full FedAvg", "per-round time", "~2.12x faster", _round_time),
    Claim("RaFFM (arXiv 2310.00247)", "raffm", "full FedAvg", "traffic", "5.31 vs 9.52 GB", _traffic),
    Claim("RaFFM (arXiv 2310.00247)", "raffm", "full FedAvg", "energy", "4.42 vs 24 kWh", _kwh),
)


def _key(run: Run) -> tuple[str, str]:
    return (str(run.config_value("data.dataset")), str(run.config_value("devices.mix")))


def reproduction_rows(runs: Sequence[Run]) -> list[dict[str, str]]:
    by_algorithm: dict[str, list[Run]] = {}
    for run in runs:
        by_algorithm.setdefault(str(run.config.get("algorithm", "?")), []).append(run)
    baselines = {_key(r): r for r in by_algorithm.get("fedavg", [])}
    rows = []
    for claim in CLAIMS:
        methods = by_algorithm.get(claim.method, [])
        measured = f"not yet measurable: no '{claim.method}' run in the suite"
        where = ""
        for run in methods:
            base = baselines.get(_key(run))
            if base is None:
                measured = f"not yet measurable: no FedAvg run with dataset/mix {_key(run)}"
                continue
            measured = claim.measure(run, base)
            where = f"{run.path.stem} vs {base.path.stem}"
            break
        rows.append({"paper": claim.paper, "quantity": claim.quantity, "baseline": claim.baseline,
                     "claimed": claim.claimed, "measured": measured, "runs": where})
    return rows


def reproduce(suite_dir: Path) -> str:
    paths = sorted(Path(suite_dir).glob("*.h5"))
    if not paths:
        raise TraceError(f"no traces (*.h5) in {suite_dir}; run examples/paper-suite/*.toml with "
                         f"--set output.dir={suite_dir} first")
    runs = [open_run(p) for p in paths]
    rows = reproduction_rows(runs)
    found = ", ".join(f"{r.path.stem} ({r.config.get('algorithm')})" for r in runs)
    cols = ("paper", "quantity", "baseline", "claimed", "measured")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = [f"reproduction table for {suite_dir}: runs {found}",
             "  ".join(c.ljust(widths[c]) for c in cols),
             "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
