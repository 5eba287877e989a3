"""Report plots of fedemu runs: one function per figure, each writing one PNG.

Every function has the signature ``(runs, out) -> Path | None``: ``runs`` are
:class:`analysis.read.Run` objects, ``out`` is the PNG to write (or a directory, which
then gets the plot's default file name, ``DEFAULT_NAMES``). A function returns the path
it wrote, or ``None`` when the runs hold no data for that plot (no evaluated round, no
NVML samples, no ``/stitch`` or ``/rl`` rows); :func:`skip_reason` says why in words.

Figures are drawn with the Agg canvas directly (``matplotlib.figure.Figure``, no
``pyplot``): no display is needed and no global backend state is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

if TYPE_CHECKING:
    from analysis.read import Run

DPI = 110
MAX_PANELS = 6  # per-run panels drawn at most; the title says when runs were left out
MIB = 2**20
STATUS_ORDER = ("ok", "oom", "late", "dropped", "unavailable")
STATUS_COLORS = {"ok": "#2ca02c", "oom": "#d62728", "late": "#ff7f0e", "dropped": "#9467bd",
                 "unavailable": "#b0b0b0"}
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf")


# -- helpers ------------------------------------------------------------------------------------


def run_labels(runs: Sequence[Run]) -> list[str]:
    """A short distinct label per run: its config ``name``, else the file stem; the path when those clash."""
    labels = [str(r.config.get("name") or r.path.stem) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [r.path.stem for r in runs]
    if len(set(labels)) < len(labels):
        labels = [str(r.path) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{label} (#{i + 1})" for i, label in enumerate(labels)]
    return labels


def _color(i: int) -> str:
    return RUN_COLORS[i % len(RUN_COLORS)]


def _target(out: Path, default: str) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out / default
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path) -> Path:
    fig.savefig(out, format="png", dpi=DPI)
    return out


def _panels(runs: Sequence[Run], keep: Callable[[Run], bool]) -> list[int]:
    """Indices of the runs that have data for a per-run figure, at most MAX_PANELS."""
    return [i for i, r in enumerate(runs) if keep(r)][:MAX_PANELS]


def _which(shown: list[int], runs: Sequence[Run], have: int) -> str:
    """Title suffix naming which runs the panels show."""
    if len(runs) == 1:
        return ""
    if len(shown) == len(runs):
        return " (one panel per run)"
    if len(shown) == 1 and have == 1:
        return f" (run {shown[0] + 1} of {len(runs)}: the only one with data)"
    return f" (one panel per run: {len(shown)} of the {have} runs with data, of {len(runs)})"


def _grid(n: int, width: float = 11.0, height: float = 3.3) -> tuple[Figure, list[Any]]:
    cols = 1 if n == 1 else 2
    rows = (n + cols - 1) // cols
    fig = _figure(width if n > 1 else width * 0.8, 1.0 + height * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _rounds_x(rounds: pd.DataFrame) -> np.ndarray:
    """Rounds completed (1-based): the trace's 0-based ``round`` + 1."""
    return rounds["round"].to_numpy(dtype=np.int64) + 1


def _device_colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _mib(value: float, _pos: Any = None) -> str:
    mib = value / MIB
    if mib >= 1024:
        return f"{mib / 1024:.3g} GiB"
    if mib >= 1:
        return f"{mib:.3g} MiB"
    return f"{value / 1024:.3g} KiB"


# -- plots ----------------------------------------------------------------------------------------


