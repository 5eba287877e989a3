"""analysis.report / analysis.plots on real traces (the shared ``small_traces`` fixture).

The numbers in the report are checked against a direct recomputation from the HDF5
datasets (h5py, not analysis.read), the HTML page against being self-contained, and the
figures against being real PNG files.
"""

from __future__ import annotations

import copy
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import plots
from analysis.read import TraceError
from analysis.read import open as open_run
from analysis.report import INDEX_HTML, REPORT_MD, format_number, format_value, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr", "area", "base"}


class Page(HTMLParser):
    """Collects tables (by id), image sources, links and ids; checks that tags nest."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "a":
            self.links.append(a.get("href") or "")
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(index: Path) -> Page:
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    page.close()
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)
    return page


def kv(page: Page, table: str) -> dict[str, str]:
    rows = page.tables[table]
    return {row[0]: row[1] for row in rows[1:]}


def md_section(md: str, heading: str) -> str:
    """The markdown text from ``## heading`` to the next ``## ``."""
    start = md.index(f"## {heading}")
    end = md.find("\n## ", start + 3)
    return md[start : end if end >= 0 else len(md)]


def recompute(path: Path) -> dict:
    """Headline numbers straight from the HDF5 datasets."""
    with h5py.File(path, "r", swmr=True) as f:
        rounds = f["/rounds/table"][:]
        cr = f["/client_rounds/table"][:]
        devices = [n.decode() for n in f["/devices/table"]["name"]]
    cr = cr[np.isin(cr["round"], rounds["round"])]
    acc = rounds["test_accuracy"][np.isfinite(rounds["test_accuracy"])]
    by_device = {}
    for d in np.unique(cr["device"]):
        by_device[devices[int(d)]] = float(cr["energy_j"][cr["device"] == d].sum())
    return {
        "rounds": len(rounds),
        "final_accuracy": float(acc[-1]),
        "energy_j": float(cr["energy_j"].sum()),
        "bytes_up": int(rounds["bytes_up"].sum()),
        "by_device": by_device,
    }


def as_float(text: str) -> float:
    return float(text.split(" (")[0].replace(",", ""))


