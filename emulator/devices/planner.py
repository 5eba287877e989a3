"""Rank 0's view of the device population: who is online, what each client's work costs.

The per-client state that outlives a round (its device, its true speed, its DVFS
optimizer's correction factor) lives here, on the server, because a virtual client may
run on a different rank every round. Decisions a real client would make (its DVFS level)
are computed from the inputs that client would have, and nothing more.
"""

from __future__ import annotations

import math

import numpy as np

from emulator import seeding
from emulator.config import Config
from emulator.devices.accounting import CohortCosts, CohortInputs, DeviceArrays, plan_costs, updated_correction
from emulator.devices.catalogue import Catalogue
from emulator.devices.population import Population
from emulator.records import DEVICE_DTYPE


def device_arrays(catalogue: Catalogue) -> DeviceArrays:
    a = catalogue.as_arrays()
    return DeviceArrays(
        flops=a["flops"], power_w=a["power_w"], freq_mhz=a["freq_mhz"], num_levels=a["num_levels"],
        idle_power_w=a["idle_power_w"], radio_power_w=a["radio_power_w"], uplink_bps=a["uplink_bps"],
        downlink_bps=a["downlink_bps"], memory_bytes=a["memory_bytes"], availability=a["availability"],
    )


def device_table(catalogue: Catalogue) -> np.ndarray:
    """The catalogue as trace rows (``/devices/table``)."""
    rows = np.zeros(len(catalogue), dtype=DEVICE_DTYPE)
    for i, dev in enumerate(catalogue.devices):
        top = dev.dvfs[-1]
        rows[i] = (
            dev.name.encode()[:32], dev.label.encode()[:64], dev.kind.encode()[:16], dev.memory_bytes,
            dev.idle_power_w, dev.uplink_bps, dev.downlink_bps, dev.radio_power_w, dev.availability,
            len(dev.dvfs), top.freq_mhz, top.flops, top.power_w,
        )
    return rows


class DevicePlanner:
    def __init__(self, *, cfg: Config, catalogue: Catalogue, population: Population) -> None:
        self.cfg = cfg
        self.catalogue = catalogue
        self.population = population
        self.arrays = device_arrays(catalogue)
        # The energy optimizer's belief of actual/nominal compute time, per client; 1 = trust the profile.
        self.correction = np.ones(len(population.device), dtype=np.float64)

    def draws(self, round_: int, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(online, noise) per client, keyed by (seed, round, client): rank-count independent."""
        dev = self.cfg.devices
        avail = self.arrays.availability[self.population.device[clients]]
        online = np.ones(len(clients), dtype=bool)
        noise = np.ones(len(clients))
        sigma = dev.noise
        for i, c in enumerate(clients.tolist()):
            rng = seeding.rng(self.cfg.seed, seeding.STREAM_DEVICE, round_, c)
            u, z = rng.random(), rng.standard_normal()
            if dev.availability:
                online[i] = u < avail[i]
            # Lognormal with mean 1.
            noise[i] = math.exp(sigma * z - sigma * sigma / 2)
        return online, noise

    def budget_bytes(self, clients: np.ndarray) -> np.ndarray:
        """Each client's training memory budget: its device's memory x ``devices.memory_fraction``."""
        memory = self.arrays.memory_bytes[self.population.device[clients]]
        return (memory * self.cfg.devices.memory_fraction).astype(np.int64)

    def plan(
        self, round_: int, clients: np.ndarray, *, flops: np.ndarray, peak_bytes: np.ndarray,
        bytes_down: int | np.ndarray, bytes_up: int | np.ndarray, keep: int,
    ) -> CohortCosts:
        pop = self.population
        online, noise = self.draws(round_, clients)
        inputs = CohortInputs(
            device=pop.device[clients].astype(np.int64), speed=pop.speed[clients].astype(np.float64),
            bandwidth=pop.bandwidth[clients].astype(np.float64), flops=flops.astype(np.float64),
            peak_bytes=peak_bytes.astype(np.int64), online=online, noise=noise,
            correction=self.correction[clients], bytes_down=bytes_down, bytes_up=bytes_up,
        )
        dev = self.cfg.devices
        return plan_costs(
            inputs, self.arrays, keep=keep, deadline_s=self.cfg.deadline_s, frequency=dev.frequency,
            memory_fraction=dev.memory_fraction,
        )

    def feedback(self, clients: np.ndarray, costs: CohortCosts) -> None:
        self.correction[clients] = updated_correction(costs, self.correction[clients])

