"""Render sbatch scripts from a template: the job options, validated, and the tasks they run.

A template is a bash script with ``@NAME@`` placeholders (autoconf style, so that ``$VAR`` and
``${VAR:-x}`` stay plain shell). The shipped one is ``slurm/templates/job.sh.in``; a user's own
template may use any of :data:`PLACEHOLDERS` and must contain ``@SBATCH@`` and ``@CONFIGS@``.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from emulator.errors import UserError

TEMPLATE = Path(__file__).resolve().parent / "templates" / "job.sh.in"
LAUNCHERS = ("srun", "mpiexec")
# Slurm's mpi plugin that pip's MPICH (and most site MPICH/Intel MPI builds) can talk to.
DEFAULT_SRUN_MPI = "pmi2"
DEFAULT_SIGNAL_S = 120
DEFAULT_OUTPUT_ROOT = "runs/slurm"
PLACEHOLDERS = {
    "VERSION": "fedemu's version",
    "RENDERED_AT": "render time (UTC)",
    "SBATCH": "the #SBATCH lines",
    "TASK_TABLE": "comment lines: array index and run name of each task",
    "TASK_RANGE": "the array indices, e.g. 0-5 (0 for a single job)",
    "OUTPUT_ROOT": "the output root, absolute and shell-quoted",
    "PYTHON": "the python that runs the emulator, shell-quoted",
    "LAUNCH": "the launcher words: srun --mpi=... or mpiexec -n ...",
    "CONFIGS": "case arms setting RUN_NAME and CONFIG_TEXT per array index",
    "GRACE_S": "seconds between passing SIGUSR1 on and sending SIGTERM (half of --signal-seconds)",
}
REQUIRED = ("SBATCH", "CONFIGS")
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9._+-]+(,[A-Za-z0-9._+-]+)*$")  # partitions may be a list
_MPI_TYPE = re.compile(r"^[a-z0-9_]+$")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
)
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_NO_LIMIT = ("infinite", "unlimited")
TIME_FORMS_TEXT = "MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or INFINITE"


@dataclasses.dataclass(frozen=True)
class Task:
    """One run of a job: its array index, run name (filesystem-safe) and resolved config as TOML."""

    index: int
    name: str
    config_toml: str
    values: Mapping[str, object] = dataclasses.field(default_factory=dict)  # swept keys -> values


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """What goes into the #SBATCH lines and the launch line. Build with :func:`job_options`."""

    job_name: str
    nodes: int
    ntasks_per_node: int
    gpus_per_node: int | None
    time: str | None
    partition: str | None
    account: str | None
    launcher: str
    srun_mpi: str
    python: str
    mpiexec: str | None
    output_root: Path
    chdir: Path
    signal_s: int
    max_parallel: int | None
    extra: tuple[str, ...] = ()


