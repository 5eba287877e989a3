"""Scaling: fedemu's rounds per second at 1, 2, 3 and 5 ranks (rank 0 serves, the rest run clients).

The overhead benchmark's FedAvg workload (tiny_cnn, 100 Dirichlet clients, 10 per round, batch 32),
launched with ``mpiexec -n N`` and fedemu's default thread split (cores // ranks on the node, at
least 1). Rounds per second come from rank 0's per-round wall times from round 1 on (set-up and round 0's
one-off warm-up, torch's lazy imports and the first FLOP count, excluded; round 0 is reported); the
end-to-end wall time and every rank's CPU seconds are reported beside them, so a rank that burns a
core while it waits shows up as CPU time close to the wall time. Each round is also split into
"client s" (the busiest worker's summed client wall times, from the trace) and "other s" (the rest:
planning, broadcasts, reduce, evaluation, aggregation, trace), medians over rounds 1..; the split
does not depend on how noisy the machine is the way the ratios do. Runs alternate over the rank
counts (1 2 3 5 1 2 3 5 ...) and the best of each is kept.

Target (issue 9): 3 ranks (2 workers) >= 1.8x the rounds/s of 2 ranks (1 worker) on 2 cores.
The machine's own ceiling is measured beside it: the bare loop's client work (no evaluation, one
thread per process) in one worker process vs split over two, rounds 1.. (``--no-ceiling`` skips it).

    .venv/bin/python benchmarks/scaling.py                       # 1,2,3,5 ranks, 8 rounds, 2 alternations
    .venv/bin/python benchmarks/scaling.py --eval-every 8        # evaluate only at the end
    .venv/bin/python benchmarks/scaling.py --ranks 1,2,3,5,9,17  # on a cluster node
    .venv/bin/python benchmarks/scaling.py --launcher "srun --mpi=pmi2"   # under Slurm
    .venv/bin/python benchmarks/scaling.py --quick               # 1 and 2 ranks, 3 rounds (smoke test)

Writes ``benchmarks/results/scaling.json``. Shared machines are noisy: re-measure on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import ROOT, bare_split, fedemu_mpi, overrides


def round_split(res: dict) -> dict[str, float]:
    """Medians over rounds 1.. of the busiest worker's client time and of the rest of the round."""
    walls, other = np.asarray(res["round_wall_s"]), np.asarray(res["framework_s_per_round"])
    keep = slice(1, None) if len(walls) > 1 else slice(None)
    return {"client_s_per_round": float(np.median((walls - other)[keep])),
            "framework_s_per_round": float(np.median(other[keep]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,3,5", help="comma list of rank counts")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternations; the best of each is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank; 0 = fedemu's default split")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="evaluate every N rounds (rank 0's serial share of a round; 1 = the workload's)")
    parser.add_argument("--launcher", default="", help="MPI launcher (default: the venv's mpiexec)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the bare 1-vs-2-process ceiling")
    parser.add_argument("--quick", action="store_true", help="1 and 2 ranks, 3 rounds, 1 repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scaling.json")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.rounds, args.repeats = "1,2", 3, 1
    counts = [int(x) for x in args.ranks.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        parser.error("--ranks: positive integers, e.g. 1,2,3,5")
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    ceiling: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for n in counts:
                cfg = [*overrides(args.rounds, Path(tmp) / f"scaling{n}.h5", threads=args.threads),
                       f"eval_every={args.eval_every}"]
                res = fedemu_mpi(cfg, n, launcher=args.launcher)
                steady = res["round_wall_s"][1:] or res["round_wall_s"]  # round 0 carries one-off warm-up
                res["rounds_per_s"] = len(steady) / sum(steady)
                runs[n].append(res)
                print(f"  run {rep + 1}/{args.repeats} {n} ranks: {res['rounds_per_s']:.3f} rounds/s, "
                      f"wall {res['wall_s']:.2f} s", flush=True)
            if not args.no_ceiling:
                bare_args = overrides(args.rounds, Path(tmp) / "bare.h5", threads=1)
                for workers in (1, 2):
                    _, _, round_s = bare_split(bare_args, workers, evaluate=False)
                    steady = round_s[1:] or round_s
                    ceiling[workers].append(len(steady) / sum(steady))
                print(f"  run {rep + 1}/{args.repeats} bare client work: {ceiling[1][-1]:.3f} rounds/s in 1 "
                      f"process, {ceiling[2][-1]:.3f} split over 2", flush=True)
    table = {}
    for n, rs in runs.items():
        best = max(rs, key=lambda r: r["rounds_per_s"])
        table[str(n)] = {
            "workers": max(1, n - 1), "rounds_per_s": best["rounds_per_s"], "wall_s": best["wall_s"],
            "cpu_s_per_rank": best["cpu_s_per_rank"], "all_rounds_per_s": [r["rounds_per_s"] for r in rs],
            "final_accuracy": best["accuracy"][-1], "round0_s": best["round_wall_s"][0],
            **round_split(best),
        }
    base = table[str(counts[0])]["rounds_per_s"]
    print(f"\n{'ranks':>5}{'workers':>8}{'rounds/s':>10}{'speed-up':>10}{'wall s':>8}{'client s':>10}{'other s':>9}"
          "   CPU s per rank (rank 0 first)")
    for n, t in table.items():
        t["speedup_vs_first"] = t["rounds_per_s"] / base
        cpu = ", ".join(f"{c:.1f}" for c in t["cpu_s_per_rank"])
        print(f"{n:>5}{t['workers']:>8}{t['rounds_per_s']:>10.3f}{t['speedup_vs_first']:>10.2f}{t['wall_s']:>8.2f}"
              f"{t['client_s_per_round']:>10.3f}{t['framework_s_per_round']:>9.3f}   {cpu}")
    result = {
        "workload": f"FedAvg, tiny_cnn, 100 Dirichlet(0.5) clients, 10/round, batch 32, {args.rounds} rounds",
        "threads": args.threads or "cores // ranks", "eval_every": args.eval_every, "repeats": args.repeats,
        "ranks": table,
        "machine": platform.platform(), "cpus": os.cpu_count(),
    }
    if "2" in table and "3" in table:
        ratio = table["3"]["rounds_per_s"] / table["2"]["rounds_per_s"]
        result["three_vs_two"] = {"ratio": ratio, "target": 1.8}
        print(f"3 ranks / 2 ranks: {ratio:.2f}x  (target >= 1.8)")
    if ceiling[1]:
        one, two = max(ceiling[1]), max(ceiling[2])
        result["bare_ceiling"] = {"one_process_rounds_per_s": one, "two_processes_rounds_per_s": two,
                                  "ratio": two / one}
        print(f"the machine's ceiling: the bare client work split over 2 processes runs {two / one:.2f}x "
              f"its 1-process rate ({two:.3f} vs {one:.3f} rounds/s, no evaluation)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
