"""Hand a rendered script to ``sbatch --parsable`` and return the job id."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from emulator.errors import UserError


def find_sbatch() -> str:
    """sbatch's path; a one-line UserError where Slurm's client commands are not installed."""
    found = shutil.which("sbatch")
    if not found:
        raise UserError(
            f"sbatch not found on PATH: run this on a Slurm login node (PATH={os.environ.get('PATH', '')}), "
            "or use `fedemu slurm render` to get the script"
        )
    return found


def write_script(script: str, folder: Path, job_name: str) -> Path:
    """Write the script into ``folder`` (which also takes Slurm's output file) under a fresh name.

    The name is unique so that two submissions at once do not overwrite each other's script;
    :func:`keep_with_job_id` gives it its final name.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{job_name}.", suffix=".sbatch", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(script)
    except OSError as err:
        raise UserError(f"--output-root {str(folder)!r}: cannot write the script there ({err.strerror})") from None
    path = Path(name)
    path.chmod(0o755)
    return path


def sbatch(script_path: Path, *, sbatch_exe: str | None = None) -> str:
    """Submit ``script_path``; the job id. sbatch's failure is a UserError with its first stderr line."""
    exe = sbatch_exe or find_sbatch()
    try:
        done = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer within 120 s (script kept at {script_path})") from None
    except OSError as err:
        raise UserError(f"sbatch could not be started: {err}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        first = lines[0] if lines else f"exit status {done.returncode}, no message"
        raise UserError(f"sbatch failed: {first} (script kept at {script_path})")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = done.stdout.strip().split(";")[0]
    if not job_id:
        raise UserError(f"sbatch printed no job id (script kept at {script_path})")
    return job_id


def keep_with_job_id(script_path: Path, job_name: str, job_id: str) -> Path:
    """Rename the script to ``<job_name>-<job id>.sbatch``, matching the output file and run folder."""
    target = script_path.with_name(f"{job_name}-{job_id}.sbatch")
    script_path.replace(target)
    return target
