"""Progress output modes and the single-process Comm."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from emulator.comm import SingleComm
from emulator.progress import RoundProgress
from emulator.records import CLIENT_ROUND_DTYPE


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_with_the_latest_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    stream = _Tty()
    progress = RoundProgress(4, "auto", stream=stream)
    progress.update(0, accuracy=0.5, train_loss=1.0, seconds=0.1)
    progress.update(1, accuracy=0.8125, train_loss=0.5, seconds=0.1)
    progress.close()
    text = stream.getvalue()
    assert progress.mode == "bar"
    assert "2/4" in text and "acc=0.8125" in text
    assert capsys.readouterr().out == ""  # nothing on stdout: the log stays clean


def test_batch_logs_get_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    progress = RoundProgress(2, "auto", stream=io.StringIO())
    progress.update(0, accuracy=math.nan, train_loss=2.0, seconds=0.5)
    progress.update(1, accuracy=0.25, train_loss=1.5, seconds=0.5)
    lines = capsys.readouterr().out.splitlines()
    assert progress.mode == "lines"
    assert lines[0].startswith("round 1/2  test_acc   n/a")
    assert lines[1].startswith("round 2/2  test_acc 0.2500  train_loss 1.5000")


def test_progress_none_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    stream = _Tty()
    RoundProgress(2, "none", stream=stream).update(0, accuracy=0.1, train_loss=1.0, seconds=0.1)
    assert stream.getvalue() == "" and capsys.readouterr().out == ""


def test_single_comm_collectives_are_copies() -> None:
    comm = SingleComm()
    assert comm.bcast({"a": 1}) == {"a": 1}
    assert comm.gather(5) == [5]
    send = np.arange(4, dtype=np.float64)
    recv = np.zeros(4)
    comm.Reduce(send, recv)
    assert np.array_equal(recv, send)
    records = np.zeros(3, dtype=CLIENT_ROUND_DTYPE)
    records["client"] = [4, 5, 6]
    out = np.zeros(3, dtype=CLIENT_ROUND_DTYPE)
    comm.Gatherv(records, out, [3])
    assert out["client"].tolist() == [4, 5, 6]
    assert comm.node_share(lambda: 42) == 42
