"""``fedemu`` / ``python -m emulator``: run and validate emulations.

``fedemu run CONFIG --ranks N`` re-launches itself under ``mpiexec -n N python -m mpi4py``;
inside a launcher (or with N = 1) it runs on the ranks it has.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emulator.errors import UserError
from pools.errors import PoolError
from rl_agent import commands as rl_commands
from slurm import commands as slurm_commands

if TYPE_CHECKING:
    from emulator.config import Config
    from emulator.roles.server import RunSummary

EXAMPLE = "examples/quickstart.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedemu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="TOML config file (default: the embedded defaults)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set rounds=5 --set data.partition.alpha=0.1",
        )

    run = sub.add_parser("run", help="run an emulation and print its summary")
    config_args(run)
    run.add_argument("--ranks", type=int, default=None, help="MPI ranks to launch (rank 0 is the server)")
    run.add_argument(
        "--resume", metavar="RUN", default=None,
        help="continue a stopped or killed run from its newest checkpoint: its trace (.h5), its .ckpt folder or "
             "its run folder. CONFIG may be left out (the run's own is used); --set may change rounds, output.*, "
             "runtime.* and checkpoint.*, nothing that changes what is computed",
    )
    validate = sub.add_parser("validate", help="check a config (and its data files) without running it")
    config_args(validate)
    pools = sub.add_parser("pools", help="pre-trained block pools: build, pretrain, show, probe")
    pools_sub = pools.add_subparsers(dest="pools_command", required=True)
    for name, text in (
        ("build", "cut the config's [pool] models (timm weights) into a pool"),
        ("pretrain", "train the [pool] models on [pool.pretrain]'s dataset, then cut them into a pool"),
        ("probe", "linear-probe accuracy on [data] of the pool's blocks vs the same blocks untrained"),
    ):
        config_args(pools_sub.add_parser(name, help=text))
    pools_sub.add_parser("show", help="list a pool's blocks and which can be stitched").add_argument("path")
    report = sub.add_parser("report", help="write report.md + index.html (tables and plots) for traces")
    report.add_argument("traces", nargs="+", help="one or more trace files (.h5)")
    report.add_argument("-o", "--out", required=True, help="output folder")
    report.add_argument("--target-accuracy", type=float, default=None, help="for rounds/time to target")
    watch = sub.add_parser("watch", help="print the latest round of a running emulation every few seconds")
    watch.add_argument("trace")
    watch.add_argument("--interval", type=float, default=5.0, help="seconds between looks")
    compare = sub.add_parser("compare", help="runs side by side: accuracy, memory, energy, time, traffic")
    compare.add_argument("traces", nargs="+", help="trace files (.h5); the first is the reference")
    reproduce = sub.add_parser("reproduce", help="the seed papers' headline claims beside this emulator's")
    reproduce.add_argument("suite_dir", help="folder of traces from examples/paper-suite/")
    devices = sub.add_parser("devices", help="print the device catalogue")
    devices.add_argument("--catalogue", default="builtin", help="'builtin' or a catalogue TOML file")
    devices.add_argument("--extra", action="append", default=[], help="a TOML file of more devices")
    slurm_commands.add_parser(sub)
    rl_commands.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "devices":
            return _devices(args)
        if args.command == "pools":
            return _pools(args)
        if args.command in ("report", "watch", "reproduce", "compare"):
            return _analysis(args)
        if args.command == "slurm":
            return slurm_commands.main(args)
        if args.command == "rl":
            return rl_commands.main(args)
        return _run(args)
    except UserError as err:
        _error(str(err))
        return UserError.EXIT_CODE
    except PoolError as err:
        _error(str(err))
        return PoolError.EXIT_CODE
    except Exception as err:
        from emulator.comm import RankFailedError

        if not isinstance(err, RankFailedError):
            raise
        # The failing rank printed its own traceback; rank 0's would only show where it was waiting.
        _error(f"{err} (recorded in the trace's /events)")
        return 1


def _error(message: str) -> None:
    # Under MPI every rank sees the same bad input; one line from rank 0 is enough.
    if os.environ.get("PMI_RANK", "0") in ("0", "") and os.environ.get("OMPI_COMM_WORLD_RANK", "0") == "0":
        print(f"fedemu: error: {message}", file=sys.stderr, flush=True)


def _load_checked(args: argparse.Namespace) -> Config:
    """The validated config, its data files checked: all before MPI starts or a file is written."""
    from emulator.config import load_config
    from emulator.data import check_dataset
    from emulator.devices import check_devices

    cfg = load_config(args.config, args.overrides)
    check_dataset(cfg.data.dataset, root=Path(cfg.data.root))
    check_devices(cfg)
    trace = Path(cfg.output.trace) if cfg.output.trace else None
    if trace is not None and trace.exists() and not cfg.output.overwrite:
        raise UserError(
            f"trace file {trace} already exists; pass --set output.overwrite=true or choose another output.trace"
        )
    return cfg


def _analysis(args: argparse.Namespace) -> int:
    # The CLI is where the runtime and the offline analysis meet; analysis never imports emulator.
    from analysis.read import TraceError

    try:
        if args.command == "report":
            from analysis.report import write_report

            md, html = write_report([Path(t) for t in args.traces], Path(args.out),
                                    target_accuracy=args.target_accuracy)
            print(f"wrote {md} and {html}")
        elif args.command == "watch":
            from analysis.watch import watch

            if args.interval <= 0:
                raise UserError(f"--interval = {args.interval}: must be > 0")
            return watch(Path(args.trace), interval_s=args.interval)
        elif args.command == "compare":
            from analysis.compare import compare_table
            from analysis.read import open_many

            print(compare_table(open_many([Path(t) for t in args.traces])).to_string())
        else:
            from analysis.reproduce import reproduce

            print(reproduce(Path(args.suite_dir)))
    except TraceError as err:
        _error(str(err))
        return 2
    return 0


def _pools(args: argparse.Namespace) -> int:
    from emulator import pool_commands

    if args.pools_command == "show":
        print(pool_commands.show(args.path))
        return 0
    from emulator.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(getattr(pool_commands, args.pools_command)(cfg))
    return 0


def _devices(args: argparse.Namespace) -> int:
    from emulator.devices.catalogue import format_table, load_catalogue

    print(format_table(load_catalogue(args.catalogue, extra=args.extra)))
    return 0


def _validate(args: argparse.Namespace) -> int:
    cfg = _load_checked(args)
    print(f"{args.config or '<defaults>'}: ok ({cfg.algorithm} on {cfg.data.dataset}, {cfg.rounds} rounds)")
    return 0


def _resume_config(args: argparse.Namespace) -> Config | None:
    """The config of a ``--resume``d run, checked against its checkpoint; None = nothing left to run."""
    import dataclasses
    import tomllib

    from emulator import checkpoint
    from emulator.config import apply_overrides, config_from_dict, load_config, to_toml
    from emulator.data import check_dataset
    from emulator.devices import check_devices
    from emulator.trace import open_trace

    trace = checkpoint.resolve_resume(Path(args.resume))
    newest = checkpoint.peek(checkpoint.checkpoint_dir(trace))
    if newest is None:
        if trace.exists():
            with open_trace(trace) as f:
                done = f["rounds/table"].shape[0]
            if done:
                raise UserError(f"--resume {args.resume}: {trace} has {done} rounds but no checkpoint in "
                                f"{checkpoint.checkpoint_dir(trace)} (checkpoint.every = 0?); run it again afresh")
        if not args.config:
            raise UserError(f"--resume {args.resume}: no checkpoint yet; give the CONFIG to start the run")
        cfg = load_config(args.config, args.overrides)  # killed before its first round ended: start over
    else:
        path, meta = newest
        saved = str(meta["config"])
        cfg = (load_config(args.config, args.overrides) if args.config
               else config_from_dict(apply_overrides(tomllib.loads(saved), args.overrides)))
        for key, old, new in checkpoint.config_differences(saved, tomllib.loads(to_toml(cfg))):
            raise UserError(f"--resume: {key} = {new!r} differs from the checkpointed run's {old!r} ({path}); "
                            "leave CONFIG out to resume with the run's own config")
        if int(meta["round"]) + 1 >= cfg.rounds:
            print(f"fedemu: {trace} already has all {cfg.rounds} rounds; raise rounds (--set rounds=N) to go on",
                  file=sys.stderr, flush=True)
            return None
    check_dataset(cfg.data.dataset, root=Path(cfg.data.root))
    check_devices(cfg)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, trace=str(trace), overwrite=True))


def _run(args: argparse.Namespace) -> int:
    from emulator.comm import launched_under_mpi, make_comm
    from emulator.stopping import EXIT_INTERRUPTED

    if args.ranks is not None and args.ranks < 1:
        raise UserError(f"--ranks = {args.ranks}: must be >= 1")
    resume = args.resume is not None
    cfg = _resume_config(args) if resume else _load_checked(args)
    if cfg is None:
        return 0
    if args.ranks and args.ranks > 1 and not launched_under_mpi():
        return _launch(args)

    from emulator.runner import run

    comm = make_comm()
    if args.ranks and args.ranks != comm.size:
        raise UserError(f"--ranks = {args.ranks} but the launcher started {comm.size} ranks")
    summary = run(cfg, comm, weighting=rl_commands.weighting_for(cfg, comm.rank), resume=resume)
    code = 0
    if summary is not None:
        print(format_summary(cfg, summary), flush=True)
        if summary.stopped_by:
            done = len(summary.rounds)
            print(f"fedemu: stopped by {summary.stopped_by} after {done} of {cfg.rounds} rounds (checkpointed); "
                  f"continue with: fedemu run --resume {summary.trace_path}", file=sys.stderr, flush=True)
            code = EXIT_INTERRUPTED
    # Every rank ends MPI here, together (MPICH's finalize waits for all): rank 0 may then exit 75
    # without `python -m mpi4py` turning that into MPI_Abort, and a launcher that kills the step
    # on a non-zero exit (srun --kill-on-bad-exit) finds the other ranks already done with MPI.
    comm.finalize()
    return code


def find_mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise UserError(
            "--ranks > 1 needs mpiexec: pip install 'fedemu[mpich]' (or load your site MPI module)"
        )
    return found


def _launch(args: argparse.Namespace) -> int:
    cmd = [find_mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m", "emulator", "run"]
    if args.config:
        cmd.append(args.config)
    for item in args.overrides:
        cmd += ["--set", item]
    if args.resume is not None:
        cmd += ["--resume", args.resume]
    # Become mpiexec rather than wait for it: a signal to this process (Ctrl-C, kill, a job
    # script's SIGUSR1) then reaches mpiexec, which passes it on to the ranks, exactly once.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def format_summary(cfg: Config, summary: RunSummary) -> str:
    """A small table: the rounds (at most 12 of them, always the last) and the totals."""
    rows = summary.rounds
    shown = list(rows)
    if len(shown) > 12:  # a long run: every k-th round and the last
        step = math.ceil(len(shown) / 11)
        shown = [*shown[::step][:11], shown[-1]]
    lines = [
        f"{'round':>6} {'ok':>4} {'oom':>4} {'late':>5} {'drop':>5} {'off':>4} {'train_loss':>11} "
        f"{'test_acc':>9} {'emulated_s':>11} {'energy_J':>10} {'wall_s':>7}"
    ]
    for r in shown:
        lines.append(
            f"{int(r['round']) + 1:>6} {int(r['num_ok']):>4} {int(r['num_oom']):>4} {int(r['num_late']):>5} "
            f"{int(r['num_dropped']):>5} {int(r['num_unavailable']):>4} {float(r['train_loss']):>11.4f} "
            f"{_accuracy(r['test_accuracy']):>9} {float(r['emulated_time_s']):>11.1f} "
            f"{float(r['energy_j']):>10.1f} {float(r['wall_time_s']):>7.2f}"
        )
    accs = [float(a) for a in rows["test_accuracy"] if not math.isnan(a)]
    down = float(rows["bytes_down"].sum()) / 1e6
    up = float(rows["bytes_up"].sum()) / 1e6
    head = (
        f"fedemu: {cfg.name}: {cfg.algorithm} on {cfg.data.dataset}, {len(rows)} rounds, "
        f"{cfg.clients_per_round} of {cfg.data.partition.num_clients} clients per round, "
        f"{summary.ranks} rank(s)"
    )
    tail = [
        f"final test accuracy {accs[-1]:.4f} (best {max(accs):.4f})" if accs else "no evaluation",
        f"emulated time {float(rows['emulated_time_s'][-1]):.1f} s, "
        f"client energy {float(rows['energy_j'].sum()):.1f} J (modelled; measured: {_measured(rows)})",
        f"wall time {summary.wall_time_s:.2f} s, trace writing {summary.trace_write_s:.3f} s; "
        f"traffic down {down:.2f} MB, up {up:.2f} MB",
        f"trace: {summary.trace_path}",
    ]
    return "\n".join([head, *lines, *tail])


def _accuracy(value: float) -> str:
    return "-" if math.isnan(value) else f"{float(value):.4f}"


def _measured(rows: np.ndarray) -> str:
    values = rows["energy_measured_j"]
    return "no meter" if not np.isfinite(values).any() else f"{float(np.nansum(values)):.1f} J"


if __name__ == "__main__":
    sys.exit(main())
