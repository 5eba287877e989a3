"""The MPI Comm under real ranks (run by `mpiexec -n 1` and `mpiexec -n 4`).

Every rank runs every test; results are gathered so all ranks assert on the same values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emulator import comm as comm_module
from emulator.comm import MPIComm
from emulator.records import CLIENT_ROUND_DTYPE

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def comm() -> MPIComm:
    return MPIComm()


def test_pickled_bcast_and_gather(comm: MPIComm) -> None:
    plan = {"round": 3, "clients": np.arange(5)} if comm.rank == 0 else None
    got = comm.bcast(plan)
    assert got["round"] == 3 and got["clients"].tolist() == [0, 1, 2, 3, 4]
    ranks = comm.gather(comm.rank)
    if comm.rank == 0:
        assert ranks == list(range(comm.size))
    else:
        assert ranks is None


def test_buffer_bcast(comm: MPIComm) -> None:
    buf = np.arange(1000, dtype=np.float32) if comm.rank == 0 else np.zeros(1000, np.float32)
    comm.Bcast(buf)
    assert np.array_equal(buf, np.arange(1000, dtype=np.float32))


def test_chunked_transfers(comm: MPIComm, monkeypatch: pytest.MonkeyPatch) -> None:
    # Force many chunks to exercise the >2 GiB path on small arrays.
    monkeypatch.setattr(comm_module, "CHUNK_BYTES", 64)
    buf = np.linspace(0, 1, 301, dtype=np.float32) if comm.rank == 0 else np.zeros(301, np.float32)
    comm.Bcast(buf)
    assert np.array_equal(buf, np.linspace(0, 1, 301, dtype=np.float32))
    send = np.full(157, comm.rank + 1, dtype=np.float64)
    recv = np.zeros(157) if comm.rank == 0 else None
    comm.Reduce(send, recv)
    total = comm.bcast(recv)
    assert np.all(total == comm.size * (comm.size + 1) / 2)


def test_reduce_sums_float64_on_root_only(comm: MPIComm) -> None:
    send = np.arange(10, dtype=np.float64) * (comm.rank + 1)
    recv = np.empty(10) if comm.rank == 0 else None
    comm.Reduce(send, recv)
    total = comm.bcast(recv)  # every rank checks the root's result
    assert np.allclose(total, np.arange(10) * sum(r + 1 for r in range(comm.size)))


def test_gatherv_structured_records_in_rank_order(comm: MPIComm) -> None:
    mine = np.zeros(comm.rank + 1 if comm.rank % 2 == 0 else 0, dtype=CLIENT_ROUND_DTYPE)
    mine["rank"] = comm.rank
    mine["client"] = comm.rank * 100 + np.arange(len(mine))
    mine["train_loss"] = 0.5 * comm.rank
    counts = [r + 1 if r % 2 == 0 else 0 for r in range(comm.size)]
    out = np.empty(sum(counts), dtype=CLIENT_ROUND_DTYPE) if comm.rank == 0 else None
    comm.Gatherv(mine, out, counts if comm.rank == 0 else None)
    out = comm.bcast(out)
    expected = [r * 100 + i for r in range(comm.size) for i in range(counts[r])]
    assert out["client"].tolist() == expected
    assert np.allclose(out["train_loss"], 0.5 * out["rank"])


@dataclasses.dataclass(frozen=True)
class _Shared:
    name: str
    images: np.ndarray
    labels: np.ndarray


def test_node_share_builds_once_and_maps_the_same_memory(comm: MPIComm) -> None:
    calls = []

    def make() -> _Shared:
        calls.append(1)
        return _Shared("d", np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([3, 1], np.int64))

    data = comm.node_share(make)
    assert data.name == "d"
    assert np.array_equal(data.images, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    assert data.labels.tolist() == [3, 1]
    assert not data.images.flags.writeable
    built = comm.gather(len(calls))
    if comm.rank == 0:
        assert sum(built) == 1  # one node here: only its leader built the dataset
    assert len(calls) == (1 if comm.node_rank == 0 else 0)


def test_hosts_and_library(comm: MPIComm) -> None:
    assert len(comm.hosts()) >= 1
    assert "MPI" in comm.library() or "mpich" in comm.library().lower()
