"""The round cost model: DVFS choice, status, times and energy, checked by hand on small cohorts."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.devices.accounting import CohortInputs, DeviceArrays, plan_costs, updated_correction
from emulator.records import STATUS_DROPPED, STATUS_LATE, STATUS_OK, STATUS_OOM, STATUS_UNAVAILABLE

# Device 0: 2 levels (1 and 2 GFLOP/s at 2 W and 5 W). Device 1: one level, 10 GFLOP/s at 20 W.
DEV = DeviceArrays(
    flops=np.array([[1e9, 2e9], [10e9, np.nan]]),
    power_w=np.array([[2.0, 5.0], [20.0, np.nan]]),
    freq_mhz=np.array([[600.0, 1500.0], [1000.0, np.nan]]),
    num_levels=np.array([2, 1]),
    idle_power_w=np.array([1.0, 10.0]),
    radio_power_w=np.array([0.5, 0.0]),
    uplink_bps=np.array([8e6, 8e9]),
    downlink_bps=np.array([16e6, 8e9]),
    memory_bytes=np.array([1000, 10**9]),
    availability=np.array([1.0, 1.0]),
)


def cohort(**over: object) -> CohortInputs:
    n = len(over.get("device", [0, 0, 1]))  # type: ignore[arg-type]
    base = {
        "device": np.array([0, 0, 1]),
        "speed": np.ones(n),
        "bandwidth": np.ones(n),
        "flops": np.array([2e9, 8e9, 10e9]),
        "peak_bytes": np.array([500, 500, 500]),
        "online": np.ones(n, dtype=bool),
        "noise": np.ones(n),
        "correction": np.ones(n),
        "bytes_down": 1_000_000,
        "bytes_up": 1_000_000,
    }
    base.update(over)
    return CohortInputs(**base)  # type: ignore[arg-type]


def costs(inputs: CohortInputs, **kw: object):
    args = {"keep": 10, "deadline_s": 0.0, "frequency": "max", "memory_fraction": 1.0, **kw}
    return plan_costs(inputs, DEV, **args)  # type: ignore[arg-type]


def test_times_and_energy_at_max_frequency() -> None:
    c = costs(cohort())
    comm0 = 1e6 * 8 / 16e6 + 1e6 * 8 / 8e6  # 0.5 s down + 1 s up
    comm1 = 2 * 1e6 * 8 / 8e9
    np.testing.assert_allclose(c.compute_s, [1.0, 4.0, 1.0])
    np.testing.assert_allclose(c.comm_s, [comm0, comm0, comm1])
    assert c.round_time_s == pytest.approx(4.0 + comm0)  # the slowest client
    np.testing.assert_allclose(c.wait_s, [3.0, 0.0, 4.0 + comm0 - 1.0 - comm1])
    np.testing.assert_allclose(c.energy_compute_j, [5.0, 20.0, 20.0])
    np.testing.assert_allclose(c.energy_comm_j, [0.5 * comm0, 0.5 * comm0, 0.0])
    np.testing.assert_allclose(c.energy_idle_j, [3.0, 0.0, 10.0 * (4.0 + comm0 - 1.0 - comm1)])
    assert (c.status == STATUS_OK).all() and c.level.tolist() == [1, 1, 0]


def test_optimizer_slows_fast_clients_without_stretching_the_round() -> None:
    fast = costs(cohort(), frequency="max")
    slow = costs(cohort(), frequency="optimizer")
    # Client 0 needs 2 s at 600 MHz + 1.5 s comm <= 5.5 s target: it drops to level 0.
    assert slow.level.tolist() == [0, 1, 0]
    assert slow.round_time_s == pytest.approx(fast.round_time_s)
    assert slow.energy_j[0] < fast.energy_j[0]  # 2 W x 2 s + idle < 5 W x 1 s + idle
    assert slow.energy_j.sum() < fast.energy_j.sum()


def test_oom_and_offline_clients() -> None:
    c = costs(cohort(peak_bytes=np.array([2000, 500, 500]), online=np.array([True, True, False])))
    assert c.status.tolist() == [STATUS_OOM, STATUS_OK, STATUS_UNAVAILABLE]
    assert c.budget_bytes.tolist() == [1000, 1000, 10**9]
    assert c.energy_compute_j[0] == 0 and c.comm_s[0] == pytest.approx(0.5)  # downloaded, then failed
    assert c.wait_s[0] == 0 and c.energy_j[0] == pytest.approx(0.5 * 0.5)  # and left: radio energy only
    assert c.energy_j[2] == 0 and c.level[2] == -1  # never reached
    assert c.round_time_s == pytest.approx(4.0 + 1.5)
    half = costs(cohort(peak_bytes=np.array([600, 500, 500])), memory_fraction=0.5)
    assert half.status[0] == STATUS_OOM and half.budget_bytes[0] == 500


def test_deadline_makes_slow_clients_late_and_closes_the_round() -> None:
    c = costs(cohort(), deadline_s=3.0)
    assert c.status.tolist() == [STATUS_OK, STATUS_LATE, STATUS_OK]
    assert c.round_time_s == 3.0
    assert c.compute_s[1] == pytest.approx(3.0 - 0.5)  # computed from download to deadline
    assert c.comm_s[1] == pytest.approx(0.5)  # never uploaded
    assert c.wait_s[1] == pytest.approx(0.0)


def test_overcommit_keeps_the_first_finishers() -> None:
    c = costs(cohort(), keep=2)
    assert c.status.tolist() == [STATUS_OK, STATUS_DROPPED, STATUS_OK]
    assert c.round_time_s == pytest.approx(2.5)  # client 0 finished last of the kept
    assert c.compute_s[1] == pytest.approx(2.5 - 0.5)


def test_feedback_learns_the_clients_true_speed() -> None:
    speed = np.array([0.4, 1.0, 1.0])  # client 0 is 2.5x slower than its profile says
    first = costs(cohort(speed=speed), frequency="optimizer")
    # It predicted 2 s at level 0 (finish 3.5 s <= 5.5 s target) but took 5 s: the round ran long.
    assert first.level[0] == 0 and first.compute_s[0] == pytest.approx(5.0)
    assert first.round_time_s == pytest.approx(6.5) and first.target_s == pytest.approx(5.5)
    corr = updated_correction(first, np.ones(3))
    assert corr[0] == pytest.approx(2.5) and corr[1] == pytest.approx(1.0)
    second = costs(cohort(speed=speed, correction=corr), frequency="optimizer")
    assert second.level[0] == 1  # it now knows it needs full speed
    assert second.round_time_s == pytest.approx(second.target_s)  # and the round is back on time
