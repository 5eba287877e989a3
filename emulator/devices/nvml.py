"""GPU energy and power measured through NVML (``pynvml`` from nvidia-ml-py), where NVML exists.

One :class:`Meter` per rank reads its bound GPU's cumulative energy counter
(``nvmlDeviceGetTotalEnergyConsumption``: millijoules since the driver was loaded; Volta and newer). An
:class:`EnergyWindow` is the counter's difference over one client's work; a :class:`PowerSampler` thread
samples power, energy, memory, utilisation and SM clock into a numpy structured array for the trace's
``/nvml`` group. Where NVML is missing (no driver, no GPU, a CPU rank) the meter's ``kind`` is ``"none"``,
every measured value is NaN, and nothing raises.

NVML counts per device, not per process: when several ranks share one GPU each window sees all of them
(:func:`shared_gpu_ranks` tells the trace which ranks share which GPU).

Counter granularity. NVML does not document how often the energy counter is refreshed. PETSc's manual
page for ``PetscLogGpuEnergyMeter`` (https://petsc.org/main/manualpages/Log/PetscLogGpuEnergyMeter) says
"for newer GPUs, energy readings are updated every 20-100ms, so this approach may be inaccurate for
short-duration GPU events"; the pynvml pull request that added the call
(https://github.com/gpuopenanalytics/pynvml/pull/18) saw it change about every 10 ms on the author's GPU.
We take the conservative end, :data:`ENERGY_UPDATE_PERIOD_S` = 0.1 s: a window shorter than that may
straddle no update at all, so its energy is reported as NaN with ``flag_short`` set, never as 0.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from emulator.records import NVML_SAMPLE_DTYPE

ENERGY_UPDATE_PERIOD_S = 0.1

# The trace's /nvml row type (defined once, in records.py).
SAMPLE_DTYPE = NVML_SAMPLE_DTYPE

NAN = float("nan")


class Meter:
    """One GPU's NVML counters, or nothing (``kind == "none"``) with the reason in ``reason``.

    ``gpu_index`` is NVML's device index (NVML enumerates in PCI order and ignores
    ``CUDA_VISIBLE_DEVICES``, so it is not the CUDA ordinal), or a UUID string such as
    ``"GPU-8f3e..."`` as :func:`emulator.devices.binding.gpu_identity` returns (preferred: no ordering
    trap). ``None`` means the rank has no GPU. Any ``pynvml.NVMLError`` while opening the device, including
    a device without an energy counter, gives ``kind = "none"``; errors of later reads are counted in
    ``errors`` and read as NaN.
    """

    def __init__(self, gpu_index: int | str | None, *, update_period_s: float = ENERGY_UPDATE_PERIOD_S) -> None:
        self.kind = "none"
        self.reason = ""
        self.gpu = -1  # NVML index of the metered device; -1 without one
        self.update_period_s = float(update_period_s)
        self.errors = 0
        self._nvml: Any = None
        self._handle: Any = None
        if gpu_index is None:
            self.reason = "no GPU bound to this rank"
            return
        try:
            import pynvml
        except ImportError as err:  # nvidia-ml-py is a dependency, but stay a meter-less rank without it
            self.reason = f"pynvml not importable: {err}"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            self.reason = f"NVML unavailable: {err}"
            return
        try:
            if isinstance(gpu_index, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(gpu_index)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu_index))
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # probe: no energy counter -> no meter
            index = pynvml.nvmlDeviceGetIndex(handle)
        except pynvml.NVMLError as err:
            self.reason = f"NVML device {gpu_index!r}: {err}"
            _shutdown(pynvml)
            return
        self._nvml = pynvml
        self._handle = handle
        self.gpu = int(index)
        self.kind = "nvml"

    def __repr__(self) -> str:
        detail = f"gpu={self.gpu}" if self.kind == "nvml" else f"reason={self.reason!r}"
        return f"Meter(kind={self.kind!r}, {detail})"

    def _read(self, call: str, *args: Any) -> Any:
        """One NVML read; ``None`` (and one more error counted) when it fails."""
        try:
            return getattr(self._nvml, call)(self._handle, *args)
        except Exception:  # an NVMLError, or anything a driver hiccup raises: never propagate
            self.errors += 1
            return None

    def energy_j(self) -> float:
        """The device's cumulative energy counter in joules; NaN without a meter or on a failed read."""
        if self.kind != "nvml":
            return NAN
        mj = self._read("nvmlDeviceGetTotalEnergyConsumption")
        return NAN if mj is None else mj / 1000.0

    def sample(self) -> tuple[float, float, int, float, float]:
        """(power W, energy J, memory used bytes, GPU utilisation %, SM clock MHz); NaN / -1 where unread."""
        if self.kind != "nvml":
            return NAN, NAN, -1, NAN, NAN
        nvml = self._nvml
        mw = self._read("nvmlDeviceGetPowerUsage")
        mem = self._read("nvmlDeviceGetMemoryInfo")
        util = self._read("nvmlDeviceGetUtilizationRates")
        clock = self._read("nvmlDeviceGetClockInfo", nvml.NVML_CLOCK_SM)
        return (
            NAN if mw is None else mw / 1000.0,
            self.energy_j(),
            -1 if mem is None else int(mem.used),
            NAN if util is None else float(util.gpu),
            NAN if clock is None else float(clock),
        )

    def window(self) -> EnergyWindow:
        return EnergyWindow(self)

    def close(self) -> None:
        """Release this meter's NVML reference (NVML counts init/shutdown pairs); it reads NaN after."""
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml = None
            self._handle = None
            self.kind = "none"
            self.reason = "closed"


