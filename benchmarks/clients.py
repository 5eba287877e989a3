"""Clients: memory and start-up time of one fedemu run with 1,000 / 10,000 / 100,000 registered clients.

A virtual client should cost bytes (a shard offset, a device row, a label histogram), never a
model. Each count runs in a fresh process (``runtime.threads=2``, one rank): the same synthetic
dataset (250,000 images of 1x8x8, IID) is split over N clients, 10 of them train for 2 rounds.
Reported per N: start-up (``run`` from its call to the first round's plan: data, partition,
population, trace header with the clients table), the mean round time, the process's peak RSS, and
the growth of both over the smallest N, per client.

    .venv/bin/python benchmarks/clients.py                          # 1k, 10k, 100k (~1 min)
    .venv/bin/python benchmarks/clients.py --counts 1000,1000000    # any counts
    .venv/bin/python benchmarks/clients.py --quick                  # 100 and 1,000 clients

Writes ``benchmarks/results/clients.json``. Shared machines are noisy: re-measure on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLES = 250_000


def overrides(clients: int, trace: Path) -> list[str]:
    return [
        "name=clients", "data.dataset=synthetic", f"data.num_samples={SAMPLES}", "data.test_fraction=0.02",
        "data.num_classes=10", "data.channels=1", "data.image_size=8", "data.partition.name=iid",
        f"data.partition.num_clients={clients}", "clients_per_round=10", "rounds=2", "train.batch_size=32",
        "model.name=tiny_cnn", "runtime.progress=none", "runtime.threads=2", "devices.availability=false",
        f"output.trace={trace}", "output.overwrite=true",
    ]


def one(clients: int) -> None:
    """Inside the child: one run; prints its figures as a JSON line."""
    from emulator.comm import SingleComm
    from emulator.config import load_config
    from emulator.runner import run

    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "clients.h5"
        cfg = load_config(None, overrides(clients, trace))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        summary = run(cfg, SingleComm())
        wall = time.perf_counter() - start
        assert summary is not None
        rounds = [float(x) for x in summary.rounds["wall_time_s"]]
        out = {
            "clients": clients, "wall_s": wall, "startup_s": wall - sum(rounds), "round_s": sum(rounds) / len(rounds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_imports_mib": rss0,
            "trace_mib": trace.stat().st_size / 2**20,
        }
    print("CLIENTS_RESULT " + json.dumps(out), flush=True)


def measure(clients: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(clients)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("CLIENTS_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1][len("CLIENTS_RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1000,10000,100000", help="comma list of registered-client counts")
    parser.add_argument("--repeats", type=int, default=2, help="alternations; the fastest start-up is kept")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 clients, 1 repeat")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/clients.json")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: the child
    args = parser.parse_args()
    if args.one:
        one(args.one)
        return
    if args.quick:
        args.counts, args.repeats = "100,1000", 1
    counts = [int(x) for x in args.counts.split(",") if x.strip()]
    if not counts or min(counts) < 10 or max(counts) > SAMPLES // 2:
        parser.error(f"--counts: between 10 and {SAMPLES // 2} (every client needs samples)")
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n in counts:
            runs[n].append(measure(n, args.timeout))
    best = {n: min(rs, key=lambda r: r["startup_s"]) for n, rs in runs.items()}
    first = best[counts[0]]
    print(f"{'clients':>9}{'start-up s':>12}{'round s':>9}{'peak MiB':>10}{'trace MiB':>11}"
          f"{'+ms/1k clients':>16}{'+KiB/client':>13}")
    for n, r in best.items():
        extra = n - counts[0]
        r["startup_ms_per_1k_extra"] = (r["startup_s"] - first["startup_s"]) / extra * 1e6 if extra else 0.0
        r["rss_kib_per_extra_client"] = (r["peak_rss_mib"] - first["peak_rss_mib"]) * 1024 / extra if extra else 0.0
        r["all_startup_s"] = [x["startup_s"] for x in runs[n]]
        print(f"{n:>9}{r['startup_s']:>12.2f}{r['round_s']:>9.3f}{r['peak_rss_mib']:>10.0f}{r['trace_mib']:>11.2f}"
              f"{r['startup_ms_per_1k_extra']:>16.2f}{r['rss_kib_per_extra_client']:>13.3f}")
    result = {
        "workload": f"synthetic 1x8x8, {SAMPLES} samples, IID over N clients, tiny_cnn, 10/round, 2 rounds, 1 rank",
        "repeats": args.repeats, "counts": {str(n): r for n, r in best.items()},
        "machine": platform.platform(), "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
