"""The issue-7 comparison: ProFL, FedPEFT and RaFFM against FedAvg on one population and dataset.

Runs the paper suite's configs (``examples/paper-suite/``) through ``fedemu run`` and, beside each, its
FedAvg / full fine-tuning twin with the same model, data, population and memory budgets (RaFFM's Small
mix at ``devices.memory_fraction = 0.0018``; synthetic 10-class 32 px images, 100 Dirichlet(0.5)
clients, 10 per round). Prints the Done-when table and writes JSON:

- ProFL (test_convnext) vs FedAvg (test_convnext): peak client memory (paper: up to -57.4%);
- FedPEFT bias tuning (test_vit) vs full fine-tuning (test_vit): bytes per round;
- RaFFM (test_vit) vs FedAvg on the full test_vit: participation and per-round time.

Figures, not a timed test; wall times on shared cores are noisy (the emulated times are not).

    .venv/bin/python benchmarks/algorithms.py [--ranks 1] [--rounds N] [--out benchmarks/results/algorithms.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import open as open_run  # noqa: E402
from analysis.summary import summarize  # noqa: E402

SUITE = ROOT / "examples" / "paper-suite"
TWIN = ["devices.memory_fraction=0.0018"]  # the suite's budgets (fedavg-small.toml itself has none)
# name -> (config file, overrides); every run uses the suite's [data] and devices.mix.
RUNS = {
    "profl": ("profl-small.toml", []),
    "fedavg-convnext": ("fedavg-small.toml", ["model.name=test_convnext", "rounds=48", *TWIN]),
    "fedpeft-bias": ("fedpeft-small.toml", []),
    "fedpeft-full": ("fedpeft-small.toml", ["fedpeft.variant=full"]),
    "raffm": ("raffm-small.toml", []),
    "fedavg-vit": ("fedavg-small.toml", ["model.name=test_vit", *TWIN]),
}


def run_one(name: str, folder: Path, ranks: int, rounds: int | None) -> tuple[Path, float]:
    config, overrides = RUNS[name]
    trace = folder / f"{name}.h5"
    sets = [*overrides, f"name={name}", f"output.trace={trace}", "output.overwrite=true", "runtime.progress=none"]
    if rounds is not None:
        sets.append(f"rounds={rounds}")
    cmd = [sys.executable, "-m", "emulator", "run", str(SUITE / config), "--ranks", str(ranks)]
    for s in sets:
        cmd += ["--set", s]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: fedemu run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return trace, time.perf_counter() - start


def figures(path: Path) -> dict[str, float]:
    run = open_run(path)
    s = summarize(run)
    cr, rounds = run.client_rounds, run.rounds
    status = cr["status_name"]
    ok = cr[status == "ok"]
    reached = cr[status != "unavailable"]
    return {
        "rounds": int(s["rounds"]),
        "final_accuracy": float(s["final_accuracy"]),
        "best_accuracy": float(s["best_accuracy"]),
        "peak_client_memory_mib": float(ok["peak_memory_bytes"].max()) / 2**20 if len(ok) else math.nan,
        "clients_ok": len(ok),
        "clients_oom": int((status == "oom").sum()),
        "clients_unavailable": int((status == "unavailable").sum()),
        # Of the sampled clients that were online, the share that trained.
        "participation": float(len(ok) / len(reached)) if len(reached) else math.nan,
        "bytes_per_round_mb": float((rounds["bytes_up"] + rounds["bytes_down"]).mean()) / 1e6,
        "upload_per_client_kb": float(ok["bytes_up"].mean()) / 1e3 if len(ok) else math.nan,
        "round_time_s": float(rounds["round_time_s"].mean()),  # emulated
        "emulated_time_s": float(s["emulated_time_s"]),
        "wall_per_round_s": float(rounds["wall_time_s"].mean()),  # real, this machine
        "energy_j": float(s["energy_j"]),
        "traffic_mb": float(s["bytes_up"] + s["bytes_down"]) / 1e6,
    }


def extra_tables(path: Path) -> dict[str, object]:
    """A few figures from the algorithms' own trace groups."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        if "profl/rounds" in f:
            t = f["profl/rounds"][:]
            out["profl_step_peak_mib"] = float(t["peak_train_bytes"].max()) / 2**20
            out["profl_steps"] = len({(s, b) for s, b in zip(t["stage"].tolist(), t["block"].tolist(),
                                                                 strict=True)})
            em = t["em"][np.isfinite(t["em"])]
            out["profl_em_range"] = [float(em.min()), float(em.max())] if em.size else []
            out["profl_em_freezes"] = int(((t["stage"] == b"grow") & (t["frozen"] == 1) & (t["below"] > 0)).sum())
        if "fedpeft/rounds" in f:
            t = f["fedpeft/rounds"][:]
            out["fedpeft_payload_bytes"] = int(t["payload_bytes"][0])
        if "raffm/clients" in f:
            t = f["raffm/clients"][:]
            ok = t[t["status"] == 0]
            sizes, counts = np.unique(np.round(ok["size_ratio"], 3), return_counts=True)
            out["raffm_size_ratios"] = {f"{s:.3f}": int(c) for s, c in zip(sizes, counts, strict=True)}
    return out