def accuracy(runs: Sequence[Run], out: Path) -> Path | None:
    """Test accuracy vs rounds completed and vs emulated time: two panels, one line per run."""
    series = []
    for i, run in enumerate(runs):
        ev = run.rounds.dropna(subset=["test_accuracy"])
        if len(ev):
            series.append((i, ev))
    if not series:
        return None
    fig = _figure(11, 4.2)
    ax_round, ax_time = fig.subplots(1, 2)
    labels = run_labels(runs)
    for i, ev in series:
        acc = ev["test_accuracy"].to_numpy(dtype=float)
        style = {"color": _color(i), "marker": "o", "markersize": 4, "label": labels[i]}
        ax_round.plot(_rounds_x(ev), acc, **style)
        ax_time.plot(ev["emulated_time_s"].to_numpy(dtype=float), acc, **style)
    ax_round.set_xlabel("rounds completed")
    ax_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_time.set_xlabel("emulated time (s)")
    for ax in (ax_round, ax_time):
        ax.set_ylabel("test accuracy (fraction)")
        ax.grid(alpha=0.3)
    ax_round.set_title("vs rounds")
    ax_time.set_title("vs emulated time")
    if len(runs) > 1:
        ax_round.legend(fontsize="small")
    fig.suptitle("Test accuracy of the global model")
    return _save(fig, _target(out, "accuracy.png"))


def energy_per_round(runs: Sequence[Run], out: Path) -> Path | None:
    """Modelled energy per round, stacked by device type; one panel per run (at most MAX_PANELS)."""
    def has(run: Run) -> bool:
        return len(run.client_rounds) > 0 and float(run.client_rounds["energy_j"].sum()) > 0

    have = [i for i, r in enumerate(runs) if has(r)]
    shown = _panels(runs, has)
    if not shown:
        return None
    devices = sorted({str(d) for i in shown for d in runs[i].client_rounds["device_name"].dropna().unique()})
    colors = _device_colors(devices)
    fig, axes = _grid(len(shown))
    labels = run_labels(runs)
    for ax, i in zip(axes, shown, strict=True):
        cr = runs[i].client_rounds
        table = cr.pivot_table(index="round", columns="device_name", values="energy_j", aggfunc="sum",
                               fill_value=0.0, observed=True)
        table = table.reindex(index=runs[i].rounds["round"].to_numpy(), fill_value=0.0)
        x = table.index.to_numpy(dtype=np.int64) + 1
        bottom = np.zeros(len(table))
        for name in [d for d in devices if d in table.columns]:
            values = table[name].to_numpy(dtype=float)
            if len(x) <= 80:
                ax.bar(x, values, bottom=bottom, color=colors[name], label=name, width=0.8)
            else:
                ax.fill_between(x, bottom, bottom + values, color=colors[name], label=name, step="mid")
            bottom += values
        top = float(bottom.max()) if len(bottom) else 0.0
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # zero-height top bars would pin the limit
        ax.set_title(labels[i], fontsize="medium")
        ax.set_xlabel("round")
        ax.set_ylabel("modelled energy (J)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
    handles, names = [], []
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    order = sorted(range(len(names)), key=lambda k: devices.index(names[k]))
    fig.legend([handles[k] for k in order], [names[k] for k in order], loc="outside right center",
               title="device", fontsize="small")
    fig.suptitle("Modelled energy per round by device type" + _which(shown, runs, len(have)))
    return _save(fig, _target(out, "energy_per_round.png"))


def memory(runs: Sequence[Run], out: Path) -> Path | None:
    """Peak memory (max over clients that computed) vs memory budget, per device type and run.

    Per device type, each run gets a wide pale bar (its budget) with a narrow solid bar in
    front (the largest client peak). Log scale when the values span more than 100x.
    """
    per_run: list[pd.DataFrame] = []
    for run in runs:
        cr = run.client_rounds
        cr = cr[cr["peak_memory_bytes"] > 0]
        if len(cr) == 0:
            per_run.append(pd.DataFrame())
            continue
        per_run.append(cr.groupby("device_name", observed=True).agg(
            peak=("peak_memory_bytes", "max"), budget=("memory_budget_bytes", "max")))
    devices = sorted({str(d) for t in per_run for d in t.index})
    if not devices:
        return None
    n = len(runs)
    labels = run_labels(runs)
    fig = _figure(max(7.0, 1.2 + 0.55 * len(devices) * max(n, 1.5)), 4.6)
    ax = fig.subplots()
    slot = 0.8 / n
    values = []
    for i, table in enumerate(per_run):
        if table.empty:
            continue
        x = np.array([devices.index(str(d)) for d in table.index], dtype=float) - 0.4 + slot * (i + 0.5)
        budget = table["budget"].to_numpy(dtype=float)
        peak = table["peak"].to_numpy(dtype=float)
        values.extend([*budget, *peak])
        ax.bar(x, budget, width=slot * 0.95, color=_color(i), alpha=0.22, edgecolor=_color(i),
               label="budget" if n == 1 else f"{labels[i]}: budget")
        ax.bar(x, peak, width=slot * 0.45, color=_color(i),
               label="max peak" if n == 1 else f"{labels[i]}: max peak")
        over = peak > budget
        if over.any():
            ax.plot(x[over], peak[over], "v", color="black", label="peak over budget")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 100:
        # Powers of 4 bytes: 1 MiB, 4 MiB, 16 MiB, ... 1 GiB, 4 GiB.
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=4))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(_mib))
        ax.set_ylabel("memory (log scale)")
    else:
        unit, name = (2**30, "GiB") if max(values, default=0) >= 2**30 else (MIB, "MiB")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / unit:g}"))
        ax.set_ylabel(f"memory ({name})")
    ax.set_xticks(range(len(devices)), devices, rotation=20 if len(devices) > 4 else 0, ha="right"
                  if len(devices) > 4 else "center")
    ax.set_xlabel("device type")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize="small", loc="outside right center")
    fig.suptitle("Peak training memory vs memory budget per device type")
    return _save(fig, _target(out, "memory.png"))