def job_options(
    *,
    job_name: str,
    nodes: str | int | None = None,
    ntasks_per_node: str | int | None = None,
    gpus_per_node: str | int | None = None,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    launcher: str | None = None,
    srun_mpi: str | None = None,
    python: str | None = None,
    mpiexec: str | None = None,
    output_root: str | Path | None = None,
    chdir: str | Path | None = None,
    signal_s: str | int | None = None,
    max_parallel: str | int | None = None,
    extra: Sequence[str] = (),
) -> JobOptions:
    """Validated job options (strings as typed on the command line); a bad value is a one-line UserError."""
    if not _SAFE_NAME.match(job_name):
        raise UserError(f"--job-name {job_name!r}: use letters, digits and . _ + - only")
    nodes_n = _positive("--nodes", nodes, 1)
    tasks_n = _positive("--ntasks-per-node", ntasks_per_node, 2)
    gpus_n = None if gpus_per_node is None else _positive("--gpus-per-node", gpus_per_node, 1)
    # INFINITE/UNLIMITED: no limit, so no requeue signal will come (the line is still harmless).
    time_s = None if time is None or time.strip().lower() in _NO_LIMIT else time_seconds(time)
    for option, value in (("--partition", partition), ("--account", account)):
        if value is not None and not _SLURM_NAME.match(value):
            raise UserError(f"{option} {value!r}: use letters, digits and . _ + - only")
    launcher = launcher or "srun"
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    srun_mpi = srun_mpi or DEFAULT_SRUN_MPI
    if not _MPI_TYPE.match(srun_mpi):
        raise UserError(f"--mpi {srun_mpi!r}: a Slurm MPI plugin name such as pmi2, pmix or none (srun --mpi=list)")
    signal_n = _positive("--signal-seconds", signal_s, DEFAULT_SIGNAL_S)
    if signal_n > 65535:  # Slurm's limit for --signal's @time
        raise UserError(f"--signal-seconds {signal_n}: must be between 1 and 65535")
    if time_s is not None and time_s <= signal_n:
        raise UserError(
            f"--time {time!r} ({time_s} s) leaves no time before the requeue signal "
            f"(--signal-seconds {signal_n}); give a longer --time or a smaller --signal-seconds"
        )
    parallel_n = None if max_parallel is None else _positive("--max-parallel", max_parallel, 1)
    py = python or sys.executable
    if not py or ("/" in py and not Path(py).exists()):
        raise UserError(f"--python {py!r}: no such file (give a python path, or a command name found on PATH)")
    runner = _find_mpiexec(mpiexec, py) if launcher == "mpiexec" else None
    for line in extra:
        if not line.startswith("-") or "\n" in line or "\r" in line:
            raise UserError(f"--sbatch-option {line!r}: one sbatch option such as --mem=8G or --constraint=a100")
    return JobOptions(
        job_name=job_name,
        nodes=nodes_n,
        ntasks_per_node=tasks_n,
        gpus_per_node=gpus_n,
        time=time,
        partition=partition,
        account=account,
        launcher=launcher,
        srun_mpi=srun_mpi,
        python=py,
        mpiexec=runner,
        output_root=Path(output_root or DEFAULT_OUTPUT_ROOT).expanduser().resolve(),
        chdir=Path(chdir).expanduser().resolve() if chdir is not None else Path.cwd(),
        signal_s=signal_n,
        max_parallel=parallel_n,
        extra=tuple(extra),
    )


def _find_mpiexec(given: str | None, python: str) -> str:
    """``given``, else the mpiexec beside ``python`` (pip's MPICH), else the one on PATH."""
    if given:
        if "/" in given and not Path(given).exists():
            raise UserError(f"--mpiexec {given!r}: no such file")
        return given
    beside = Path(python).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise UserError(f"--launcher mpiexec: no mpiexec beside {python} or on PATH; give --mpiexec PATH")
    return found


def _positive(option: str, value: str | int | None, default: int) -> int:
    if value is None:
        return default
    text = str(value).strip()
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise UserError(f"{option} {value!r}: must be a whole number >= 1")
    return int(text)


def time_seconds(text: str) -> int:
    """Seconds of a Slurm ``--time`` value; a malformed or zero time is a UserError."""
    for pattern, units in _TIME_FORMS:
        match = pattern.match(text.strip())
        if match:
            seconds = sum(int(v) * _UNIT_S[u] for v, u in zip(match.groups(), units, strict=True))
            if seconds > 0:
                return seconds
            break
    raise UserError(f"--time {text!r}: use {TIME_FORMS_TEXT} (greater than zero)")


def safe_name(text: str) -> str:
    """``text`` with every character outside letters, digits and ``. _ + -`` replaced by ``_``."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", text).strip("._") or "run"
    return cleaned[:100]


def sbatch_lines(opts: JobOptions, *, array_size: int | None = None) -> list[str]:
    """The #SBATCH lines; partition, account, time and GPUs only when given."""
    out_name = f"{opts.job_name}-%A_%a.out" if array_size is not None else f"{opts.job_name}-%j.out"
    lines = [
        f"--job-name={opts.job_name}",
        f"--nodes={opts.nodes}",
        f"--ntasks-per-node={opts.ntasks_per_node}",
    ]
    if opts.gpus_per_node is not None:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.time is not None:
        lines.append(f"--time={opts.time}")
    if opts.partition is not None:
        lines.append(f"--partition={opts.partition}")
    if opts.account is not None:
        lines.append(f"--account={opts.account}")
    if array_size is not None:
        limit = f"%{opts.max_parallel}" if opts.max_parallel is not None else ""
        lines.append(f"--array=0-{array_size - 1}{limit}")
    lines += [
        f"--chdir={opts.chdir}",
        f"--output={opts.output_root / out_name}",
        "--open-mode=append",  # a requeued job appends to the same output file
        f"--signal=B:USR1@{opts.signal_s}",
        "--requeue",
        *opts.extra,
    ]
    for line in lines:
        if any(c.isspace() for c in line):  # sbatch cuts #SBATCH lines at whitespace
            raise UserError(f"#SBATCH {line}: paths and values in #SBATCH lines cannot contain spaces")
    return [f"#SBATCH {line}" for line in lines]