def change(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%" if old and not math.isnan(old) and not math.isnan(new) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="override every config's rounds (quick look)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-algorithms")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "algorithms.json")
    args = parser.parse_args()
    args.runs_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    for name in RUNS:
        trace, wall = run_one(name, args.runs_dir, args.ranks, args.rounds)
        results[name] = {**figures(trace), **extra_tables(trace), "command_wall_s": wall, "trace": str(trace)}
        print(f"ran {name:<16} {wall:6.1f} s  ({results[name]['rounds']} rounds)", flush=True)

    p, fc = results["profl"], results["fedavg-convnext"]
    b, full = results["fedpeft-bias"], results["fedpeft-full"]
    r, fv = results["raffm"], results["fedavg-vit"]
    rows = [
        ("ProFL vs FedAvg (test_convnext)", "peak client memory (MiB)", p["peak_client_memory_mib"],
         fc["peak_client_memory_mib"], change(p["peak_client_memory_mib"], fc["peak_client_memory_mib"]),
         "up to -57.4%"),
        ("", "participation (ok / online)", p["participation"], fc["participation"],
         change(p["participation"], fc["participation"]), ""),
        ("", "final accuracy", p["final_accuracy"], fc["final_accuracy"],
         f"{(p['final_accuracy'] - fc['final_accuracy']) * 100:+.1f} pp", "up to +82.4%"),
        ("FedPEFT bias vs full (test_vit)", "bytes per round (MB)", b["bytes_per_round_mb"], full["bytes_per_round_mb"],
         change(b["bytes_per_round_mb"], full["bytes_per_round_mb"]), "328 MB -> 0.68 MB (ViT-B): -99.8%"),
        ("", "upload per client (KB)", b["upload_per_client_kb"], full["upload_per_client_kb"],
         change(b["upload_per_client_kb"], full["upload_per_client_kb"]), ""),
        ("", "participation (ok / online)", b["participation"], full["participation"],
         change(b["participation"], full["participation"]), ""),
        ("RaFFM vs FedAvg (full test_vit)", "participation (ok / online)", r["participation"], fv["participation"],
         change(r["participation"], fv["participation"]), ""),
        ("", "emulated time per round (s)", r["round_time_s"], fv["round_time_s"],
         f"{fv['round_time_s'] / r['round_time_s']:.2f}x faster" if r["round_time_s"] else "n/a", "~2.12x faster"),
        ("", "wall time per round (s, noisy)", r["wall_per_round_s"], fv["wall_per_round_s"],
         change(r["wall_per_round_s"], fv["wall_per_round_s"]), ""),
        ("", "traffic (MB)", r["traffic_mb"], fv["traffic_mb"], change(r["traffic_mb"], fv["traffic_mb"]),
         "5.31 vs 9.52 GB"),
        ("", "final accuracy", r["final_accuracy"], fv["final_accuracy"],
         f"{(r['final_accuracy'] - fv['final_accuracy']) * 100:+.1f} pp", ""),
    ]
    print(f"\n{'comparison':<33}{'quantity':<32}{'method':>10}{'baseline':>10}{'change':>15}  paper")
    for what, qty, a, base, delta, paper in rows:
        print(f"{what:<33}{qty:<32}{a:>10.4g}{base:>10.4g}{delta:>15}  {paper}")
    print(f"\nProFL: {p['profl_steps']} steps, largest step {p['profl_step_peak_mib']:.2f} MiB, EM range "
          f"{p['profl_em_range']}, EM-rule freezes {p['profl_em_freezes']}")
    print(f"FedPEFT: payload {b['fedpeft_payload_bytes']} B per client and direction (full: "
          f"{full['fedpeft_payload_bytes']} B)")
    print(f"RaFFM: subnetwork size ratio -> ok client rounds: {r['raffm_size_ratios']}")
    out = {"ranks": args.ranks, "rounds_override": args.rounds, "machine": platform.platform(),
           "population": "devices.mix=small, devices.memory_fraction=0.0018 (Pi 4 5.9, XPS 15 6.5, Pi 5 13.3 MiB)",
           "dataset": "synthetic, 10 classes, 3x32x32, 6000 samples, 100 clients Dirichlet(0.5), 10 per round",
           "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
