"""The round watchdog: a round that runs too long dumps every rank's stack and aborts the job.

Every rank arms it at the top of each round (``runtime.round_timeout_s``). Workers fire first
and only dump their stacks (faulthandler, every thread) to stderr; rank 0 fires a little later,
dumps its own, records a ``watchdog`` event in the trace and aborts the whole job, so a hang
ends as stack dumps and a clear event instead of a job that sits until its time limit. A
C-level ``faulthandler.dump_traceback_later`` backs this up for hangs that hold the GIL.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from collections.abc import Callable

# The Python watchdog thread needs the GIL; this much later the C-level backstop exits anyway.
BACKSTOP_S = 30.0
# Rank 0 waits this long after the workers so their dumps come out before the abort.
SERVER_LAG_S = 2.0
EXIT_TIMEOUT = 124  # as timeout(1)


class Watchdog:
    """One daemon thread per rank; ``arm(round)`` (re)starts the clock, ``disarm()`` stops it."""

    def __init__(
        self, timeout_s: float, *, rank: int, on_timeout: Callable[[int, str], None] | None = None,
        abort: Callable[[int], None],
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.on_timeout = on_timeout
        self.abort = abort
        self._lock = threading.Condition()
        self._deadline: float | None = None
        self._round = -1
        self._closed = False
        self.fired = False
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="fedemu-watchdog", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def arm(self, round_: int) -> None:
        if not self.enabled:
            return
        lag = SERVER_LAG_S if self.rank == 0 else 0.0
        with self._lock:
            self._round = round_
            self._deadline = time.monotonic() + self.timeout_s + lag
            self._lock.notify()
        faulthandler.dump_traceback_later(self.timeout_s + lag + BACKSTOP_S, exit=True)

    def disarm(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._deadline = None
            self._lock.notify()
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._closed = True
            self._deadline = None
            self._lock.notify()
        faulthandler.cancel_dump_traceback_later()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(timeout=left)
                    continue
                self._deadline = None
                round_ = self._round
                self._fire(round_)

    def _fire(self, round_: int) -> None:
        self.fired = True
        message = f"round {round_} ran longer than runtime.round_timeout_s = {self.timeout_s:g} s"
        print(f"fedemu: watchdog: rank {self.rank}: {message}; stacks of its threads:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        if self.rank != 0:
            return  # rank 0 ends the job once it has written its event
        if self.on_timeout is not None:
            try:
                self.on_timeout(round_, message)
            except Exception as err:  # the abort below must happen whatever broke
                print(f"fedemu: watchdog: could not record the event: {err}", file=sys.stderr, flush=True)
        print(f"fedemu: error: watchdog: {message}; aborting the job", file=sys.stderr, flush=True)
        self.abort(EXIT_TIMEOUT)