def participation(runs: Sequence[Run], out: Path) -> Path | None:
    """Share of the cohort per status (ok/oom/late/dropped/unavailable) per round; one panel per run."""
    def has(run: Run) -> bool:
        return len(run.rounds) > 0

    have = [i for i, r in enumerate(runs) if has(r)]
    shown = _panels(runs, has)
    if not shown:
        return None
    fig, axes = _grid(len(shown))
    labels = run_labels(runs)
    for ax, i in zip(axes, shown, strict=True):
        rounds = runs[i].rounds
        counts = np.stack([rounds[f"num_{s}"].to_numpy(dtype=float) for s in STATUS_ORDER])
        total = counts.sum(axis=0)
        shares = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
        x = _rounds_x(rounds)
        if len(x) <= 80:
            bottom = np.zeros(len(x))
            for status, share in zip(STATUS_ORDER, shares, strict=True):
                ax.bar(x, share, bottom=bottom, color=STATUS_COLORS[status], label=status, width=0.85)
                bottom += share
        else:
            ax.stackplot(x, shares, colors=[STATUS_COLORS[s] for s in STATUS_ORDER], labels=list(STATUS_ORDER))
        ax.set_ylim(0, 1)
        ax.set_title(labels[i], fontsize="medium")
        ax.set_xlabel("round")
        ax.set_ylabel("share of cohort")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", title="status", fontsize="small")
    fig.suptitle("Client participation per round" + _which(shown, runs, len(have)))
    return _save(fig, _target(out, "participation.png"))


def _column(frame: pd.DataFrame, *names: str) -> str | None:
    for name in names:
        if name in frame.columns:
            return name
    return None


def _steps(frame: pd.DataFrame) -> np.ndarray:
    col = _column(frame, "step", "round")
    if col is None:
        return np.arange(len(frame))
    return frame[col].to_numpy(dtype=np.int64)


