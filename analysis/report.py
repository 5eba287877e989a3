"""A static report of one or more runs: ``report.md`` and a self-contained ``index.html``.

:func:`write_report` reads the traces (``analysis.read``), summarises them
(``analysis.summary``), draws the figures (``analysis.plots``) next to the two files, and
writes the same content twice: as Markdown and as one HTML page with inline CSS, plain
HTML tables and images referenced by relative file name, so the folder opens from disk
without a server, network or JavaScript. Every string that comes from a trace is escaped.

Numbers are printed by :func:`format_value` in both files, so a test (or a reader) can
recompute a number from the HDF5 datasets and find exactly that text in the report.
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import plots
from analysis.read import Run, Runs, TraceError
from analysis.read import open as open_run
from analysis.summary import summarize, summary_table

REPORT_MD = "report.md"
INDEX_HTML = "index.html"
MAX_EVENTS = 20  # warnings and errors listed per run

# (dotted config key, label) shown for every run.
CONFIG_HIGHLIGHTS = (
    ("algorithm", "algorithm"),
    ("data.dataset", "dataset"),
    ("devices.mix", "devices.mix"),
    ("rounds", "rounds (configured)"),
    ("clients_per_round", "clients_per_round"),
    ("data.partition.num_clients", "clients"),
    ("seed", "seed"),
)
# summarize() keys shown in each run's summary table, in order; the target rows only with a target.
SUMMARY_KEYS = (
    "finished", "rounds", "final_accuracy", "best_accuracy", "emulated_time_s", "wall_time_s",
    "energy_j", "energy_measured_j", "bytes_up", "bytes_down", "meter",
)
TARGET_KEYS = ("target_accuracy", "rounds_to_target", "emulated_time_to_target_s")


# -- formatting -----------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and math.isnan(value)


def _human_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"  # pragma: no cover - the loop returns


def format_number(value: float) -> str:
    """A float with 4 significant digits: ``0.3333``, ``12.35``, ``1,235`` (no exponent from 0.001 to 1e15)."""
    if _is_missing(value):
        return "n/a"
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1e-3:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_value(value: Any, key: str = "") -> str:
    """How the report prints a value; ``key`` (the summary key or column) picks the style.

    - missing (None, NaN) -> ``n/a``; booleans -> ``yes``/``no``
    - ``*accuracy*`` -> 4 decimals (``0.3333``); shares (``participation.*``, ``*_share``) -> percent, 1 decimal
    - ``*bytes*`` integers -> thousands separators and binary units: ``1,234,567 (1.18 MiB)``
    - other integers -> thousands separators; other floats -> :func:`format_number`
    """
    if _is_missing(value):
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, numbers.Real):
        if "accuracy" in leaf and not isinstance(value, numbers.Integral):
            return f"{float(value):.4f}"
        if key.startswith("participation.") or leaf.endswith("_share") or leaf == "share":
            return f"{100 * float(value):.1f}%"
        if "bytes" in leaf and float(value).is_integer():
            return f"{int(value):,} ({_human_bytes(int(value))})"
        if isinstance(value, numbers.Integral):
            return f"{int(value):,}"
        return format_number(float(value))
    return str(value)


# -- a small document model rendered twice --------------------------------------------------------


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-align these columns
    id: str = ""


@dataclass
class Block:
    kind: str  # "h1" "h2" "h3" "p" "note" "table" "image" "list" "toc" (items: "anchor\ttext") "columns"
    text: str = ""
    table: Table | None = None
    items: list[str] = field(default_factory=list)
    src: str = ""
    id: str = ""
    columns: list[list[Block]] = field(default_factory=list)  # kind "columns": side by side in HTML


def _md_escape(text: str) -> str:
    text = " ".join(str(text).split())
    for ch in ("\\", "|", "*", "`", "[", "]", "<", ">"):
        text = text.replace(ch, "\\" + ch)
    return text


def _md_table(table: Table) -> list[str]:
    align = ["---:" if table.numeric[i] else "---" for i in range(len(table.header))] if table.numeric \
        else ["---"] * len(table.header)
    lines = ["| " + " | ".join(_md_escape(h) for h in table.header) + " |", "| " + " | ".join(align) + " |"]
    lines.extend("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in table.rows)
    return lines


def render_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "columns":
            out.extend(render_markdown([b for column in block.columns for b in column]).rstrip("\n").split("\n"))
        elif block.kind in ("h1", "h2", "h3"):
            out.append("#" * int(block.kind[1]) + " " + _md_escape(block.text))
        elif block.kind == "p":
            out.append(_md_escape(block.text))
        elif block.kind == "note":
            out.append("_" + _md_escape(block.text) + "_")
        elif block.kind == "list":
            out.extend("- " + _md_escape(item) for item in block.items)
        elif block.kind == "toc":
            out.extend("- " + _md_escape(item.split("\t", 1)[1]) for item in block.items)
        elif block.kind == "table" and block.table is not None:
            out.extend(_md_table(block.table))
        elif block.kind == "image":
            out.append(f"![{_md_escape(block.text)}]({block.src})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 0;
       background: #f6f7f9; color: #1d2430; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; background: #fff;
       box-shadow: 0 0 12px rgba(0, 0, 0, 0.06); }
h1 { font-size: 1.7em; margin: 0.2em 0 0.6em; border-bottom: 2px solid #d0d6e0; padding-bottom: 0.3em; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #e1e5eb; padding-bottom: 0.2em; }
h3 { font-size: 1.08em; margin: 1.2em 0 0.4em; color: #364152; }
p { margin: 0.4em 0; }
.note { color: #6b7280; font-style: italic; }
table { border-collapse: collapse; margin: 0.4em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d8dde5; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0 1.6em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e1e5eb; }
figcaption { color: #4b5563; font-size: 0.9em; margin-top: 0.3em; }
ul { margin: 0.3em 0 1em; padding-left: 1.4em; }
nav ul { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 6px 20px; }
.cols { display: flex; flex-wrap: wrap; gap: 0 40px; align-items: flex-start; }
.col { min-width: 0; }
"""


