"""Shared pytest setup: opt-in slow tests; tests/mpi only runs under an MPI launcher."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from emulator.comm import launched_under_mpi

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# tests/mpi runs under `mpiexec -n K python -m mpi4py -m pytest tests/mpi` (see the Makefile).
collect_ignore = [] if launched_under_mpi() else ["mpi"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run slow end-to-end tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def fedemu_env() -> dict[str, str]:
    """Environment for child processes: the repo importable, one thread each (2-core CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def mpiexec() -> str:
    return str(BIN / "mpiexec")


@pytest.fixture(scope="session")
def small_traces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real traces of small FedAvg runs on RaFFM's Small device mix (a sweep over alpha).

    Session-scoped: analysis tests share them. Run in-process (single-process Comm).
    """
    from emulator.comm import SingleComm
    from emulator.config import load_config
    from emulator.runner import run

    folder = tmp_path_factory.mktemp("traces")
    paths = []
    for alpha in (0.1, 1.0):
        path = folder / f"alpha{alpha}.h5"
        cfg = load_config(None, [
            f"name=alpha{alpha}", "data.dataset=synthetic", "data.num_samples=600", "data.num_classes=4",
            "data.image_size=16", "data.partition.num_clients=20", f"data.partition.alpha={alpha}",
            "clients_per_round=8", "rounds=4", "eval_every=2", "devices.mix=small", "deadline_s=0",
            "runtime.progress=none", "runtime.threads=1", f"output.trace={path}",
        ])
        run(cfg, SingleComm())
        paths.append(path)
    return paths