def stitch(runs: Sequence[Run], out: Path) -> Path | None:
    """FedStitch: candidate pool size and the chosen block per stitching step (from ``/stitch``)."""
    found = [(i, r.stitch) for i, r in enumerate(runs) if len(r.stitch)]
    if not found:
        return None
    fig = _figure(11, 4.4)
    ax_pool, ax_chosen = fig.subplots(1, 2)
    labels = run_labels(runs)
    chosen_names: list[str] = []
    drew_pool = drew_chosen = False
    for i, table in found:
        steps = _steps(table)
        pool = _column(table, "pool_size", "num_candidates", "candidates", "num_blocks")
        if pool is not None and table[pool].dtype.kind in "iuf":
            ax_pool.plot(steps, table[pool].to_numpy(dtype=float), marker="o", color=_color(i), label=labels[i])
            drew_pool = True
        chosen = _column(table, "chosen_block", "chosen", "block", "chosen_name", "block_name")
        if chosen is not None:
            names = [str(v) for v in table[chosen].tolist()]
            for name in names:
                if name not in chosen_names:
                    chosen_names.append(name)
            ax_chosen.plot(steps, [chosen_names.index(n) for n in names], marker="s", linestyle=":",
                           color=_color(i), label=labels[i])
            drew_chosen = True
    if not (drew_pool or drew_chosen):
        return None
    ax_pool.set_title("candidate pool size")
    ax_pool.set_xlabel("stitching step")
    ax_pool.set_ylabel("blocks in pool")
    ax_chosen.set_title("chosen block")
    ax_chosen.set_xlabel("stitching step")
    ax_chosen.set_ylabel("block")
    if chosen_names:
        ax_chosen.set_yticks(range(len(chosen_names)), chosen_names, fontsize="small")
    for ax in (ax_pool, ax_chosen):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(found) > 1 and ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle("FedStitch: search space and chosen blocks per step")
    return _save(fig, _target(out, "stitch.png"))


