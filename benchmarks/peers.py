"""The peers side by side: one FedAvg workload run by fedemu, a bare torch loop, Flower and pfl-research.

The workload is the pfl-research paper's CIFAR-10 setup scaled to a 2-core machine: fedemu's
``tiny_cnn`` (a small CNN, rebuilt layer for layer in the peers), 100 clients x 50 synthetic
CIFAR-shaped images (3x32x32, 10 classes, IID), 10 clients per round, batch 10, 1 local epoch,
plain SGD lr 0.05, 20 rounds, central test accuracy after every round, 2 torch threads, one
process doing the client work. fedemu exports the data, the shards, every round's cohort and
the initial weights to one ``.npz``, so all four train the same clients on the same data from the
same model. Each side runs in its own process; the parent samples the RSS of the whole process
tree (Ray's workers included) for the peak memory. Runs alternate (A B C D A B C D ...) and the
best wall time of each side is kept, because a shared machine is noisy.

Flower (``flwr[simulation]``) and pfl-research (``pfl``) are optional: each gets its own venv under
``--venvs`` (default ``benchmarks/.venvs``), created on first use with ``python3 -m venv`` + pip
(``torch==2.14.1 torchvision==0.29.1`` and the peer); they are never fedemu dependencies.

    .venv/bin/python benchmarks/peers.py                  # all four, 2 alternations (~4 min)
    .venv/bin/python benchmarks/peers.py --quick          # fedemu + bare loop only, 3 rounds
    .venv/bin/python benchmarks/peers.py --peers flower   # one peer
    .venv/bin/python benchmarks/peers.py --setup-only     # just create the peer venvs

Writes ``benchmarks/results/peers.json``. Re-measure on a quiet machine for final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

TORCH_PAIR = ("torch==2.14.1", "torchvision==0.29.1")
# The versions these scripts were written against (their APIs move between releases).
PEERS = {
    "flower": {"pip": ["flwr[simulation]==1.42.0"], "script": "flower_run.py"},
    "pfl": {"pip": ["pfl[pytorch]==0.6.0"], "script": "pfl_run.py"},
}
SIDES = ("fedemu", "bare", *PEERS)


def overrides(rounds: int, trace: str) -> list[str]:
    return [
        "name=peers", "data.dataset=synthetic", "data.num_samples=6250", "data.test_fraction=0.2",
        "data.num_classes=10", "data.channels=3", "data.image_size=32", "data.partition.name=iid",
        "data.partition.num_clients=100", "clients_per_round=10", f"rounds={rounds}",
        "train.local_epochs=1", "train.batch_size=10", "train.lr=0.05", "train.momentum=0",
        "model.name=tiny_cnn", "runtime.progress=none", "runtime.threads=2", "runtime.eval_batch_size=512",
        "devices.availability=false", f"output.trace={trace}", "output.overwrite=true",
    ]


# ---- the workload, exported for the peers ---------------------------------------------------------
def export_workload(rounds: int, path: Path) -> dict:
    from emulator.config import load_config
    from emulator.roles.plan import sample_cohort
    from emulator.runner import build_model, load_data, make_shards

    cfg = load_config(None, overrides(rounds, str(path.with_suffix(".h5"))))
    data = load_data(cfg)
    shards = make_shards(cfg, data.y_train)
    sizes = {len(shards.shard(c)) for c in range(shards.num_clients)}
    assert len(sizes) == 1, "the peers' export assumes equal shards (IID)"
    eligible = np.flatnonzero(shards.sizes > 0)
    cohorts = np.stack([sample_cohort(cfg.seed, r, eligible, cfg.clients_per_round) for r in range(rounds)])
    model = build_model(cfg, data)
    meta = {
        "mean": list(data.mean), "std": list(data.std), "lr": cfg.train.lr, "batch_size": cfg.train.batch_size,
        "local_epochs": cfg.train.local_epochs, "eval_batch_size": cfg.runtime.eval_batch_size,
        "threads": cfg.runtime.threads, "seed": cfg.seed, "num_classes": data.num_classes, "width": 16,
    }
    np.savez(
        path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
        shards=np.stack([shards.shard(c) for c in range(shards.num_clients)]).astype(np.int64),
        cohorts=cohorts.astype(np.int64), meta=json.dumps(meta),
        **{f"init/{k}": v.detach().numpy() for k, v in model.state_dict().items()},
    )
    return meta


# ---- one side, in its own process -------------------------------------------------------------------
def side_main(side: str, rounds: int, trace: str) -> None:
    import resource

    from overhead import bare_loop

    from emulator.comm import SingleComm
    from emulator.config import load_config
    from emulator.runner import run

    start = time.perf_counter()  # after the imports, as in the peer scripts
    cfg = load_config(None, overrides(rounds, trace))
    if side == "fedemu":
        summary = run(cfg, SingleComm())
        assert summary is not None
        accs = [float(a) for a in summary.rounds["test_accuracy"]]
    else:
        _, accs = bare_loop(cfg)
    out = {"peer": side, "run_s": time.perf_counter() - start, "accuracy": accs,
           "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("PEER_RESULT " + json.dumps(out), flush=True)


# ---- process-tree memory ------------------------------------------------------------------------------
def _tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and its descendants (Linux /proc); shared pages count per process."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        pid = int(entry)
        children.setdefault(ppid, []).append(pid)
        rss[pid] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def run_side(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run one side; its result line, its whole-process wall time and its process tree's peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, start_new_session=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_bytes(proc.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the whole session: Ray's helpers too
        out, _ = proc.communicate()
        raise RuntimeError(f"{cmd[1]} timed out after {timeout:.0f} s:\n{out[-3000:]}") from None
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    lines = [ln for ln in out.splitlines() if ln.startswith("PEER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-3000:]}")
    result = json.loads(lines[-1][len("PEER_RESULT "):])
    result.update(process_s=wall, peak_rss_mib=peak / 2**20)
    return result


# ---- peer venvs --------------------------------------------------------------------------------------------
def ensure_venv(name: str, venvs: Path) -> Path:
    """The peer's venv, created and filled on first use; a marker file says it is complete."""
    where = venvs / name
    python = where / "bin" / "python"
    marker = where / ".fedemu-ready"
    wanted = " ".join([*TORCH_PAIR, *PEERS[name]["pip"]])
    if marker.is_file() and marker.read_text() == wanted and python.is_file():
        return python
    print(f"setting up {where} ({wanted}) ...", flush=True)
    steps = [] if python.is_file() else [["python3", "-m", "venv", str(where)]]
    steps.append([str(python), "-m", "pip", "install", "-q", *TORCH_PAIR, *PEERS[name]["pip"]])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)  # pip's chatter only on failure
        if done.returncode != 0:
            raise SystemExit(f"peers: {' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    marker.write_text(wanted)
    return python


# ---- the comparison ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternations; the best wall time is kept")
    parser.add_argument("--peers", default=None,
                        help="comma list of flower,pfl, or 'none' (default: both; none with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 repeat, no peers unless --peers")
    parser.add_argument("--venvs", type=Path, default=HERE / ".venvs")
    parser.add_argument("--setup-only", action="store_true", help="create the peer venvs and stop")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per side and run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    parser.add_argument("--side", choices=("fedemu", "bare"), help=argparse.SUPPRESS)  # internal: one side
    parser.add_argument("--trace", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side_main(args.side, args.rounds, args.trace)
        return
    if args.quick:
        args.rounds, args.repeats = 3, 1
    chosen = args.peers if args.peers is not None else ("none" if args.quick else ",".join(PEERS))
    peers = [] if chosen == "none" else [p.strip() for p in chosen.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"--peers: unknown {sorted(unknown)}; choose from {sorted(PEERS)} or 'none'")
    pythons = {p: ensure_venv(p, args.venvs) for p in peers}
    if args.setup_only:
        return

    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.npz"
        export_workload(args.rounds, workload)
        env = dict(os.environ, PEER_WORKLOAD=str(workload), PYTHONPATH=str(HERE / "peer_scripts"),
                   RAY_DEDUP_LOGS="0", RAY_USAGE_STATS_ENABLED="0", FLWR_TELEMETRY_ENABLED="0")
        commands = {
            side: [sys.executable, str(Path(__file__).resolve()), "--side", side, "--rounds", str(args.rounds),
                   "--trace", str(Path(tmp) / f"{side}.h5")]
            for side in ("fedemu", "bare")
        }
        for p in peers:
            commands[p] = [str(pythons[p]), str(HERE / "peer_scripts" / PEERS[p]["script"])]
        runs: dict[str, list[dict]] = {side: [] for side in commands}
        for rep in range(args.repeats):
            for side, cmd in commands.items():
                res = run_side(cmd, env, args.timeout)
                runs[side].append(res)
                print(f"  run {rep + 1}/{args.repeats} {side:<7} {res['run_s']:7.2f} s "
                      f"(process {res['process_s']:.2f} s, peak {res['peak_rss_mib']:.0f} MiB)", flush=True)

    best = {side: min(rs, key=lambda r: r["run_s"]) for side, rs in runs.items()}
    bare = best["bare"]
    table = {}
    for side, r in best.items():
        table[side] = {
            "run_s": r["run_s"], "process_s": r["process_s"], "peak_rss_mib": r["peak_rss_mib"],
            "final_accuracy": r["accuracy"][-1] if r["accuracy"] else None, "rounds_evaluated": len(r["accuracy"]),
            "ratio_vs_bare": r["run_s"] / bare["run_s"], "ratio_vs_fedemu": r["run_s"] / best["fedemu"]["run_s"],
            "all_run_s": [x["run_s"] for x in runs[side]],
            **{k: v for k, v in r.items() if k in ("flwr", "pfl", "actors")},
        }
    result = {
        "workload": "FedAvg, tiny_cnn, 100 clients x 50 synthetic 3x32x32 images (IID, 10 classes), 10/round, "
        f"batch 10, 1 local epoch, SGD lr 0.05, {args.rounds} rounds, eval every round, 2 torch threads",
        "repeats": args.repeats, "sides": table, "machine": platform.platform(), "cpus": os.cpu_count(),
        "note": "run_s: from after the imports to the end; process_s: the whole process; peak: RSS summed "
        "over the process tree (shared pages count per process). Shared machine: re-measure quietly.",
    }
    print(f"\n{'':<8}{'run s':>8}{'process s':>11}{'peak MiB':>10}{'accuracy':>10}{'x bare':>8}{'x fedemu':>10}")
    for side, t in table.items():
        acc = f"{t['final_accuracy']:.4f}" if t["final_accuracy"] is not None else "-"
        print(f"{side:<8}{t['run_s']:>8.2f}{t['process_s']:>11.2f}{t['peak_rss_mib']:>10.0f}{acc:>10}"
              f"{t['ratio_vs_bare']:>8.2f}{t['ratio_vs_fedemu']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
