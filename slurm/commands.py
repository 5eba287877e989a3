"""``fedemu slurm render|submit|sweep``: the parser and the dispatch, wired in by ``emulator/cli.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from slurm.render import DEFAULT_OUTPUT_ROOT, DEFAULT_SIGNAL_S, DEFAULT_SRUN_MPI, JobOptions, Task


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``slurm`` and its subcommands to the ``fedemu`` subparsers ``sub``."""
    slurm = sub.add_parser("slurm", help="sbatch scripts: render, submit, sweep (job arrays); requeue + resume")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    render = slurm_sub.add_parser("render", help="print the sbatch script for a config")
    submit = slurm_sub.add_parser("submit", help="render, write into the output root, sbatch; print the job id")
    sweep = slurm_sub.add_parser("sweep", help="a grid of configs from a sweep file as one job array")
    for p in (render, submit):
        p.add_argument("config", nargs="?", help="TOML config file (default: the embedded defaults)")
    sweep.add_argument("sweep", help='sweep TOML: base = "config.toml" and a [grid] of dotted keys -> lists')
    for p in (render, submit, sweep):
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key (for a sweep: applied to the base before the grid)",
        )
        _job_args(p)
    sweep.add_argument("--max-parallel", metavar="N", help="run at most N array tasks at once (#SBATCH --array=...%%N)")
    for p in (submit, sweep):
        p.add_argument("--dry-run", action="store_true", help="print the script (and task table); do not submit")
    return slurm


def _job_args(p: argparse.ArgumentParser) -> None:
    # Values stay strings here: slurm.render checks them and answers a bad one with one line, exit 2.
    p.add_argument("--nodes", metavar="N", help="nodes (default 1)")
    p.add_argument("--ntasks-per-node", metavar="K", help="MPI ranks per node (default 2; rank 0 is the server)")
    p.add_argument("--gpus-per-node", metavar="G", help="GPUs per node (ranks bind to them by node-local rank)")
    p.add_argument("--time", metavar="T", help="time limit: MINUTES, HH:MM:SS, D-HH:MM:SS, ... (default: partition's)")
    p.add_argument("--partition", metavar="P")
    p.add_argument("--account", metavar="A")
    p.add_argument("--job-name", metavar="NAME", help="default: the config's name (sweep: the sweep's name)")
    p.add_argument("--output-root", metavar="DIR",
                   help=f"where the script, Slurm's output and the run folders go (default {DEFAULT_OUTPUT_ROOT})")
    p.add_argument("--launcher", metavar="srun|mpiexec", help="how ranks start (default srun)")
    p.add_argument("--mpi", dest="srun_mpi", metavar="TYPE", help=f"srun --mpi=TYPE (default {DEFAULT_SRUN_MPI})")
    p.add_argument("--python", metavar="PATH", help=f"python on the compute nodes (default {sys.executable})")
    p.add_argument("--mpiexec", metavar="PATH", help="for --launcher mpiexec (default: beside --python, else PATH)")
    p.add_argument("--chdir", metavar="DIR", help="job working directory, for relative paths in the config (default .)")
    p.add_argument("--signal-seconds", metavar="S",
                   help=f"SIGUSR1 this long before the time limit, then requeue (default {DEFAULT_SIGNAL_S})")
    p.add_argument("--template", metavar="FILE", help="your own template (default slurm/templates/job.sh.in)")
    p.add_argument("--sbatch-option", dest="extra", action="append", default=[], metavar="OPT",
                   help="one more #SBATCH option, written --sbatch-option=--mem=8G (repeatable)")


def _options(args: argparse.Namespace, job_name: str, max_parallel: str | int | None = None) -> JobOptions:
    from slurm.render import job_options

    return job_options(
        job_name=args.job_name or job_name,
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        launcher=args.launcher,
        srun_mpi=args.srun_mpi,
        python=args.python,
        mpiexec=args.mpiexec,
        output_root=args.output_root,
        chdir=args.chdir,
        signal_s=args.signal_seconds,
        max_parallel=max_parallel,
        extra=args.extra,
    )


def main(args: argparse.Namespace) -> int:
    """Run ``fedemu slurm ...``; a UserError goes up to the CLI (one line, exit 2)."""
    from slurm.render import render

    if args.slurm_command == "sweep":
        return _sweep(args)
    from slurm.tasks import single_task

    task = single_task(args.config, args.overrides)
    opts = _options(args, task.name)
    script = render(opts, [task], template=args.template)
    if args.slurm_command == "render" or args.dry_run:
        sys.stdout.write(script)
        return 0
    return _submit(script, opts, [task], array=False)


def _sweep(args: argparse.Namespace) -> int:
    from slurm.render import render
    from slurm.sweep import load_sweep, sweep_tasks, task_table

    sweep = load_sweep(args.sweep)
    tasks = sweep_tasks(sweep, args.overrides)
    parallel = args.max_parallel if args.max_parallel is not None else sweep.max_parallel
    opts = _options(args, sweep.name or _stem_name(sweep.path), parallel)
    script = render(opts, tasks, template=args.template, array=True)
    table = task_table(tasks)
    if args.dry_run:
        sys.stdout.write(script)
        print("\n".join(f"# {line}" for line in table.splitlines()))
        return 0
    return _submit(script, opts, tasks, array=True, table=table)


def _stem_name(path: Path) -> str:
    from slurm.render import safe_name

    return safe_name(Path(path).stem)


def _submit(script: str, opts: JobOptions, tasks: Sequence[Task], *, array: bool, table: str = "") -> int:
    from slurm.submit import find_sbatch, keep_with_job_id, sbatch, write_script

    exe = find_sbatch()  # before anything is written
    path = write_script(script, opts.output_root, opts.job_name)
    job_id = sbatch(path, sbatch_exe=exe)
    path = keep_with_job_id(path, opts.job_name, job_id)
    print(job_id, flush=True)  # stdout: only the id, for JOB=$(fedemu slurm submit ...)
    root = opts.output_root
    if array:
        info = [
            f"submitted array job {job_id} ({len(tasks)} tasks); script {path}",
            f"output {root}/{opts.job_name}-{job_id}_<task>.out, run folders {root}/<name>-{job_id}_<task>/",
            table,
        ]
    else:
        info = [
            f"submitted job {job_id}; script {path}",
            f"output {root}/{opts.job_name}-{job_id}.out, run folder {root}/{tasks[0].name}-{job_id}/",
        ]
    print("\n".join(info), file=sys.stderr)
    return 0
