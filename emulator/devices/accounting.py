"""The emulated cost of one round: DVFS choice, time, status and energy per client (DESIGN.md §4).

Everything here is vectorised over the cohort and runs on rank 0 when it plans a round:
compute time and memory are known before any client trains (FLOPs and peak memory are
measured once per model and batch size), so clients that will be out of memory, offline,
late or cut by over-commitment are never trained for real — their updates would be
discarded anyway — while their time and energy are still accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.records import STATUS_DROPPED, STATUS_LATE, STATUS_OK, STATUS_OOM, STATUS_UNAVAILABLE


@dataclass(frozen=True)
class DeviceArrays:
    """The catalogue as arrays indexed by device (DVFS tables padded with NaN)."""

    flops: np.ndarray  # [D, L] effective FLOP/s
    power_w: np.ndarray  # [D, L]
    freq_mhz: np.ndarray  # [D, L]
    num_levels: np.ndarray  # [D]
    idle_power_w: np.ndarray  # [D]
    radio_power_w: np.ndarray  # [D]
    uplink_bps: np.ndarray  # [D]
    downlink_bps: np.ndarray  # [D]
    memory_bytes: np.ndarray  # [D]
    availability: np.ndarray  # [D]


@dataclass(frozen=True)
class CohortInputs:
    """What is known about each sampled client before the round (arrays over the cohort)."""

    device: np.ndarray  # device index
    speed: np.ndarray  # true throughput multiplier (unknown to the client: it learns it by feedback)
    bandwidth: np.ndarray  # bandwidth multiplier
    flops: np.ndarray  # FLOPs of its local work this round
    peak_bytes: np.ndarray  # peak memory of its local work
    online: np.ndarray  # bool: available this round
    noise: np.ndarray  # this round's multiplicative variation of its compute time
    correction: np.ndarray  # the client's own estimate of actual/nominal time, from its last round
    bytes_down: int | np.ndarray  # per client, or one number for all
    bytes_up: int | np.ndarray


@dataclass(frozen=True)
class CohortCosts:
    status: np.ndarray  # uint8, records.STATUS_*
    level: np.ndarray  # int16 DVFS level chosen (-1 when the client never computed)
    freq_mhz: np.ndarray
    budget_bytes: np.ndarray
    compute_s: np.ndarray
    comm_s: np.ndarray
    wait_s: np.ndarray
    energy_compute_j: np.ndarray
    energy_comm_j: np.ndarray
    energy_idle_j: np.ndarray
    nominal_compute_s: np.ndarray  # at the chosen level, at catalogue speed (the client's prior)
    target_s: float  # finish time the clients aimed at (deadline, or the synchronous round's)
    round_time_s: float

    @property
    def energy_j(self) -> np.ndarray:
        return self.energy_compute_j + self.energy_comm_j + self.energy_idle_j

    @property
    def runs(self) -> np.ndarray:
        """Clients whose update is used: the only ones trained for real."""
        return self.status == STATUS_OK


def plan_costs(
    inputs: CohortInputs,
    dev: DeviceArrays,
    *,
    keep: int,
    deadline_s: float,
    frequency: str,
    memory_fraction: float,
) -> CohortCosts:
    """Decide each client's DVFS level, status, times and energy for one synchronous round.

    ``keep``: with over-commitment, the round closes once this many clients finished; the
    slower ones are ``dropped``. ``deadline_s`` > 0 closes it at that time; later ones are
    ``late``. Without a deadline, clients aim at the round's natural end (the slowest
    available client at full speed) and slow down to the lowest level that still makes it.
    """
    d = inputs.device
    n = len(d)
    budget = (dev.memory_bytes[d] * memory_fraction).astype(np.int64)
    fits = inputs.peak_bytes <= budget
    online = inputs.online.astype(bool)
    comm_down = inputs.bytes_down * 8.0 / (dev.downlink_bps[d] * inputs.bandwidth)
    comm_up = inputs.bytes_up * 8.0 / (dev.uplink_bps[d] * inputs.bandwidth)
    comm = comm_down + comm_up

    top = dev.num_levels[d] - 1
    rows = np.arange(n)
    flops_table = dev.flops[d]  # [n, L]
    nominal_all = inputs.flops[:, None] / flops_table  # NaN on padded levels
    actual_max = nominal_all[rows, top] * inputs.noise / inputs.speed

    runnable = online & fits
    if deadline_s > 0:
        target = float(deadline_s)
    elif runnable.any():
        # Synchronous round: nobody can finish before the slowest client at full speed.
        target = float(np.max(actual_max[runnable] + comm[runnable]))
    else:
        target = 0.0

    if frequency == "max":
        level = top.copy()
    else:
        # The client predicts with its own correction factor; it cannot see `speed`.
        predicted = nominal_all * inputs.correction[:, None] + comm[:, None]
        ok_levels = predicted <= target * (1 + 1e-9)
        ok_levels &= ~np.isnan(predicted)
        first = np.argmax(ok_levels, axis=1)
        level = np.where(ok_levels.any(axis=1), first, top)
    nominal = nominal_all[rows, level]
    compute = nominal * inputs.noise / inputs.speed
    finish = compute + comm

    status = np.full(n, STATUS_OK, dtype=np.uint8)
    status[~fits] = STATUS_OOM
    status[~online] = STATUS_UNAVAILABLE
    if deadline_s > 0:
        status[(status == STATUS_OK) & (finish > deadline_s)] = STATUS_LATE
    ok = np.flatnonzero(status == STATUS_OK)
    if len(ok) > keep:
        order = ok[np.lexsort((ok, finish[ok]))]  # fastest first; ties by position
        status[order[keep:]] = STATUS_DROPPED
    ok_mask = status == STATUS_OK

    if ok_mask.any():
        round_time = float(finish[ok_mask].max())
        if (status == STATUS_LATE).any():
            round_time = float(deadline_s)
    else:
        round_time = float(deadline_s) if deadline_s > 0 else 0.0

    # What each client really spent. Cut clients (late, dropped) compute until the round
    # closes and never upload; an oom client downloads, fails and leaves; offline ones cost
    # nothing (they were never reached). Only clients whose update is used wait for the end.
    cut = (status == STATUS_LATE) | (status == STATUS_DROPPED)
    spent_compute = np.where(ok_mask, compute, 0.0)
    spent_compute = np.where(cut, np.clip(round_time - comm_down, 0.0, None), spent_compute)
    spent_comm = np.where(ok_mask, comm, np.where(cut | (status == STATUS_OOM), comm_down, 0.0))
    busy = spent_compute + spent_comm
    wait = np.where(ok_mask, np.clip(round_time - busy, 0.0, None), 0.0)
    computed = ok_mask | cut
    power = dev.power_w[d, level]
    return CohortCosts(
        status=status,
        level=np.where(computed, level, -1).astype(np.int16),
        freq_mhz=np.where(computed, dev.freq_mhz[d, level], np.nan).astype(np.float32),
        budget_bytes=budget,
        compute_s=spent_compute,
        comm_s=spent_comm,
        wait_s=wait,
        energy_compute_j=np.where(computed, power * spent_compute, 0.0),
        energy_comm_j=dev.radio_power_w[d] * spent_comm,
        energy_idle_j=dev.idle_power_w[d] * wait,
        nominal_compute_s=nominal,
        target_s=target,
        round_time_s=round_time,
    )


def updated_correction(costs: CohortCosts, previous: np.ndarray) -> np.ndarray:
    """Feedback: a client that computed learns actual/nominal time of its chosen level."""
    observed = costs.runs & (costs.nominal_compute_s > 0)
    out = previous.copy()
    out[observed] = costs.compute_s[observed] / costs.nominal_compute_s[observed]
    return out