def _html_table(table: Table) -> str:
    def cls(i: int) -> str:
        return ' class="num"' if table.numeric and table.numeric[i] else ""

    ident = f' id="{html.escape(table.id)}"' if table.id else ""
    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(table.header))
    body = "\n".join(
        "<tr>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in table.rows
    )
    return (
        f'<div class="scroll"><table{ident}>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody>\n</table></div>"
    )


def _html_blocks(blocks: Sequence[Block]) -> str:
    parts: list[str] = []
    for block in blocks:
        ident = f' id="{html.escape(block.id)}"' if block.id else ""
        if block.kind == "columns":
            inner = "".join(f'<div class="col">{_html_blocks(column)}</div>' for column in block.columns)
            parts.append(f'<div class="cols">{inner}</div>')
        elif block.kind in ("h1", "h2", "h3"):
            parts.append(f"<{block.kind}{ident}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "p":
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif block.kind == "note":
            parts.append(f'<p class="note">{html.escape(block.text)}</p>')
        elif block.kind == "list":
            parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>")
        elif block.kind == "toc":
            links = [item.split("\t", 1) for item in block.items]
            parts.append("<nav><ul>" + "".join(f'<li><a href="#{html.escape(a, quote=True)}">{html.escape(t)}</a></li>'
                                               for a, t in links) + "</ul></nav>")
        elif block.kind == "table" and block.table is not None:
            parts.append(_html_table(block.table))
        elif block.kind == "image":
            parts.append(f'<figure><img src="{html.escape(block.src, quote=True)}" '
                         f'alt="{html.escape(block.text, quote=True)}"></figure>')
    return "\n".join(parts)


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = _html_blocks(blocks)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        "</body>\n</html>\n"
    )


# -- report content -------------------------------------------------------------------------------


