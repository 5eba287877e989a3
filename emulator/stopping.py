"""Stop signals during a run: finish the round, checkpoint, exit so a scheduler can requeue.

Slurm sends SIGUSR1 before a time limit (``--signal=B:USR1@...``, passed on by the job script)
and SIGTERM on ``scancel`` or preemption; a person presses Ctrl-C. The first of these asks rank 0
to stop at the next round boundary (the round in flight finishes, is written and checkpointed);
a second one abandons the round in flight at once (the last checkpoint stays the resume point).
Workers ignore the signals: the stop reaches them through the round plan, so every rank leaves
the loop at the same round.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType, TracebackType

SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None)
# The exit status of a run stopped by a signal after its checkpoint: "try again later" (sysexits.h).
EXIT_INTERRUPTED = 75
# A signal sent to a process group reaches each rank directly and again through mpiexec/srun:
# copies this close together count as one.
DEBOUNCE_S = 1.0


class RoundAbandonedError(Exception):
    """A second stop signal on rank 0: the round in flight is given up."""


class StopSignals:
    """Context manager that turns stop signals into ``received`` (first) and :class:`RoundAbandonedError` (second)."""

    def __init__(self, *, rank: int) -> None:
        self.rank = rank
        self.received: str | None = None
        self._first = 0.0
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received = name
            self._first = now
            if self.rank == 0:
                print(f"fedemu: {name}: finishing this round, checkpointing, then stopping "
                      f"(send it again to abandon the round)", file=sys.stderr, flush=True)
            return
        if now - self._first < DEBOUNCE_S:
            return  # the same signal reaching this rank twice (from the launcher and its group)
        if self.rank == 0:
            raise RoundAbandonedError(f"{name} again: the round in flight was abandoned")

    def __enter__(self) -> StopSignals:
        # Handlers can only be installed from the main thread (tests may run runs elsewhere).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()
