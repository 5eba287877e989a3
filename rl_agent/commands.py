"""``fedemu rl ...``: the CLI glue of the rl_agent (``emulator/cli.py`` only adds the parser and dispatches).

Kept import-light (no torch at import time): the parser is built for every ``fedemu`` call.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emulator.errors import UserError

if TYPE_CHECKING:
    from emulator.algorithms.stitch_weighting import ClientWeighting
    from emulator.config import Config


def add_parser(sub: Any) -> None:
    """Add ``rl`` (with ``train``) to the ``fedemu`` subcommands."""
    rl = sub.add_parser("rl", help="FedStitch's RL client weighting: train a policy offline from traces")
    rl_sub = rl.add_subparsers(dest="rl_command", required=True)
    train = rl_sub.add_parser(
        "train", help="train a client-weighting policy on the steps recorded in FedStitch traces",
        description="Train on a replay of the recorded stitching steps (off-policy: each step is a contextual "
                    "bandit whose reward is the recorded proxy gain of the block the weights choose). The "
                    "policy file loads into a live run with --set stitch.policy=FILE.",
    )
    train.add_argument("--traces", nargs="+", required=True, metavar="TRACE", help="FedStitch traces (.h5)")
    train.add_argument("--agent", choices=("reinforce", "ppo"), default="reinforce",
                       help="built-in REINFORCE, or stable-baselines3 PPO distilled into the same file format "
                            "(needs the 'rl' extra)")
    train.add_argument("--episodes", type=int, default=200, help="replay episodes (one episode = one trace's steps)")
    train.add_argument("--seed", type=int, default=None, help="default: the first trace's run seed")
    train.add_argument("--out", required=True, help="policy file to write (.safetensors)")
    train.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto")
    train.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override the [rl] settings read from the first trace, e.g. --set rl.lr=0.02 --set rl.hidden=64",
    )


def main(args: argparse.Namespace) -> int:
    if args.rl_command == "train":
        return train(args)
    raise UserError(f"unknown rl command {args.rl_command!r}")


def weighting_for(cfg: Config, rank: int) -> ClientWeighting | None:
    """What ``fedemu run`` passes as ``weighting=``: the RL weighting for FedStitch on rank 0, else None.

    Every rank builds it (and so reads ``stitch.policy``), so a bad policy file stops every rank with
    the same one-line error instead of leaving the others waiting for rank 0.
    """
    if cfg.algorithm != "fedstitch":
        return None
    from rl_agent.weighting import make_weighting

    weighting = make_weighting(cfg)
    return weighting if rank == 0 else None


def _trace_settings(path: Path) -> dict[str, Any]:
    """The ``seed`` and ``[rl]`` table of the resolved config stored in a trace (empty if none)."""
    from emulator.trace import open_trace

    with open_trace(path) as f:
        text = f.attrs.get("config")
    if not text:
        return {}
    try:
        values = tomllib.loads(text.decode() if isinstance(text, bytes) else str(text))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"trace {path}: its stored config is not valid TOML ({err})") from None
    return {k: values[k] for k in ("seed", "rl") if k in values}


def train(args: argparse.Namespace) -> int:
    from emulator.config import apply_overrides, config_from_dict

    if args.episodes < 1:
        raise UserError(f"--episodes = {args.episodes}: must be >= 1")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed = {args.seed}: must be >= 0")
    traces = [Path(t) for t in args.traces]
    for t in traces:
        if not t.is_file():
            raise UserError(f"trace {t} not found")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name, e.g. policy.safetensors")
    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith(("rl.", "seed"))]
    if bad:
        raise UserError(f"--set {bad[0]!r}: only [rl] keys (rl.lr, rl.hidden, ...) and seed apply to rl train")
    cfg = config_from_dict(apply_overrides(_trace_settings(traces[0]), args.overrides))
    seed = cfg.seed if args.seed is None else args.seed

    from rl_agent.env import ReplayStitchEnv
    from rl_agent.policy import ReinforcePolicy
    from rl_agent.train import distill, evaluate, train_ppo, train_reinforce

    env = ReplayStitchEnv(traces, max_clients=cfg.rl.max_clients, max_candidates=cfg.rl.max_candidates)
    print(f"rl train: {env.num_steps} recorded steps in {len(env.episodes)} episode(s) from {len(traces)} trace(s); "
          f"agent {args.agent}, {args.episodes} episodes, seed {seed}", flush=True)
    policy = ReinforcePolicy.from_config(cfg.rl, seed=seed)
    extra: dict[str, Any] = {"agent": args.agent, "episodes": args.episodes,
                             "traces": [t.name for t in traces]}
    if args.agent == "ppo":
        _, ppo_act = train_ppo(env, episodes=args.episodes, seed=seed, hidden=cfg.rl.hidden, progress=args.progress)
        ppo = evaluate(env, ppo_act)
        mse = distill(env, ppo_act, policy)
        print(f"ppo: mean reward per step {ppo.mean_reward:.5f}; distilled into the built-in network "
              f"(action mse {mse:.5f})", flush=True)
        extra.update(ppo_reward=ppo.mean_reward, distill_mse=mse)
    else:
        train_reinforce(env, policy, episodes=args.episodes, seed=seed, progress=args.progress)
    result = evaluate(env, lambda obs: policy.act(obs, explore=False))
    extra.update(mean_reward=result.mean_reward, data_reward=result.data_reward)
    policy.save(out, **extra)
    print(f"trained policy: mean reward per step {result.mean_reward:.5f} vs data-size weighting (a = 1) "
          f"{result.data_reward:.5f} over {result.steps} steps; same choice as data-size weighting on "
          f"{100 * result.agreement:.0f}% of them", flush=True)
    print(f"wrote {out} (load it with --set stitch.policy={out})", flush=True)
    return 0