def _config_text(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_config_text(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)  # as written in the config: 0.1, 1.0, 1e-05
    return format_value(value)


def _kv(rows: Sequence[tuple[str, str]], ident: str, header: tuple[str, str] = ("key", "value"),
        numeric: bool = True) -> Block:
    return Block("table", table=Table(list(header), [[k, v] for k, v in rows], [False, numeric], ident))


def _highlights(run: Run, varying: Sequence[str]) -> list[tuple[str, str]]:
    rows = [(label, _config_text(run.config_value(key, None))) for key, label in CONFIG_HIGHLIGHTS]
    meta = run.meta
    rows += [
        ("ranks", format_value(meta.get("ranks"))),
        ("workers", format_value(meta.get("workers"))),
        ("device (rank 0)", format_value(meta.get("device"))),
        ("meter", format_value(meta.get("meter", "none"))),
        ("started_at", format_value(meta.get("started_at"))),
        ("fedemu_version", format_value(meta.get("fedemu_version"))),
    ]
    shown = {key for key, _label in CONFIG_HIGHLIGHTS}
    rows += [(key, _config_text(run.config_value(key, None))) for key in varying if key not in shown]
    return rows


def _run_section(run: Run, label: str, number: int, summary: dict[str, Any], varying: Sequence[str],
                 target: float | None) -> list[Block]:
    ident = f"run-{number}"
    blocks = [
        Block("h2", f"Run {number}: {label}", id=ident),
        Block("p", f"Trace: {run.path}" + ("" if run.finished else " (unfinished: no finish event; a live or "
                                                                  "killed run, finished rounds only)")),
    ]
    keys = list(SUMMARY_KEYS) + (list(TARGET_KEYS) if target is not None else [])
    config = [Block("h3", "Configuration"), _kv(_highlights(run, varying), f"{ident}-config", numeric=False)]
    numbers = [
        Block("h3", "Summary"),
        _kv([(k, format_value(summary[k], k)) for k in keys], f"{ident}-summary", ("metric", "value")),
    ]
    blocks.append(Block("columns", columns=[config, numbers]))

    devices = sorted(set(summary["energy_by_device"]) | set(summary["memory_by_device"]))
    if devices:
        blocks.append(Block("h3", "Per device type"))
        counts = run.client_rounds.groupby("device_name", observed=True).size()
        rows = []
        for name in devices:
            energy = summary["energy_by_device"].get(name, {})
            mem = summary["memory_by_device"].get(name, {})
            rows.append([
                name,
                format_value(int(counts.get(name, 0))),
                format_value(energy.get("modelled_j"), "modelled_j"),
                format_value(energy.get("measured_j"), "measured_j"),
                format_value(mem.get("peak_bytes_max"), "peak_bytes_max"),
                format_value(mem.get("budget_bytes"), "budget_bytes"),
                format_value(mem.get("over_budget_share"), "over_budget_share"),
            ])
        header = ["device", "client rounds", "modelled energy (J)", "measured energy (J)", "max peak memory",
                  "memory budget", "client rounds over budget"]
        blocks.append(Block("table", table=Table(header, rows, [False] + [True] * 6, f"{ident}-devices")))

    shares = summary["participation"]
    blocks.append(Block("h3", "Participation (share of client rounds)"))
    blocks.append(Block("table", table=Table(
        list(shares), [[format_value(v, f"participation.{k}") for k, v in shares.items()]],
        [True] * len(shares), f"{ident}-participation")))

    events = run.events
    if len(events):
        bad = events[events["level"].isin(["warning", "error"])]
        if len(bad):
            blocks.append(Block("h3", f"Warnings and errors ({len(bad)})"))
            items = [f"[{row.level}] round {row.round}, rank {row.rank}, {row.kind}: {row.message}"
                     for row in bad.head(MAX_EVENTS).itertuples()]
            if len(bad) > MAX_EVENTS:
                items.append(f"... and {len(bad) - MAX_EVENTS} more in /events")
            blocks.append(Block("list", items=items))
    return blocks


def _comparison(runs: Sequence[Run], labels: list[str], varying: Sequence[str], target: float | None) -> Block:
    table = summary_table(runs, target_accuracy=target)
    skip = {"run", "path"} | (set() if target is not None else set(TARGET_KEYS))
    rows = [[f"config: {key}", *[_config_text(r.config_value(key, None)) for r in runs]] for key in varying]
    for column in table.columns:
        if column in skip:
            continue
        rows.append([column, *[format_value(v, column) for v in table[column].tolist()]])
    return Block("table", table=Table(["metric", *labels], rows, [False] + [True] * len(runs), "comparison"))



def build(runs: Sequence[Run], out_dir: Path, *, target_accuracy: float | None = None) -> tuple[str, list[Block]]:
    """The report's title and blocks; draws the figures into ``out_dir``."""
    labels = plots.run_labels(runs)
    # Config keys that differ between the runs, less the ones that always do (names, output paths).
    varying = [k for k in (Runs(runs).varying if len(runs) > 1 else []) if k != "name" and not k.startswith("output.")]
    title = "fedemu report: " + ", ".join(labels)
    blocks = [Block("h1", title)]
    intro = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
    if target_accuracy is not None:
        intro += f"; target accuracy {format_value(target_accuracy, 'target_accuracy')}"
    blocks.append(Block("p", intro + ". Energies are modelled unless marked measured; times are emulated "
                             "unless marked wall."))
    toc = [f"run-{i + 1}\tRun {i + 1}: {label}" for i, label in enumerate(labels)]
    toc += (["comparison\tComparison"] if len(runs) > 1 else []) + ["figures\tFigures"]
    blocks.append(Block("toc", items=toc))
    for i, run in enumerate(runs):
        summary = summarize(run, target_accuracy=target_accuracy)
        blocks += _run_section(run, labels[i], i + 1, summary, varying, target_accuracy)
    if len(runs) > 1:
        blocks.append(Block("h2", "Comparison", id="comparison"))
        if varying:
            blocks.append(Block("p", "Config keys that differ between the runs: " + ", ".join(varying) + "."))
        blocks.append(_comparison(runs, labels, varying, target_accuracy))
    blocks.append(Block("h2", "Figures", id="figures"))
    for name, path in plots.render_all(runs, out_dir).items():
        caption = plots.PLOTS[name][1]
        if path is None:
            stale = out_dir / plots.DEFAULT_NAMES[name]
            if stale.is_file():
                stale.unlink()  # a figure from an earlier report of other runs
            blocks.append(Block("h3", caption))
            blocks.append(Block("note", f"Skipped: {plots.skip_reason(name, runs)}."))
        else:
            blocks.append(Block("h3", caption))
            blocks.append(Block("image", caption, src=path.name))
    return title, blocks


def write_report(paths: Sequence[Path], out_dir: Path, *, target_accuracy: float | None = None) -> tuple[Path, Path]:
    """Write ``out_dir/report.md`` and ``out_dir/index.html`` (plus the PNGs) for the traces at ``paths``.

    Raises :class:`analysis.read.TraceError` (one line) when a trace cannot be read or no path is given.
    Returns ``(report.md, index.html)``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise TraceError("no trace files given for the report")
    runs = [open_run(p) for p in paths]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title, blocks = build(runs, out_dir, target_accuracy=target_accuracy)
    md = out_dir / REPORT_MD
    index = out_dir / INDEX_HTML
    md.write_text(render_markdown(blocks), encoding="utf-8")
    index.write_text(render_html(blocks, title), encoding="utf-8")
    return md, index
