"""The ``Comm`` interface: an MPI implementation and a single-process one.

Bulk arrays go through buffer calls (``Bcast``, ``Reduce``, ``Gatherv``) on flat numpy
arrays; only small control messages (the round plan) are pickled. Waits poll with a
short sleep so an idle rank does not burn a core that a working rank needs when ranks
outnumber cores (``mpiexec -n 4`` on 2 cores).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

T = TypeVar("T")

# MPI counts are C ints: chunk bulk transfers well below 2**31 bytes.
CHUNK_BYTES = 1 << 30

_MPI_ENV_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
# Point-to-point tag of a worker's "I failed" note to rank 0 (no collective uses tags).
FAILURE_TAG = 7301
# How long a failed worker waits for rank 0 to record its message and end the job.
FAILURE_GRACE_S = 10.0


class RankFailedError(RuntimeError):
    """Raised on rank 0 (inside a wait) when another rank reported that it failed."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank = rank
        self.message = message


class Comm(Protocol):
    """What the server, the client groups and the algorithms may use to talk."""

    rank: int
    size: int
    node_rank: int
    node_size: int

    def bcast(self, obj: Any, root: int = 0) -> Any: ...
    def gather(self, obj: Any, root: int = 0) -> list[Any] | None: ...
    def Bcast(self, buf: np.ndarray, root: int = 0) -> None: ...
    def Reduce(self, send: np.ndarray, recv: np.ndarray | None, root: int = 0) -> None: ...
    def Gatherv(
        self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int] | None, root: int = 0
    ) -> None: ...
    def barrier(self) -> None: ...
    def node_share(self, make: Callable[[], T]) -> T: ...
    def hosts(self) -> list[str]: ...
    def library(self) -> str: ...
    def report_failure(self, message: str) -> None: ...
    def abort(self, code: int) -> None: ...
    def finalize(self) -> None: ...


def launched_under_mpi() -> bool:
    """True inside ``mpiexec``/``srun`` or ``python -m mpi4py``."""
    return "mpi4py" in sys.modules or any(v in os.environ for v in _MPI_ENV_VARS)


def make_comm() -> Comm:
    """The MPI comm when launched by an MPI launcher, else the single-process one."""
    return MPIComm() if launched_under_mpi() else SingleComm()


class SingleComm:
    """One process plays every role; collectives are copies."""

    rank = 0
    size = 1
    node_rank = 0
    node_size = 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj]

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        return None

    def Reduce(self, send: np.ndarray, recv: np.ndarray | None, root: int = 0) -> None:
        assert recv is not None
        recv[...] = send

    def Gatherv(
        self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int] | None, root: int = 0
    ) -> None:
        assert recv is not None
        recv[: len(send)] = send

    def barrier(self) -> None:
        return None

    def node_share(self, make: Callable[[], T]) -> T:
        return make()

    def hosts(self) -> list[str]:
        return [socket.gethostname()]

    def library(self) -> str:
        return "none (single process)"

    def report_failure(self, message: str) -> None:
        return None  # the one process records its own error

    def abort(self, code: int) -> None:
        sys.stderr.flush()
        os._exit(code)

    def finalize(self) -> None:
        return None