def _shutdown(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:
        pass


class EnergyWindow:
    """Energy and wall time of the work inside ``with meter.window() as w:``.

    After the block: ``w.seconds`` (wall time, ``perf_counter``), ``w.energy_j`` (counter difference; NaN
    without a meter, on a failed read, when the counter went backwards, or when the window is short), and
    ``w.flag_short`` (``seconds < meter.update_period_s``: the counter may not have ticked, so the energy is
    unknown rather than 0).
    """

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.seconds = NAN
        self.energy_j = NAN
        self.flag_short = False

    def __enter__(self) -> EnergyWindow:
        self._e0 = self.meter.energy_j()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        e1 = self.meter.energy_j()
        self.flag_short = self.seconds < self.meter.update_period_s
        delta = e1 - self._e0
        self.energy_j = NAN if self.flag_short or math.isnan(delta) or delta < 0 else delta


class PowerSampler:
    """A daemon thread that samples a :class:`Meter` every ``period_s`` into a growable structured array.

    ``start()`` / ``stop()`` (joins the thread) / ``drain()`` (the rows since the last drain, in
    :data:`SAMPLE_DTYPE`). Without a meter no thread is started and ``drain()`` returns 0 rows. A failing
    read never raises in the thread: ``errors`` counts samples that could not be taken at all (the meter's
    own ``errors`` counts single failed fields, stored as NaN / -1). Sampling keeps a fixed schedule
    (``start + k * period_s``); when a sample overruns, the schedule skips ahead instead of bursting.
    """

    SAMPLE_DTYPE = SAMPLE_DTYPE

    def __init__(self, meter: Meter, *, rank: int, period_s: float = 0.1, capacity: int = 1024) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self.meter = meter
        self.rank = int(rank)
        self.period_s = float(period_s)
        self.errors = 0
        self._buf = np.zeros(max(1, capacity), dtype=SAMPLE_DTYPE)
        self._n = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.meter.kind == "none" or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"fedemu-power-sampler-rank{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def drain(self) -> np.ndarray:
        with self._lock:
            rows = self._buf[: self._n].copy()
            self._n = 0
        return rows

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._take()
            next_at += self.period_s
            now = time.monotonic()
            if next_at < now:  # overran: skip the missed slots
                next_at = now + self.period_s - (now - next_at) % self.period_s
            self._stop.wait(next_at - now)

    def _take(self) -> None:
        try:
            stamp = time.time()
            power, energy, memory, util, clock = self.meter.sample()
            row = (stamp, self.rank, self.meter.gpu, power, energy, memory, util, clock)
        except Exception:
            self.errors += 1
            return
        with self._lock:
            if self._n == len(self._buf):
                grown = np.zeros(2 * len(self._buf), dtype=SAMPLE_DTYPE)
                grown[: self._n] = self._buf
                self._buf = grown
            self._buf[self._n] = row
            self._n += 1


def shared_gpu_ranks(gpu_ids_per_rank: list[str | None]) -> dict[str, list[int]]:
    """Each GPU (by identity) and the ranks bound to it, ranks ascending; CPU ranks (``None``) left out.

    Every GPU appears, so the map doubles as the rank -> GPU table; a GPU with more than one rank is
    shared, and NVML's per-device energy then covers all of them together. Identities must be unique
    across nodes (UUIDs are; bare ordinals are not: prefix them with the host name).
    """
    out: dict[str, list[int]] = {}
    for rank, gpu in enumerate(gpu_ids_per_rank):
        if gpu is not None:
            out.setdefault(gpu, []).append(rank)
    return out


__all__ = [
    "ENERGY_UPDATE_PERIOD_S",
    "SAMPLE_DTYPE",
    "EnergyWindow",
    "Meter",
    "PowerSampler",
    "shared_gpu_ranks",
]
