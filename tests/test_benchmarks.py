"""The benchmark scripts keep working: each one's smallest mode runs and writes sane JSON.

These are smoke tests of the scripts, not measurements: the figures are only checked for shape and
for what must hold whatever the machine (same work gives the same accuracy, times are positive).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, out: Path, *args: str, timeout: float = 300) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / name), "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"wrote {out}" in done.stdout
    return json.loads(out.read_text())


def positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_quick_compares_both_layouts(tmp_path: Path) -> None:
    res = run_script("overhead.py", tmp_path / "overhead.json", "--quick")
    one, three = res["one_rank"], res["three_ranks"]
    assert positive(one["ratio_best"]) and positive(three["ratio_best"])
    assert one["target"] == 1.03 and three["target"] == 1.05
    assert len(one["bare_s"]) == len(one["fedemu_s"]) == res["repeats"] == 1
    # Identical client work: the same model at the end, whatever the layout.
    assert one["final_accuracy"]["fedemu"] == pytest.approx(one["final_accuracy"]["bare"], abs=1e-4)
    assert three["final_accuracy"]["fedemu"] == pytest.approx(three["final_accuracy"]["bare_split"], abs=1e-4)
    assert len(three["fedemu_round_wall_s"]) == len(three["bare_split_round_wall_s"]) == 2
    assert len(three["fedemu_cpu_s_per_rank"]) == 3
    assert len(three["fedemu_framework_s_per_round"]) == 2
    assert all(0 <= x <= w for x, w in zip(three["fedemu_framework_s_per_round"], three["fedemu_round_wall_s"],
                                           strict=True))
    assert all(0 <= s < 1 for s in one["trace_share"])


def test_scaling_quick_reports_each_rank_count(tmp_path: Path) -> None:
    res = run_script("scaling.py", tmp_path / "scaling.json", "--quick")
    assert sorted(res["ranks"]) == ["1", "2"]
    for n, row in res["ranks"].items():
        assert positive(row["rounds_per_s"]) and positive(row["wall_s"])
        assert len(row["cpu_s_per_rank"]) == int(n)
        assert 0.0 <= row["final_accuracy"] <= 1.0
        assert positive(row["client_s_per_round"]) and row["framework_s_per_round"] >= 0
        assert row["client_s_per_round"] + row["framework_s_per_round"] <= 1 / row["rounds_per_s"] * 1.5
    assert res["ranks"]["1"]["speedup_vs_first"] == pytest.approx(1.0)
    ceiling = res["bare_ceiling"]
    assert positive(ceiling["one_process_rounds_per_s"]) and positive(ceiling["two_processes_rounds_per_s"])
    one, two = ceiling["one_process_rounds_per_s"], ceiling["two_processes_rounds_per_s"]
    assert ceiling["ratio"] == pytest.approx(two / one)
    # Same seeds, same clients: the rank count does not change the result.
    assert res["ranks"]["2"]["final_accuracy"] == pytest.approx(res["ranks"]["1"]["final_accuracy"], abs=1e-4)


def test_scaling_rejects_bad_rank_list(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "scaling.py"), "--ranks", "0", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--ranks" in done.stderr
    assert not (tmp_path / "x").exists()


def test_clients_quick_grows_by_bytes_per_client(tmp_path: Path) -> None:
    res = run_script("clients.py", tmp_path / "clients.json", "--quick")
    assert sorted(res["counts"], key=int) == ["100", "1000"]
    for row in res["counts"].values():
        assert positive(row["peak_rss_mib"]) and row["startup_s"] >= 0 and positive(row["round_s"])
        assert positive(row["trace_mib"])
    # 900 more virtual clients must not cost anything like a model each (tiny_cnn alone is ~40 KiB).
    assert res["counts"]["1000"]["rss_kib_per_extra_client"] < 40


def test_peers_quick_runs_fedemu_and_the_bare_loop(tmp_path: Path) -> None:
    res = run_script("peers.py", tmp_path / "peers.json", "--quick")
    sides = res["sides"]
    assert set(sides) == {"fedemu", "bare"}  # the peers are opt-in (--peers)
    for row in sides.values():
        assert positive(row["run_s"]) and positive(row["process_s"]) and row["process_s"] >= row["run_s"]
        assert positive(row["peak_rss_mib"]) and row["rounds_evaluated"] == 3
    assert sides["bare"]["ratio_vs_bare"] == pytest.approx(1.0)
    assert sides["fedemu"]["final_accuracy"] == pytest.approx(sides["bare"]["final_accuracy"], abs=1e-4)


def test_peers_rejects_unknown_peer(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--peers", "flwr", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown" in done.stderr


def test_peers_process_tree_memory_counts_children() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from peers import _tree_rss_bytes
    finally:
        sys.path.remove(str(BENCH))
    alone = _tree_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        for _ in range(100):  # until the child has touched its 64 MiB
            with_child = _tree_rss_bytes(os.getpid())
            if with_child - alone > 48 << 20:
                break
            subprocess.run(["sleep", "0.05"])
        assert alone > 0
        assert with_child - alone > 48 << 20
    finally:
        child.kill()
        child.wait()


def test_rl_weighting_quick_compares_the_three_arms(tmp_path: Path) -> None:
    res = run_script("rl_weighting.py", tmp_path / "rl.json", "--quick", "--runs-dir", str(tmp_path / "runs"))
    assert res["test_seeds"] == [0, 1] and len(res["train_seeds"]) == 2
    assert [row["seed"] for row in res["per_seed"]] == [0, 1]
    for row in res["per_seed"]:
        for arm in ("data", "rl-offline", "rl-online"):
            fig = row[arm]
            assert 0.0 <= fig["final_accuracy"] <= 1.0
            assert fig["decisions"] == len(fig["blocks"]) == 2  # --quick: stitch.depth = 2
            assert -1 <= fig["diverges_at"] < 2
        assert row["data"]["diverges_at"] == -1
        if row["rl-offline"]["diverges_at"] == -1:  # same blocks, same clients: the same model
            assert row["rl-offline"]["final_accuracy"] == row["data"]["final_accuracy"]
    assert res["replay_held_out"]["steps"] == sum(row["data"]["decisions"] for row in res["per_seed"])
    diff = res["vs_data"]["rl-offline"]
    assert diff["wins"] + diff["ties"] + diff["losses"] == 2
