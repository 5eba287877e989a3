"""Does FedStitch's RL client weighting beat data-size weighting on a strongly non-IID split?

Issue 6's question, answered with real runs of ``fedemu run`` (in-process, one rank):

1. *Training traces*: FedStitch with data-size weights (``stitch.weighting = "data"``) on
   ``--train-seeds`` seeds (1000, 1001, ...: other partitions, other cohorts).
2. *Offline training*: ``fedemu rl train`` on those traces (the replay env; ``--agent``).
3. *Held-out seeds* (0, 1, ...): each run three ways on the same partition, cohorts and devices:
   ``data`` (the "without RL" ablation), ``rl-offline`` (the trained policy, frozen:
   ``stitch.policy=P rl.train=false``) and ``rl-online`` (the live default without a policy file: a
   fresh policy that learns during its one episode).

Prints per-seed final test accuracies, the paired differences (mean, standard error, wins / ties /
losses) and on how many seeds each arm stitched other blocks than data-size weights (and from which
step); the replay estimate of the trained policy on the held-out data traces, and the headroom (the
best recorded candidate at every step), beside it. Writes JSON.

The task is the quickstart's (digits, 50 clients, 10 per round, uniform device mix) at
``data.partition.alpha`` = ``--alpha`` (0.1), with ``stitch.order = "any"`` and ``stitch.min_gain = -1``
so that every run makes ``stitch.depth`` decisions among several candidates (at alpha 0.1 with the
defaults the run stops after one block and the weighting has almost nothing to decide).

    .venv/bin/python benchmarks/rl_weighting.py [--train-seeds 16] [--test-seeds 8] [--agent reinforce]
        [--set KEY=VALUE ...] [--quick] [--out benchmarks/results/rl_weighting.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.cli import main as fedemu  # noqa: E402
from emulator.trace import open_trace  # noqa: E402

CONFIG = ROOT / "examples" / "quickstart.toml"
TASK = ["stitch.order=any", "stitch.min_gain=-1", "runtime.progress=none", "output.overwrite=true"]
ARMS = ("data", "rl-offline", "rl-online")


def call(args: list[str], log: Path) -> str:
    """``fedemu ARGS`` in this process, its output appended to ``log``; exits on failure."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = fedemu(args)
    text = out.getvalue()
    with log.open("a") as f:
        f.write(f"$ fedemu {' '.join(args)}\n{text}\n")
    if code != 0:
        raise SystemExit(f"fedemu {' '.join(args[:2])} failed ({code}): {text.strip().splitlines()[-1:]}")
    return text


def run_stitch(folder: Path, name: str, seed: int, sets: list[str], arm: list[str], log: Path) -> Path:
    trace = folder / f"{name}.h5"
    args = ["run", str(CONFIG)]
    for s in [*TASK, *sets, f"seed={seed}", f"name={name}", f"output.trace={trace}", *arm]:
        args += ["--set", s]
    call(args, log)
    return trace


def figures(trace: Path) -> dict[str, object]:
    """Final test accuracy, the chosen blocks and the final prefix's proxy."""
    with open_trace(trace) as f:
        rounds = f["rounds/table"][:]
        steps = f["stitch/steps"][:]
    acc = rounds["test_accuracy"]
    decided = steps[(steps["kind"] != b"head") & (steps["chosen"] >= 0)]
    return {
        "final_accuracy": float(acc[np.isfinite(acc)][-1]),
        "blocks": [b.decode() for b in decided["chosen_block"]],
        "decisions": len(decided),
        "final_proxy": float(decided["proxy_after"][-1]) if len(decided) else math.nan,
    }