def launch_words(opts: JobOptions) -> str:
    """The launcher part of the launch command, as bash words."""
    if opts.launcher == "srun":
        # --kill-on-bad-exit: one failed rank ends the step rather than leaving the others waiting.
        return f"srun --mpi={shlex.quote(opts.srun_mpi)} --kill-on-bad-exit=1"
    nodes_tasks = opts.nodes * opts.ntasks_per_node
    return f'{shlex.quote(str(opts.mpiexec))} -n "${{SLURM_NTASKS:-{nodes_tasks}}}"'


def config_arms(tasks: Sequence[Task]) -> str:
    """``case`` arms: each sets RUN_NAME and reads the config text from a quoted here-document."""
    arms = []
    for task in tasks:
        marker = "FEDEMU_CONFIG_END"
        while marker in task.config_toml.splitlines():
            marker += "_"
        arms.append(
            f"    {task.index})\n"
            f"        RUN_NAME={shlex.quote(task.name)}\n"
            f"        IFS= read -r -d '' CONFIG_TEXT <<'{marker}' || true\n"
            f"{task.config_toml.rstrip()}\n"
            f"{marker}\n"
            f"        ;;"
        )
    return "\n".join(arms)


def read_template(path: str | Path | None) -> tuple[Path, str]:
    """The template's path and text; the shipped template when ``path`` is None."""
    file = Path(path).expanduser() if path is not None else TEMPLATE
    try:
        return file, file.read_text()
    except FileNotFoundError:
        raise UserError(f"--template {str(file)!r}: file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as err:
        raise UserError(f"--template {str(file)!r}: not a text file ({err.__class__.__name__})") from None


def fill(template: str, values: Mapping[str, str], *, source: str = "template") -> str:
    """Replace every ``@NAME@``; an unknown or missing required placeholder is a UserError."""
    found = set(_PLACEHOLDER.findall(template))
    unknown = sorted(found - set(values))
    if unknown:
        raise UserError(
            f"{source}: unknown placeholder @{unknown[0]}@; known: " + ", ".join(f"@{k}@" for k in values)
        )
    missing = [k for k in REQUIRED if k not in found]
    if missing:
        raise UserError(f"{source}: the template needs the placeholder @{missing[0]}@")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def render(
    opts: JobOptions, tasks: Sequence[Task], *, template: str | Path | None = None, array: bool | None = None
) -> str:
    """The sbatch script for ``tasks`` (one task: a plain job unless ``array``; several: a job array)."""
    from emulator import __version__

    if not tasks:
        raise UserError("nothing to run: no tasks")
    if [t.index for t in tasks] != list(range(len(tasks))):
        raise ValueError("task indices must be 0..n-1 in order")
    array = len(tasks) > 1 if array is None else array
    if len(tasks) > 1 and not array:
        raise ValueError("several tasks need a job array")
    path, text = read_template(template)
    width = max(len(str(t.index)) for t in tasks)
    values = {
        "VERSION": __version__,
        "RENDERED_AT": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "SBATCH": "\n".join(sbatch_lines(opts, array_size=len(tasks) if array else None)),
        "TASK_TABLE": "\n".join(f"#   {t.index:>{width}}  {t.name}" for t in tasks),
        "TASK_RANGE": f"0-{len(tasks) - 1}" if len(tasks) > 1 else "0",
        "OUTPUT_ROOT": shlex.quote(str(opts.output_root)),
        "PYTHON": shlex.quote(opts.python),
        "LAUNCH": launch_words(opts),
        "CONFIGS": config_arms(tasks),
        "GRACE_S": str(max(1, opts.signal_s // 2)),
    }
    return fill(text, values, source=f"template {path}")
