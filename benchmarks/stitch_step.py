"""Cost of one FedStitch stitching step vs step index, pool size and clients, with and without the feature cache.

Every client takes part in every step (clients_per_round = num_clients), so with the cache a client's
prefix features are always at hand and step k runs only the newly appended block: its cost should not
grow with k. Without the cache every step re-runs the whole prefix (for every candidate). Reports the
rank's wall time per step (real) and the clients' counted FLOPs per step (emulated), 1 rank, on
digits at 32 px, pools of random-init timm test models.

    .venv/bin/python benchmarks/stitch_step.py [--clients 10 20 40] [--depth 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.comm import SingleComm
from emulator.config import load_config
from emulator.runner import run
from pools import build_pool

POOLS = {
    2: ["test_resnet", "test_efficientnet"],
    3: ["test_resnet", "test_efficientnet", "test_convnext"],
}


def one(pool: Path, clients: int, depth: int, cache: bool, trace: Path) -> dict:
    cfg = load_config(None, [
        "algorithm=fedstitch", "data.dataset=digits", "data.image_size=32", f"data.partition.num_clients={clients}",
        f"clients_per_round={clients}", f"rounds={depth + 1}", f"stitch.depth={depth}", "stitch.head_rounds=1",
        "stitch.weighting=data", "stitch.search_space=false", "stitch.patience=64", "stitch.min_gain=-1",
        f"stitch.cache={str(cache).lower()}", "stitch.batch_size=64", "devices.availability=false",
        "eval_every=1000", f"pool.path={pool}", f"output.trace={trace}", "runtime.progress=none", "runtime.threads=1",
    ])
    run(cfg, SingleComm())
    with h5py.File(trace, "r") as f:
        rounds = f["rounds/table"][:]
        cr = f["client_rounds/table"][:]
        steps = f["stitch/steps"][:]
    step_rows = steps["kind"] == b"step"
    step_rounds = steps["round"][step_rows]
    flops = [float(cr["flops"][cr["round"] == r].sum()) for r in step_rounds]
    wall = [float(rounds["wall_time_s"][rounds["round"] == r][0]) for r in step_rounds]
    return {"wall_s": wall, "gflops": [f / 1e9 for f in flops],
            "candidates": steps["num_candidates"][step_rows].tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stitch_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedemu-stitch-bench-") as tmp:
        for models in sorted(POOLS):
            pool = Path(tmp) / f"pool{models}"
            torch.manual_seed(0)
            build_pool(pool, models=POOLS[models], input_size=32)
            for clients in args.clients:
                for cache in (True, False):
                    r = one(pool, clients, args.depth, cache, Path(tmp) / f"t{models}-{clients}-{cache}.h5")
                    results.append({"pool_models": models, "clients": clients, "cache": cache, **r})
    print(f"{'models':>6} {'clients':>7} {'cache':>5}  wall s per step k=0..                 GFLOP per step (emulated)")
    for r in results:
        wall = " ".join(f"{w:6.2f}" for w in r["wall_s"])
        gf = " ".join(f"{g:7.2f}" for g in r["gflops"])
        print(f"{r['pool_models']:>6} {r['clients']:>7} {r['cache']!s:>5}  {wall:<36} {gf}")
    # The claim: with the cache, a step's cost does not grow with k (beyond its candidates' own work).
    for r in results:
        if r["cache"] and len(r["wall_s"]) > 2:
            later = np.array(r["wall_s"][1:])
            r["late_step_spread"] = float(later.max() / later.min())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "threads": 1, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
