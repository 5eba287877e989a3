"""Under mpiexec every rank runs the suite; only rank 0 reports, other ranks print failures only."""

from __future__ import annotations

import sys

import pytest


class _RankFailures:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            print(f"[rank {self.rank}] FAILED {report.nodeid} ({report.when})\n{report.longreprtext}",
                  file=sys.stderr, flush=True)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    if rank == 0:
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        config.pluginmanager.unregister(reporter)
    config.pluginmanager.register(_RankFailures(rank), "rank-failures")
