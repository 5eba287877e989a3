"""Rank 0's progress: a tqdm bar on a terminal, one plain line per round in batch logs."""

from __future__ import annotations

import math
import sys
from typing import TextIO


class RoundProgress:
    def __init__(self, total: int, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="round", file=self.stream, dynamic_ncols=True)

    def update(self, round_: int, *, accuracy: float, train_loss: float, seconds: float) -> None:
        acc = "  n/a " if math.isnan(accuracy) else f"{accuracy:.4f}"
        if self._bar is not None:
            self._bar.set_postfix_str(f"acc={acc} loss={train_loss:.4f}", refresh=False)
            self._bar.update(1)
        elif self.mode == "lines":
            print(
                f"round {round_ + 1}/{self.total}  test_acc {acc}  train_loss {train_loss:.4f}  {seconds:.2f}s",
                file=sys.stdout,
                flush=True,
            )

    def skip(self, done: int) -> None:
        """A resumed run: ``done`` rounds were finished by an earlier start."""
        if self._bar is not None:
            self._bar.update(done)
        elif self.mode == "lines":
            print(f"resuming at round {done + 1}/{self.total}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