def divergence(blocks: list[str], data: list[str]) -> int:
    """The first step whose block differs from the data-size run of the same seed (-1: none).

    Weights act twice per step: on the choice, and on the search-space optimizer's ranking of the
    source models (which it prunes), so a run can diverge through a step whose choice agreed.
    """
    for k, (a, b) in enumerate(zip(blocks, data, strict=False)):
        if a != b:
            return k
    return -1 if len(blocks) == len(data) else min(len(blocks), len(data))


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    d = np.asarray(a) - np.asarray(b)
    return {
        "mean_diff": float(d.mean()),
        "stderr": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan,
        "wins": int((d > 1e-9).sum()), "ties": int((np.abs(d) <= 1e-9).sum()), "losses": int((d < -1e-9).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seeds", type=int, default=16, help="data-weighted runs the policy trains on")
    parser.add_argument("--test-seeds", type=int, default=8, help="held-out seeds, each run by every arm")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label split")
    parser.add_argument("--agent", choices=("reinforce", "ppo"), default="reinforce")
    parser.add_argument("--episodes", type=int, default=400, help="offline training episodes")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run, e.g. --set stitch.depth=3")
    parser.add_argument("--pool", type=Path, default=None,
                        help="block pool (default: the quickstart's, data/pools/quickstart from `make pool`)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 + 2 seeds, 2 blocks, 10 episodes, a random-init pool unless --pool")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench-rl-weighting")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl_weighting.json")
    args = parser.parse_args()
    if args.quick:
        args.train_seeds, args.test_seeds, args.episodes = 2, 2, 10
        args.sets = ["stitch.depth=2", "stitch.head_rounds=1", *args.sets]
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    pool = args.pool
    if pool is None and args.quick:
        from pools import build_pool

        pool = args.runs_dir / "random-pool"
        build_pool(pool, models=["test_resnet", "test_efficientnet", "test_convnext"], pretrained="none",
                   input_size=32, overwrite=True)
    pool = pool or ROOT / "data" / "pools" / "quickstart"
    if not (pool / "manifest.json").is_file():
        parser.error(f"--pool {pool}: no block pool there; build the quickstart's with `make pool`")
    sets = [f"data.partition.alpha={args.alpha}", f"pool.path={pool}", *args.sets]
    log = args.runs_dir / "log.txt"
    log.write_text("")
    started = time.perf_counter()

    train = [run_stitch(args.runs_dir, f"train-data-seed{1000 + i}", 1000 + i, sets, ["stitch.weighting=data"], log)
             for i in range(args.train_seeds)]
    print(f"{len(train)} training runs (data-size weights) in {time.perf_counter() - started:.0f} s", flush=True)
    policy = args.runs_dir / f"policy-{args.agent}.safetensors"
    t0 = time.perf_counter()
    text = call(["rl", "train", "--traces", *map(str, train), "--agent", args.agent, "--episodes",
                 str(args.episodes), "--progress", "none", "--out", str(policy)], log)
    train_s = time.perf_counter() - t0
    train_line = next((ln for ln in text.splitlines() if ln.startswith("trained policy")), "")
    print(f"rl train ({args.agent}, {args.episodes} episodes) in {train_s:.0f} s: {train_line}", flush=True)

    arms = {"data": ["stitch.weighting=data"],
            "rl-offline": ["stitch.weighting=rl", f"stitch.policy={policy}", "rl.train=false"],
            "rl-online": ["stitch.weighting=rl", "rl.train=true"]}
    per_seed: list[dict[str, object]] = []
    for seed in range(args.test_seeds):
        row: dict[str, object] = {"seed": seed}
        for arm, extra in arms.items():
            row[arm] = figures(run_stitch(args.runs_dir, f"test-{arm}-seed{seed}", seed, sets, extra, log))
            row[arm]["diverges_at"] = divergence(row[arm]["blocks"], row["data"]["blocks"])  # type: ignore[index]
        per_seed.append(row)
        accs = "  ".join(f"{arm} {row[arm]['final_accuracy']:.4f}" for arm in ARMS)  # type: ignore[index]
        print(f"seed {seed}: {accs}", flush=True)

    # The trained policy replayed on the held-out data-weighted traces (offline estimate, proxy gains).
    from rl_agent.env import ReplayStitchEnv
    from rl_agent.policy import ReinforcePolicy
    from rl_agent.train import evaluate

    trained = ReinforcePolicy.load(policy)
    held_out = [args.runs_dir / f"test-data-seed{s}.h5" for s in range(args.test_seeds)]
    env = ReplayStitchEnv(held_out)
    replay = evaluate(env, lambda obs: trained.act(obs, explore=False))
    # The headroom: the proxy gain of the best recorded candidate at every step (no weighting can beat it).
    oracle = float(np.mean([np.nanmax(step.candidate_proxy) - step.proxy_before
                            for episode in env.episodes for step in episode]))

    acc = {arm: [float(r[arm]["final_accuracy"]) for r in per_seed] for arm in ARMS}  # type: ignore[index]
    summary = {arm: {"mean_accuracy": float(np.mean(acc[arm])), "std": float(np.std(acc[arm], ddof=1))
                     if len(acc[arm]) > 1 else math.nan,
                     "seeds_diverged": int(sum(r[arm]["diverges_at"] >= 0 for r in per_seed))}  # type: ignore[index]
               for arm in ARMS}
    vs_data = {arm: paired(acc[arm], acc["data"]) for arm in ARMS[1:]}

    print(f"\nFedStitch at alpha = {args.alpha}: final test accuracy over {args.test_seeds} held-out seeds "
          f"(policy trained offline on {args.train_seeds} other seeds)")
    print(f"{'seed':>5}" + "".join(f"{arm:>12}" for arm in ARMS))
    for r in per_seed:
        print(f"{r['seed']:>5}" + "".join(f"{r[arm]['final_accuracy']:>12.4f}" for arm in ARMS))  # type: ignore[index]
    print(f"{'mean':>5}" + "".join(f"{summary[arm]['mean_accuracy']:>12.4f}" for arm in ARMS))
    print(f"{'diff':>5}" + f"{'':>12}" + "".join(
        f"{vs_data[a]['mean_diff']:>+8.4f}±{vs_data[a]['stderr']:.3f}" for a in ARMS[1:]))
    for arm in ARMS[1:]:
        v, s = vs_data[arm], summary[arm]
        steps = [r[arm]["diverges_at"] for r in per_seed if r[arm]["diverges_at"] >= 0]  # type: ignore[index]
        print(f"{arm}: {v['wins']} wins, {v['ties']} ties, {v['losses']} losses vs data; stitched other blocks than "
              f"the data-size run on {s['seeds_diverged']} of {len(per_seed)} seeds (from step {steps})")
    print(f"replay on the held-out data traces: mean proxy gain per step {replay.mean_reward:.5f} (policy) vs "
          f"{replay.data_reward:.5f} (data-size), same choice on {100 * replay.agreement:.0f}% of "
          f"{replay.steps} steps; best candidate every step (the headroom) {oracle:.5f}")

    out = {
        "machine": platform.platform(), "config": str(CONFIG.relative_to(ROOT)), "overrides": [*TASK, *sets],
        "alpha": args.alpha, "agent": args.agent, "episodes": args.episodes,
        "train_seeds": list(range(1000, 1000 + args.train_seeds)), "test_seeds": list(range(args.test_seeds)),
        "train_s": train_s, "train_report": train_line, "per_seed": per_seed, "summary": summary,
        "vs_data": vs_data, "replay_held_out": {"mean_reward": replay.mean_reward, "data_reward": replay.data_reward,
                                                "agreement": replay.agreement, "steps": replay.steps,
                                                "oracle_reward": oracle},
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
