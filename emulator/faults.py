"""Fault injection for testing failure handling on real MPI jobs (never set in normal runs).

``FEDEMU_INJECT=KIND:RANK:ROUND`` makes rank RANK, at the start of round ROUND, either raise
(``fail``) or stop making progress (``hang``: sleep in a loop, as a deadlocked rank would).
The tests use it to show that an exception on any rank ends the job with its message in the
trace, and that the watchdog turns a hang into stack dumps and an abort.
"""

from __future__ import annotations

import os
import time

ENV = "FEDEMU_INJECT"


class InjectedFailure(RuntimeError):  # noqa: N818 - it is the failure, by design
    pass


def parse(value: str | None) -> tuple[str, int, int] | None:
    if not value:
        return None
    kind, rank, round_ = value.split(":")
    if kind not in ("fail", "hang"):
        raise ValueError(f"{ENV}={value!r}: kind must be fail or hang")
    return kind, int(rank), int(round_)


_PLAN = parse(os.environ.get(ENV))


def maybe_inject(rank: int, round_: int) -> None:
    """Called at the top of every round on every rank; does nothing unless FEDEMU_INJECT says so."""
    if _PLAN is None or _PLAN[1] != rank or _PLAN[2] != round_:
        return
    if _PLAN[0] == "fail":
        raise InjectedFailure(f"injected failure on rank {rank} in round {round_} ({ENV})")
    while True:
        time.sleep(1)