@pytest.fixture(scope="module")
def report(small_traces: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    out = tmp_path_factory.mktemp("report")
    md, index = write_report(small_traces, out, target_accuracy=0.3)
    return out, md, index


def test_files_and_figures_are_real_pngs(report: tuple[Path, Path, Path]) -> None:
    out, md, index = report
    assert md == out / REPORT_MD and index == out / INDEX_HTML
    assert md.is_file() and index.is_file()
    md_images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
    page = parse(index)
    assert md_images == page.images
    assert {"accuracy.png", "energy_per_round.png", "memory.png", "participation.png"} <= set(md_images)
    for name in md_images:
        png = out / name  # relative, next to the report
        assert png.parent == out and png.is_file(), name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(png) as im:
            im.load()
            assert im.width >= 400 and im.height >= 250, (name, im.size)
            colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 20, name  # something is drawn


def test_numbers_equal_a_recomputation_from_hdf5(small_traces: list[Path], report: tuple[Path, Path, Path]) -> None:
    _out, md, index = report
    page = parse(index)
    text = md.read_text()
    comparison = {row[0]: row[1:] for row in page.tables["comparison"][1:]}
    for i, path in enumerate(small_traces):
        want = recompute(path)
        acc = f"{want['final_accuracy']:.4f}"
        energy = format_number(want["energy_j"])
        assert abs(as_float(energy) - want["energy_j"]) <= 5e-4 * want["energy_j"]  # 4 significant digits

        summary = kv(page, f"run-{i + 1}-summary")
        assert summary["final_accuracy"] == acc
        assert summary["energy_j"] == energy
        assert summary["rounds"] == str(want["rounds"])
        assert as_float(summary["bytes_up"]) == want["bytes_up"]
        assert comparison["final_accuracy"][i] == acc
        assert comparison["energy_j"][i] == energy

        section = md_section(text, f"Run {i + 1}: ")
        assert f"| final_accuracy | {acc} |" in section
        assert f"| energy_j | {energy} |" in section

        devices = {row[0]: row for row in page.tables[f"run-{i + 1}-devices"][1:]}
        assert set(devices) == set(want["by_device"])
        for name, joules in want["by_device"].items():
            assert devices[name][2] == format_number(joules)
            assert abs(as_float(devices[name][2]) - joules) <= 5e-4 * joules


def test_html_is_self_contained(report: tuple[Path, Path, Path]) -> None:
    out, _md, index = report
    raw = index.read_text(encoding="utf-8")
    assert "http://" not in raw.lower() and "https://" not in raw.lower()
    assert "<script" not in raw.lower() and "<link" not in raw.lower() and "@import" not in raw
    assert "<style>" in raw
    page = parse(index)
    for href in page.links:
        assert href.startswith("#") and href[1:] in page.ids, href
    for src in page.images:
        assert "/" not in src and ":" not in src and (out / src).is_file(), src


def test_absent_data_is_skipped_and_said(small_traces: list[Path], report: tuple[Path, Path, Path]) -> None:
    out, md, index = report
    for reason in ("no NVML samples (meter = none)", "no /stitch rows (algorithm = fedavg)",
                   "no /rl rows (algorithm = fedavg)"):
        assert reason in md.read_text()
        assert reason in " ".join(parse(index).text)
    for name in ("nvml_power.png", "stitch.png", "rl_weights.png"):
        assert not (out / name).exists()
    runs = [open_run(p) for p in small_traces]
    assert plots.nvml_power(runs, out / "x.png") is None
    assert plots.stitch(runs, out / "x.png") is None
    assert plots.rl_weights(runs, out / "x.png") is None
    no_eval = copy.copy(runs[0])
    no_eval.rounds = runs[0].rounds.assign(test_accuracy=np.nan)
    assert plots.accuracy([no_eval], out / "x.png") is None
    assert not (out / "x.png").exists()


def test_plots_draw_stitch_rl_and_nvml_rows(small_traces: list[Path], tmp_path: Path) -> None:
    runs = []
    for k, path in enumerate(small_traces):
        run = open_run(path)
        run.stitch = pd.DataFrame({"step": [0, 1, 2], "pool_size": [12, 8 - k, 5],
                                   "chosen_block": ["resnet18.layer1", "mobilenetv3.blocks.2", "vit.blocks.4"]})
        run.rl = pd.DataFrame({"step": [0, 1, 2], "weights": [np.full(8, 1 / 8)] * 3, "reward": [0.1, 0.0, 0.3]})
        t = 1.7e9 + np.arange(20) * 0.5
        run.nvml = pd.DataFrame({"unix_time_s": t, "rank": 1, "gpu": 0, "power_w": 60 + 10 * np.sin(t),
                                 "energy_j": 0.0, "memory_used_bytes": 0, "utilization_pct": 0.0, "sm_clock_mhz": 0.0})
        runs.append(run)
    drawn = plots.render_all(runs, tmp_path)
    assert all(path is not None for path in drawn.values()), drawn
    for path in drawn.values():
        assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    # A file name as `out` is honoured.
    assert plots.stitch(runs[:1], tmp_path / "one.png") == tmp_path / "one.png"


def test_trace_text_is_escaped(small_traces: list[Path], tmp_path: Path) -> None:
    nasty = "<script>alert(1)</script> | *x* & `y`"
    path = tmp_path / "nasty.h5"
    shutil.copy(small_traces[0], path)
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = str(f.attrs["config"]).replace('name = "alpha0.1"', f'name = "{nasty}"')
        events = f["/events/table"]
        row = events[-1:].copy()
        row["level"], row["kind"], row["message"] = b"warning", b"odd", b"<img src=x onerror=alert(2)>"
        events.resize((events.shape[0] + 1,))
        events[-1:] = row
    md, index = write_report([path], tmp_path / "out")
    raw = index.read_text(encoding="utf-8")
    assert "<script>" not in raw and "<img src=x" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    page = parse(index)
    assert nasty in " ".join(page.text)
    assert "<img src=x onerror=alert(2)>" in " ".join(page.text)
    assert "comparison" not in page.ids and "comparison" not in page.tables  # one run: no comparison
    # Markdown tables keep their shape: the pipe in the name is escaped.
    for line in md.read_text().splitlines():
        if line.startswith("| ") and "Trace" not in line:
            assert len(re.split(r"(?<!\\)\|", line)) - 2 in (2, 5, 7), line


def test_bad_input_is_one_line_trace_error(small_traces: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    for paths in ([tmp_path / "missing.h5"], [small_traces[0], junk], []):
        with pytest.raises(TraceError) as err:
            write_report(paths, tmp_path / "out")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / REPORT_MD).exists()


def test_format_value() -> None:
    assert format_value(float("nan")) == "n/a" and format_value(None) == "n/a"
    assert format_value(True) == "yes" and format_value(np.bool_(False)) == "no"
    assert format_value(0.333333, "final_accuracy") == "0.3333"
    assert format_value(0.90625, "participation.ok") == "90.6%"
    assert format_value(1234567, "bytes_up") == "1,234,567 (1.18 MiB)"
    assert format_value(np.int64(20)) == "20"
    assert format_value(1.22934, "energy_j") == "1.229"
    assert format_value(123456.7, "energy_j") == "123,457"
    assert format_value(4.0, "rounds_to_target") == "4"
    assert format_number(0.0000123) == "1.230e-05"