def _bytes_view(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


class MPIComm:
    """``MPI.COMM_WORLD`` behind the Comm interface, with polite (sleeping) waits."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        self._node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.node_rank = self._node.Get_rank()
        self.node_size = self._node.Get_size()
        self._windows: list[Any] = []  # shared windows must outlive the arrays viewing them

    # -- waiting -----------------------------------------------------------------
    def _wait(self, request: Any) -> None:
        # Spin briefly (collectives are usually quick), then back off to sleeping.
        deadline = time.perf_counter() + 2e-4
        while time.perf_counter() < deadline:
            if request.Test():
                return
        pause = 5e-5
        while not request.Test():
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)
            if self.rank == 0:
                self._check_failures()

    def _check_failures(self) -> None:
        """Rank 0, while it waits: a worker that failed sent a note; raise it here (then the job ends)."""
        status = self._MPI.Status()
        if self._comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=FAILURE_TAG, status=status):
            source = status.Get_source()
            message = self._comm.recv(source=source, tag=FAILURE_TAG)
            raise RankFailedError(source, str(message))

    def report_failure(self, message: str) -> None:
        """A worker that is about to fail tells rank 0 (pickled: one small message), then gives it time.

        Rank 0 records the message in the trace's ``/events`` and aborts the job; if it does not
        within ``FAILURE_GRACE_S`` (it may be hung itself), this returns and the caller's exception
        aborts the job through ``python -m mpi4py``.
        """
        if self.rank == 0:
            return
        request = self._comm.isend(message, dest=0, tag=FAILURE_TAG)
        deadline = time.monotonic() + FAILURE_GRACE_S
        while time.monotonic() < deadline:
            request.Test()
            time.sleep(0.01)

    def abort(self, code: int) -> None:
        sys.stderr.flush()
        self._comm.Abort(code)

    def finalize(self) -> None:
        """End MPI on this rank now. A rank that then exits non-zero (``python -m mpi4py`` would
        otherwise turn that into ``MPI_Abort``) ends cleanly: the launcher kills no other rank, and
        MPICH removes its shared-memory segment instead of leaving it for the next step."""
        from mpi4py import MPI

        if not MPI.Is_finalized():
            MPI.Finalize()

    # -- pickled control messages --------------------------------------------------
    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self._bcast_object(self._comm, obj, root)

    def _bcast_object(self, comm: Any, obj: Any, root: int) -> Any:
        """Pickle through two polite buffer broadcasts (length, then bytes)."""
        import pickle

        mine = comm.Get_rank() == root
        payload = np.frombuffer(pickle.dumps(obj, protocol=5), dtype=np.uint8) if mine else None
        size = np.array([payload.size if mine else 0], dtype=np.int64)
        self._wait(comm.Ibcast(size, root=root))
        if not mine:
            payload = np.empty(int(size[0]), dtype=np.uint8)
        for start in range(0, max(payload.size, 1), CHUNK_BYTES):
            self._wait(comm.Ibcast(payload[start : start + CHUNK_BYTES], root=root))
        return obj if mine else pickle.loads(payload.tobytes())

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        self._wait(self._comm.Ibarrier())
        return self._comm.gather(obj, root=root)

    # -- bulk buffers ------------------------------------------------------------------
    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        flat = _bytes_view(buf)
        if not np.shares_memory(flat, buf):
            raise ValueError("Bcast needs a C-contiguous buffer")
        for start in range(0, max(flat.size, 1), CHUNK_BYTES):
            self._wait(self._comm.Ibcast(flat[start : start + CHUNK_BYTES], root=root))

    def Reduce(self, send: np.ndarray, recv: np.ndarray | None, root: int = 0) -> None:
        """Elementwise sum into ``recv`` on ``root`` (same dtype and size as ``send``)."""
        MPI = self._MPI
        send = np.ascontiguousarray(send).reshape(-1)
        out = recv.reshape(-1) if recv is not None else None
        step = max(1, CHUNK_BYTES // send.itemsize)
        for start in range(0, max(send.size, 1), step):
            part = send[start : start + step]
            target = out[start : start + step] if out is not None else None
            self._wait(self._comm.Ireduce(part, target, op=MPI.SUM, root=root))

    def Gatherv(
        self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int] | None, root: int = 0
    ) -> None:
        """Gather ``counts[r]`` elements from each rank into ``recv`` on root, in rank order.

        Structured records travel as raw bytes, so any fixed-width dtype works.
        """
        MPI = self._MPI
        sendbytes = _bytes_view(send)
        if self.rank == root:
            assert recv is not None and counts is not None
            itemsize = recv.dtype.itemsize
            nbytes = np.asarray(counts, dtype=np.int64) * itemsize
            if nbytes.sum() >= 2**31:
                raise ValueError("Gatherv payload over 2 GiB: gather in parts")
            displs = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
            rbuf = [_bytes_view(recv), nbytes.astype(np.int32), displs.astype(np.int32), MPI.BYTE]
        else:
            rbuf = None
        self._wait(self._comm.Igatherv([sendbytes, MPI.BYTE], rbuf, root=root))

    def barrier(self) -> None:
        self._wait(self._comm.Ibarrier())

    # -- node-shared memory ------------------------------------------------------
    def node_share(self, make: Callable[[], T]) -> T:
        """Build ``make()`` once per node; its numpy-array fields live in MPI shared memory.

        ``make`` must return a dataclass. The node leader builds it and copies each array
        field into a shared window; the other ranks of the node map the same memory.
        """
        MPI = self._MPI
        leader = self.node_rank == 0
        message = None
        arrays: dict[str, np.ndarray] = {}
        if leader:
            obj = make()
            if not dataclasses.is_dataclass(obj):
                raise TypeError("node_share needs a dataclass")
            arrays = {
                f.name: getattr(obj, f.name)
                for f in dataclasses.fields(obj)
                if isinstance(getattr(obj, f.name), np.ndarray)
            }
            # Pickle only the small parts: arrays travel through shared memory instead.
            small = dataclasses.replace(obj, **{k: np.empty(0, v.dtype) for k, v in arrays.items()})
            message = (small, {k: (v.shape, v.dtype.str) for k, v in arrays.items()})
        # The others sleep-wait while the leader loads (it needs the cores).
        small, shapes = self._bcast_object(self._node, message, 0)
        shared: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in shapes.items():
            dt = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            win = MPI.Win.Allocate_shared(nbytes if leader else 0, 1, comm=self._node)
            self._windows.append(win)
            buf, _ = win.Shared_query(0)
            view = np.frombuffer(buf, dtype=np.uint8, count=nbytes).view(dt).reshape(shape)
            if leader:
                view[...] = arrays[name]
            shared[name] = view
        self._wait(self._node.Ibarrier())
        for view in shared.values():
            view.flags.writeable = False
        return dataclasses.replace(small, **shared)

    # -- facts for the trace -----------------------------------------------------
    def hosts(self) -> list[str]:
        # Collective: every rank must call it. One entry per rank, in rank order.
        return self._comm.allgather(socket.gethostname())

    def library(self) -> str:
        return self._MPI.Get_library_version().strip().splitlines()[0]
