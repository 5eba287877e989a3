"""Emulation overhead: fedemu vs a bare torch loop doing the identical client work (the floor).

Two comparisons, measured in one run, alternating (A B A B ...) and keeping the best of each:

* 1 rank: fedemu in one process vs a bare single-process loop (2 torch threads each).
  Target: fedemu <= 1.03x the bare loop.
* 3 ranks: ``mpiexec -n 3`` (rank 0 serves, 2 workers) vs the same bare loop split over 2 worker
  processes (``multiprocessing``, state dicts through pipes, clients split by the same
  longest-processing-time rule, the parent averages and evaluates); 1 torch thread per process.
  Target: fedemu <= 1.05x the split bare loop.

Both sides load the same data, build the same model from the same seed, train the same clients on
the same batches with the same SGD settings, average by sample count and evaluate every round;
fedemu adds its config, plan, flat buffers, records, trace, progress and the device accounting
(FLOP count, memory measurement, cost model). Timers start after the imports (and, at 3 ranks,
once every process is up) and include data loading. Prints a table, writes JSON.

    .venv/bin/python benchmarks/overhead.py                 # both, 10 rounds, 3 alternations (~4 min)
    .venv/bin/python benchmarks/overhead.py --part 1        # the 1-rank comparison only
    .venv/bin/python benchmarks/overhead.py --quick         # 2 rounds, 1 alternation (a smoke test)

The machine these figures come from matters: re-measure on a quiet one for final numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator import seeding
from emulator.comm import SingleComm
from emulator.config import Config, load_config
from emulator.roles.plan import assign_lpt, sample_cohort
from emulator.runner import build_model, load_data, make_shards, run

ROOT = Path(__file__).resolve().parents[1]


def overrides(rounds: int, trace: Path, threads: int = 2) -> list[str]:
    return [
        "name=overhead", "data.dataset=synthetic", "data.num_samples=12000", "data.num_classes=10",
        "data.channels=3", "data.image_size=32", "data.partition.name=dirichlet",
        "data.partition.num_clients=100", "data.partition.alpha=0.5", "clients_per_round=10",
        f"rounds={rounds}", "train.local_epochs=1", "train.batch_size=32", "train.lr=0.05",
        "model.name=tiny_cnn", "runtime.progress=none", f"runtime.threads={threads}",
        # Every sampled client trains, as in the bare loop (device accounting still runs).
        "devices.availability=false",
        f"output.trace={trace}", "output.overwrite=true",
    ]


def workload(rounds: int, trace: Path, threads: int = 2) -> Config:
    return load_config(None, overrides(rounds, trace, threads))


class _Bare:
    """The hand-written pieces: data, shards, model, per-batch normalisation, one client, evaluation."""

    def __init__(self, cfg: Config) -> None:
        torch.set_num_threads(cfg.runtime.threads)
        self.cfg = cfg
        self.data = data = load_data(cfg)
        self.shards = make_shards(cfg, data.y_train)
        self.model = build_model(cfg, data)
        c = data.in_chans
        self.scale = torch.tensor([1 / (255 * s) for s in data.std]).view(1, c, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(data.mean, data.std, strict=True)]).view(1, c, 1, 1)
        self.eligible = np.flatnonzero(self.shards.sizes > 0)

    def batch(self, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(x[idx]).float().mul_(self.scale).add_(self.shift), torch.from_numpy(y[idx])

    def cohort(self, r: int) -> np.ndarray:
        return sample_cohort(self.cfg.seed, r, self.eligible, self.cfg.clients_per_round)

    def train(self, global_state: dict[str, torch.Tensor], r: int, client: int) -> tuple[dict, float]:
        cfg, t, model = self.cfg, self.cfg.train, self.model
        model.load_state_dict(global_state)
        model.train()
        rng = seeding.rng(cfg.seed, seeding.STREAM_CLIENT, r, client)
        torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.STREAM_CLIENT, r, client))
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        idx = self.shards.shard(client)
        for _ in range(t.local_epochs):
            order = rng.permutation(idx)
            for s in range(0, len(order), t.batch_size):
                x, y = self.batch(self.data.x_train, self.data.y_train, order[s : s + t.batch_size])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.state_dict(), float(len(idx))

    def accuracy(self, state: dict[str, torch.Tensor]) -> float:
        model, data, bs = self.model, self.data, self.cfg.runtime.eval_batch_size
        model.load_state_dict(state)
        model.eval()
        correct = 0
        with torch.inference_mode():
            for s in range(0, len(data.y_test), bs):
                idx = np.arange(s, min(s + bs, len(data.y_test)))
                x, y = self.batch(data.x_test, data.y_test, idx)
                correct += int((model(x).argmax(1) == y).sum())
        return correct / len(data.y_test)


def _average(total: dict[str, torch.Tensor], weight: float, like: dict[str, torch.Tensor]) -> dict:
    return {k: (v / weight).to(like[k].dtype) for k, v in total.items()}


def _weighted_sum(bare: _Bare, state: dict, r: int, clients: list[int]) -> tuple[dict, float]:
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    weight = 0.0
    for client in clients:
        trained, n = bare.train(state, r, client)
        for k, v in trained.items():
            total[k] += n * v.double()
        weight += n
    return total, weight


def bare_loop(cfg: Config) -> tuple[float, list[float]]:
    """What a researcher would write by hand: one process, state dicts, no framework."""
    start = time.perf_counter()
    bare = _Bare(cfg)
    state = {k: v.clone() for k, v in bare.model.state_dict().items()}
    accs = []
    for r in range(cfg.rounds):
        total, weight = _weighted_sum(bare, state, r, bare.cohort(r).tolist())
        state = _average(total, weight, state)
        accs.append(bare.accuracy(state))
    return time.perf_counter() - start, accs


def _split_worker(args: list[str], conn: mp.connection.Connection) -> None:
    conn.send("up")  # imports done: the parent starts its clock when every worker is up
    conn.recv()
    bare = _Bare(load_config(None, args))
    while (msg := conn.recv()) is not None:
        r, clients, state = msg
        conn.send(_weighted_sum(bare, state, r, clients))


def bare_split(args: list[str], workers: int, *, evaluate: bool = True) -> tuple[float, list[float], list[float]]:
    """The bare loop split over ``workers`` processes; the parent plans, averages and evaluates.

    ``evaluate=False``: no evaluation (accuracies NaN): the client work alone, for scaling's ceiling.

    The parent waits in blocking pipe reads (no spinning), clients are split by the same
    longest-processing-time rule on sample counts that fedemu uses. Returns (wall, accuracies,
    per-round wall times).
    """
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    pipes, procs = [], []
    for _ in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_split_worker, args=(args, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for p in pipes:
        assert p.recv() == "up"
    start = time.perf_counter()
    for p in pipes:
        p.send("go")
    bare = _Bare(load_config(None, args))
    state = {k: v.clone() for k, v in bare.model.state_dict().items()}
    accs, round_s = [], []
    for r in range(bare.cfg.rounds):
        t0 = time.perf_counter()
        cohort = bare.cohort(r)
        ranks = assign_lpt(bare.shards.sizes[cohort].astype(np.float64), list(range(workers)))
        for w, p in enumerate(pipes):
            p.send((r, cohort[ranks == w].tolist(), state))
        total, weight = None, 0.0
        for p in pipes:
            part, n = p.recv()
            total = part if total is None else {k: total[k] + part[k] for k in total}
            weight += n
        state = _average(total, weight, state)
        accs.append(bare.accuracy(state) if evaluate else float("nan"))
        round_s.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    for p in pipes:
        p.send(None)
    for proc in procs:
        proc.join()
    return wall, accs, round_s


def fedemu_run(cfg: Config) -> tuple[float, float, list[float]]:
    start = time.perf_counter()
    summary = run(cfg, SingleComm())
    wall = time.perf_counter() - start
    assert summary is not None
    return wall, summary.trace_write_s, [float(a) for a in summary.rounds["test_accuracy"]]


def _mpi_side(args: list[str]) -> None:
    """Inside ``mpiexec``: time ``run`` from the moment every rank is up; rank 0 prints the result."""
    from emulator.comm import MPIComm

    comm = MPIComm()
    cfg = load_config(None, args)
    comm.barrier()
    start, cpu0 = time.perf_counter(), time.process_time()
    summary = run(cfg, comm)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    # Each rank's CPU seconds over the run (all its threads): a waiting rank should add little.
    cpus = comm.gather(cpu)
    if summary is not None:
        out = {"wall_s": wall, "trace_write_s": summary.trace_write_s, "cpu_s_per_rank": cpus,
               "framework_s_per_round": framework_share(Path(summary.trace_path)),
               "accuracy": [float(a) for a in summary.rounds["test_accuracy"]],
               "round_wall_s": [float(x) for x in summary.rounds["wall_time_s"]]}
        print("MPI_RESULT " + json.dumps(out), flush=True)


def framework_share(trace: Path) -> list[float]:
    """Per round: rank 0's round wall time minus the busiest rank's summed client wall times.

    What the round costs beyond the slowest worker's client work: planning, broadcasts, the
    reduce, evaluation, aggregation, the trace. Robust to a noisy machine, unlike wall ratios.
    """
    import h5py

    with h5py.File(trace, "r") as f:
        rounds, clients = f["rounds/table"][:], f["client_rounds/table"][:]
    out = []
    for row in rounds:
        mine = clients[(clients["round"] == row["round"]) & (clients["rank"] >= 0)]
        busiest = max((mine["wall_time_s"][mine["rank"] == k].sum() for k in np.unique(mine["rank"])), default=0.0)
        out.append(float(row["wall_time_s"]) - float(busiest))
    return out


def mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else "mpiexec"


def fedemu_mpi(args: list[str], ranks: int, timeout: float = 600, launcher: str = "") -> dict:
    """fedemu under ``launcher -n ranks`` (default: the venv's ``mpiexec``); rank 0's result."""
    cmd = [*(launcher.split() or [mpiexec()]), "-n", str(ranks), sys.executable, "-m", "mpi4py",
           str(Path(__file__).resolve()), "--mpi-side", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MPI_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(lines[-1][len("MPI_RESULT "):])


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; the best of each is kept")
    parser.add_argument("--part", choices=("1", "3", "both"), default="both",
                        help="1: one rank vs the bare loop; 3: three ranks vs the loop split over 2 processes")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 repeat: a smoke test, not a figure")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/overhead.json")
    parser.add_argument("--mpi-side", default=None, help=argparse.SUPPRESS)  # internal: under mpiexec
    args = parser.parse_args()
    if args.mpi_side is not None:
        _mpi_side(json.loads(args.mpi_side))
        return
    if args.quick:
        args.rounds, args.repeats = 2, 1
    result: dict = {
        "workload": "FedAvg, synthetic 3x32x32, 10 classes, 100 clients (Dirichlet 0.5), 10/round, "
        f"{args.rounds} rounds, tiny_cnn, 1 local epoch, batch 32, eval every round",
        "repeats": args.repeats, "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("1", "both"):
            cfg = workload(args.rounds, Path(tmp) / "overhead.h5", threads=2)
            if not args.quick:
                bare_loop(cfg)  # warm-up: first-touch allocations and kernel selection
            bare, emu, trace_s = [], [], []
            for _ in range(args.repeats):
                b, bare_acc = bare_loop(cfg)
                e, tw, emu_acc = fedemu_run(cfg)
                bare.append(b)
                emu.append(e)
                trace_s.append(tw / e)
            ratio = min(emu) / min(bare)
            result["one_rank"] = {
                "threads": 2, "bare_s": bare, "fedemu_s": emu, "ratio_best": ratio,
                "ratio_median": float(np.median(emu) / np.median(bare)), "target": 1.03,
                "trace_share": trace_s, "final_accuracy": {"bare": bare_acc[-1], "fedemu": emu_acc[-1]},
            }
            rows += [("bare loop, 1 process", bare), ("fedemu, 1 rank", emu)]
            print(f"1 rank: ratio fedemu/bare {ratio:.3f} best, {result['one_rank']['ratio_median']:.3f} median "
                  f"(target <= 1.03); trace share "
                  f"{max(trace_s) * 100:.2f}% worst; accuracy bare {bare_acc[-1]:.4f}, fedemu {emu_acc[-1]:.4f}",
                  flush=True)
        if args.part in ("3", "both"):
            margs = overrides(args.rounds, Path(tmp) / "overhead3.h5", threads=1)
            split, emu3, rounds3, split_rounds, cpus3, frames3 = [], [], [], [], [], []
            for _ in range(args.repeats):
                b, split_acc, split_r = bare_split(margs, workers=2)
                split_rounds.append(split_r)
                res = fedemu_mpi(margs, ranks=3)
                split.append(b)
                emu3.append(res["wall_s"])
                rounds3.append(res["round_wall_s"])
                cpus3.append(res["cpu_s_per_rank"])
                frames3.append(res["framework_s_per_round"])
                emu3_acc = res["accuracy"]
            ratio3 = min(emu3) / min(split)
            # Rounds 1.. (round 0 and set-up carry one-off imports): median round of all repeats.
            steady = float(np.median([x for rs in rounds3 for x in rs[1:]])
                           / np.median([x for rs in split_rounds for x in rs[1:]]))
            result["three_ranks"] = {
                "threads": 1, "bare_split_s": split, "fedemu_s": emu3, "ratio_best": ratio3,
                "ratio_median": float(np.median(emu3) / np.median(split)), "ratio_steady_round": steady,
                "target": 1.05,
                "fedemu_round_wall_s": rounds3[int(np.argmin(emu3))],
                "bare_split_round_wall_s": split_rounds[int(np.argmin(split))],
                "fedemu_cpu_s_per_rank": cpus3[int(np.argmin(emu3))],
                "fedemu_framework_s_per_round": frames3[int(np.argmin(emu3))],
                "final_accuracy": {"bare_split": split_acc[-1], "fedemu": emu3_acc[-1]},
            }
            rows += [("bare loop, 2 worker procs", split), ("fedemu, 3 ranks", emu3)]
            print(f"3 ranks: ratio fedemu/split bare {ratio3:.3f} best, {result['three_ranks']['ratio_median']:.3f} "
                  f"median, {steady:.3f} per steady round (target <= 1.05); accuracy split "
                  f"{split_acc[-1]:.4f}, fedemu {emu3_acc[-1]:.4f}", flush=True)
    print(f"\n{'':<28}{'best s':>8}   runs (s)")
    for name, xs in rows:
        print(f"{name:<28}{min(xs):>8.2f}   {_fmt(xs)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