def _rl_weights(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """(step, weight) points: an array-valued ``weights`` column, ``weight_*`` columns, or a ``weight`` column."""
    steps = _steps(table)
    col = _column(table, "weights", "client_weights", "action", "actions")
    if col is not None and table[col].dtype == object:
        xs, ys = [], []
        for step, value in zip(steps, table[col].tolist(), strict=True):
            arr = np.asarray(value, dtype=float).ravel()
            xs.extend([step] * len(arr))
            ys.extend(arr.tolist())
        return np.asarray(xs), np.asarray(ys)
    wide = [c for c in table.columns if str(c).startswith("weight_")]
    if wide:
        w = table[wide].to_numpy(dtype=float)
        return np.repeat(steps, w.shape[1]), w.ravel()
    col = _column(table, "weight", "weights", "action")
    if col is not None and table[col].dtype.kind in "iuf":
        return steps, table[col].to_numpy(dtype=float)
    return None


def rl_weights(runs: Sequence[Run], out: Path) -> Path | None:
    """RL aggregation: the clients' weights per step (points, mean line), and the reward (from ``/rl``)."""
    found = [(i, r.rl) for i, r in enumerate(runs) if len(r.rl)]
    points = [(i, table, _rl_weights(table)) for i, table in found]
    points = [(i, table, p) for i, table, p in points if p is not None and len(p[0])]
    if not points:
        return None
    with_reward = [(i, table) for i, table, _ in points if "reward" in table.columns]
    fig = _figure(11, 4.4)
    axes = fig.subplots(1, 2 if with_reward else 1, squeeze=False).ravel()
    labels = run_labels(runs)
    for i, _table, (x, y) in points:
        keep = np.isfinite(y)
        axes[0].scatter(x[keep], y[keep], s=10, alpha=0.35, color=_color(i))
        mean = pd.Series(y[keep]).groupby(x[keep]).mean()
        axes[0].plot(mean.index.to_numpy(), mean.to_numpy(), color=_color(i), label=f"{labels[i]} (mean)")
    axes[0].set_title("client weights (points: clients, line: mean)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("aggregation weight")
    if with_reward:
        for i, table in with_reward:
            axes[1].plot(_steps(table), table["reward"].to_numpy(dtype=float), marker="o", color=_color(i),
                         label=labels[i])
        axes[1].set_title("reward")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("reward (proxy gain)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(points) > 1:
            ax.legend(fontsize="small")
    fig.suptitle("RL-weighted aggregation per step")
    return _save(fig, _target(out, "rl_weights.png"))


def nvml_power(runs: Sequence[Run], out: Path) -> Path | None:
    """Measured GPU board power over time since the run's first sample; one line per run, rank and GPU."""
    found = [(i, r.nvml) for i, r in enumerate(runs) if len(r.nvml)]
    if not found:
        return None
    fig = _figure(11, 4.2)
    ax = fig.subplots()
    labels = run_labels(runs)
    styles = ("-", "--", ":", "-.")
    count = 0
    for i, samples in found:
        start = float(samples["unix_time_s"].min())
        for k, ((rank, gpu), group) in enumerate(samples.sort_values("unix_time_s").groupby(["rank", "gpu"])):
            ax.plot(group["unix_time_s"].to_numpy(dtype=float) - start, group["power_w"].to_numpy(dtype=float),
                    color=_color(i), linestyle=styles[k % len(styles)], linewidth=1,
                    label=f"{labels[i]}: rank {rank}, GPU {gpu}")
            count += 1
    ax.set_xlabel("time since the run's first sample (s)")
    ax.set_ylabel("board power (W)")
    ax.grid(alpha=0.3)
    if count > 4:
        fig.legend(fontsize="small", loc="outside right center")
    elif count > 1:
        ax.legend(fontsize="small")
    fig.suptitle("NVML power samples")
    return _save(fig, _target(out, "nvml_power.png"))


# -- registry -------------------------------------------------------------------------------------

# name -> (function, caption), in report order.
PLOTS: dict[str, tuple[Callable[[Sequence[Run], Path], Path | None], str]] = {
    "accuracy": (accuracy, "Test accuracy vs rounds and vs emulated time"),
    "energy_per_round": (energy_per_round, "Modelled energy per round by device type"),
    "memory": (memory, "Peak memory vs budget per device type"),
    "participation": (participation, "Participation per round by status"),
    "stitch": (stitch, "FedStitch pool size and chosen blocks per step"),
    "rl_weights": (rl_weights, "RL aggregation weights per step"),
    "nvml_power": (nvml_power, "NVML power over time"),
}
DEFAULT_NAMES = {name: f"{name}.png" for name in PLOTS}


def _attr_set(runs: Sequence[Run], what: Callable[[Run], Any]) -> str:
    values = []
    for run in runs:
        value = str(what(run))
        if value not in values:
            values.append(value)
    return ", ".join(values)


def skip_reason(name: str, runs: Sequence[Run]) -> str:
    """Why plot ``name`` has no data in ``runs``, in words (for the report)."""
    if name == "accuracy":
        return "no evaluated rounds (test accuracy is NaN in every /rounds row)"
    if name == "energy_per_round":
        return "no modelled energy in /client_rounds"
    if name == "memory":
        return "no client measured a peak memory in /client_rounds"
    if name == "participation":
        return "no finished rounds in /rounds"
    if name == "stitch":
        return f"no /stitch rows (algorithm = {_attr_set(runs, lambda r: r.config.get('algorithm', '?'))})"
    if name == "rl_weights":
        return f"no /rl rows (algorithm = {_attr_set(runs, lambda r: r.config.get('algorithm', '?'))})"
    if name == "nvml_power":
        return f"no NVML samples (meter = {_attr_set(runs, lambda r: r.meta.get('meter', 'none'))})"
    raise KeyError(name)


def render_all(runs: Sequence[Run], out_dir: Path) -> dict[str, Path | None]:
    """Every plot of ``PLOTS`` into ``out_dir`` (default names); ``None`` for a plot without data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: func(runs, out_dir / DEFAULT_NAMES[name]) for name, (func, _caption) in PLOTS.items()}
