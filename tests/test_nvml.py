"""NVML meter and power sampler: the meter-less path for real, the sampler's thread logic with a fake meter."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from emulator.devices.nvml import (
    ENERGY_UPDATE_PERIOD_S,
    SAMPLE_DTYPE,
    Meter,
    PowerSampler,
    shared_gpu_ranks,
)


def nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


NVML = nvml_present()


class FakeMeter:
    """A fake NVML meter (no GPU here): an energy counter that grows at 50 W with ``ticks`` of granularity.

    It has the attributes and methods PowerSampler and EnergyWindow use, so this tests the thread and
    window logic only, not NVML.
    """

    kind = "nvml"
    gpu = 3
    update_period_s = 0.02

    def __init__(self, *, fail_every: int = 0) -> None:
        self.t0 = time.perf_counter()
        self.calls = 0
        self.fail_every = fail_every

    def energy_j(self) -> float:
        ticks = int((time.perf_counter() - self.t0) / self.update_period_s)
        return 1000.0 + 50.0 * ticks * self.update_period_s

    def sample(self) -> tuple[float, float, int, float, float]:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("fake NVML hiccup")
        return 50.0, self.energy_j(), 1 << 30, 87.0, 1410.0

    def window(self):
        from emulator.devices.nvml import EnergyWindow

        return EnergyWindow(self)  # type: ignore[arg-type]


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fedemu-power-sampler")]


# -- no meter ----------------------------------------------------------------------------------------------


def test_no_gpu_means_no_meter() -> None:
    meter = Meter(None)
    assert meter.kind == "none"
    assert "no GPU" in meter.reason
    assert math.isnan(meter.energy_j())
    assert meter.update_period_s == ENERGY_UPDATE_PERIOD_S == 0.1


@pytest.mark.skipif(NVML, reason="NVML is present here: the missing-library path cannot be seen")
def test_missing_nvml_library_is_no_meter_with_the_reason() -> None:
    meter = Meter(0)
    assert meter.kind == "none"
    assert "library" in meter.reason.lower()
    assert math.isnan(meter.energy_j())
    power, energy, memory, util, clock = meter.sample()
    assert math.isnan(power) and math.isnan(energy) and memory == -1
    assert math.isnan(util) and math.isnan(clock)


def test_window_without_meter_has_nan_energy_and_real_seconds() -> None:
    meter = Meter(None)
    with meter.window() as w:
        time.sleep(0.01)
    assert math.isnan(w.energy_j)
    assert w.seconds >= 0.01
    assert w.flag_short  # 10 ms < 100 ms


def test_sampler_without_meter_starts_no_thread() -> None:
    sampler = PowerSampler(Meter(None), rank=2)
    sampler.start()
    assert sampler._thread is None and not sampler.running
    assert sampler_threads() == []
    rows = sampler.drain()
    assert rows.dtype == SAMPLE_DTYPE and len(rows) == 0
    sampler.stop()
    assert len(sampler.drain()) == 0


# -- the thread logic, with a fake meter --------------------------------------------------------------------


def test_window_with_a_fake_meter() -> None:
    meter = FakeMeter()
    with meter.window() as w:
        time.sleep(0.1)
    assert not w.flag_short
    assert w.energy_j == pytest.approx(50.0 * w.seconds, abs=50.0 * 2 * meter.update_period_s)
    with meter.window() as short:
        pass
    assert short.flag_short
    assert math.isnan(short.energy_j)  # unknown, never 0


def test_sampler_collects_at_the_period_and_drain_empties() -> None:
    meter = FakeMeter()
    sampler = PowerSampler(meter, rank=5, period_s=0.02, capacity=2)  # tiny capacity: the buffer must grow
    sampler.start()
    sampler.start()  # idempotent
    assert sampler.running and len(sampler_threads()) == 1
    time.sleep(0.5)
    first = sampler.drain()
    time.sleep(0.1)
    sampler.stop()
    assert not sampler.running and sampler_threads() == []
    rest = sampler.drain()
    assert len(sampler.drain()) == 0

    rows = np.concatenate([first, rest])
    assert rows.dtype == SAMPLE_DTYPE
    # 0.6 s at 20 ms: 30 slots; allow a loaded CI machine to miss many, never to burst past the schedule
    assert 10 <= len(rows) <= 32, len(rows)
    gaps = np.diff(rows["unix_time_s"])
    assert (gaps > 0).all()
    assert np.median(gaps) == pytest.approx(0.02, rel=0.5)
    assert (rows["rank"] == 5).all() and (rows["gpu"] == 3).all()
    assert (rows["power_w"] == 50.0).all() and (rows["memory_used_bytes"] == 1 << 30).all()
    assert (np.diff(rows["energy_j"]) >= 0).all()
    assert sampler.errors == 0


def test_sampler_survives_failing_reads_and_restarts() -> None:
    meter = FakeMeter(fail_every=2)
    sampler = PowerSampler(meter, rank=0, period_s=0.01)
    sampler.start()
    time.sleep(0.2)
    sampler.stop()
    taken = len(sampler.drain())
    assert taken > 0 and sampler.errors > 0
    assert taken + sampler.errors == meter.calls
    sampler.start()
    time.sleep(0.05)
    sampler.stop()
    assert len(sampler.drain()) > 0
    assert sampler_threads() == []


def test_shared_gpu_ranks() -> None:
    ids = ["GPU-a", "GPU-b", "GPU-a", None, "GPU-b", "GPU-c"]
    assert shared_gpu_ranks(ids) == {"GPU-a": [0, 2], "GPU-b": [1, 4], "GPU-c": [5]}
    assert shared_gpu_ranks([None, None]) == {}


# -- a real GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_energy_counter_grows_during_matmuls() -> None:
    if not NVML:
        pytest.skip("NVML absent")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("NVML present but CUDA unavailable to torch")
    from emulator.devices.binding import gpu_identity

    meter = Meter(gpu_identity("cuda:0"))
    assert meter.kind == "nvml", meter.reason
    sampler = PowerSampler(meter, rank=0, period_s=0.05)
    a = torch.randn(4096, 4096, device="cuda")
    sampler.start()
    with meter.window() as w:
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    sampler.stop()
    rows = sampler.drain()
    meter.close()
    assert not w.flag_short and w.energy_j > 0
    assert len(rows) >= 5 and (rows["power_w"] > 0).all()
    assert rows["energy_j"][-1] > rows["energy_j"][0]
