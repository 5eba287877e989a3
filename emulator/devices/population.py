"""Populations: which device each virtual client is, and its personal jitter (DESIGN.md §4).

A population is three flat arrays over clients (device index, compute-speed and bandwidth
multipliers), never per-client objects: 100,000 clients cost about 1 MB and are made in
milliseconds. Device counts follow the mix's weights exactly (largest-remainder rounding),
so 100 clients of RaFFM's "xsmall" mix are exactly 80 Raspberry Pi 4 and 20 Raspberry Pi 5;
only which client gets which device is random (a seeded permutation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from emulator.devices.catalogue import Catalogue
from emulator.errors import UserError
from emulator.registry import Registry, did_you_mean

__all__ = [
    "HOMOGENEOUS",
    "JITTER_CLIP",
    "MIXES",
    "Population",
    "largest_remainder",
    "make_population",
    "parse_mix",
    "register_mix",
]

HOMOGENEOUS = "homogeneous:"
JITTER_CLIP = (0.5, 2.0)

# A mix factory takes the catalogue (so "uniform" can list it) and returns {device name: weight}.
MixFactory = Callable[[Catalogue], dict[str, float]]
MIXES: Registry[dict[str, float]] = Registry("device mix")


def register_mix(name: str, weights: Mapping[str, float] | None = None) -> Callable[[MixFactory], MixFactory] | None:
    """Register a named mix.

    ``register_mix("edge", {"rpi4": 0.5, "jetson_nano": 0.5})`` registers fixed weights;
    without ``weights`` it is a decorator for a function ``(catalogue) -> {name: weight}``.
    Weights need not sum to 1: :func:`parse_mix` normalises them.
    """
    if weights is not None:
        fixed = dict(weights)
        MIXES.register(name)(lambda catalogue: dict(fixed))
        return None
    return MIXES.register(name)


# RaFFM's heterogeneous settings (Yu et al., "Bridging the Gap Between Foundation Models and
# Heterogeneous Federated Learning", arXiv:2310.00247), exactly.
register_mix("xsmall", {"rpi4": 0.8, "rpi5": 0.2})
register_mix("small", {"rpi4": 0.4, "rpi5": 0.4, "xps15": 0.2})
register_mix("medium", {"rpi5": 0.3, "xps15": 0.4, "jetson_agx_orin": 0.3})
register_mix("large", {"xps15": 0.2, "jetson_agx_orin": 0.4, "v100": 0.4})
register_mix("xlarge", {"jetson_agx_orin": 0.1, "v100": 0.9})


@register_mix("uniform")
def _uniform(catalogue: Catalogue) -> dict[str, float]:
    """Every catalogue device, equal weight."""
    return dict.fromkeys(catalogue.names(), 1.0)


def _normalised(weights: Mapping[str, float], catalogue: Catalogue, key: str, spec: str) -> dict[str, float]:
    if not weights:
        raise UserError(f"{key} = {spec!r}: the mix names no devices")
    for name, w in weights.items():
        catalogue.index(name, key=f"{key} device")
        if not (isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0):
            raise UserError(f"{key} = {spec!r}: weight of {name!r} = {w!r}: must be a finite number > 0")
    total = math.fsum(weights.values())
    return {name: float(w) / total for name, w in weights.items()}


def _parse_inline(spec: str, catalogue: Catalogue, key: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition(":"))
        if not sep or not name or not value:
            raise UserError(f"{key} = {spec!r}: {item.strip()!r} is not 'device:weight' (e.g. 'rpi4:0.5,v100:0.5')")
        try:
            w = float(value)
        except ValueError:
            raise UserError(f"{key} = {spec!r}: weight of {name!r} = {value!r}: must be a number") from None
        if name in weights:
            raise UserError(f"{key} = {spec!r}: device {name!r} is listed twice")
        weights[name] = w
    return weights


def parse_mix(spec: str, catalogue: Catalogue, *, key: str = "devices.mix") -> dict[str, float]:
    """Device weights (summing to 1, in the order given) for a mix spec.

    ``spec`` is a registered mix (``xsmall`` ... ``xlarge``, ``uniform``), ``homogeneous:<device>``,
    or inline weights ``rpi4:0.5,v100:0.5`` (normalised). Unknown mixes or devices and
    weights that are not > 0 are one-line :class:`UserError` s naming ``key``.
    """
    spec = spec.strip()
    if not spec:
        choices = ", ".join(MIXES.names())
        raise UserError(f"{key} = '': empty; choose one of {choices}, {HOMOGENEOUS}<device> or device:weight,...")
    if spec in MIXES:
        return _normalised(MIXES.get(spec)(catalogue), catalogue, key, spec)
    if spec.startswith(HOMOGENEOUS):
        name = spec[len(HOMOGENEOUS) :].strip()
        catalogue.index(name, key=f"{key} device")
        return {name: 1.0}
    if ":" in spec:
        return _normalised(_parse_inline(spec, catalogue, key), catalogue, key, spec)
    if spec in catalogue:
        raise UserError(f"{key} = {spec!r}: a device, not a mix; did you mean '{HOMOGENEOUS}{spec}'?")
    raise UserError(
        f"{key} = {spec!r}: unknown device mix; {did_you_mean(spec, MIXES.names())} "
        f"(or {HOMOGENEOUS}<device>, or device:weight,...)"
    )


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (Hamilton's method).

    Each entry gets the floor of its quota; the leftover units go to the largest fractional
    parts, ties to the earlier entry. Deterministic: no randomness involved.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("largest_remainder needs total >= 0 and a non-empty vector of positive weights")
    quota = total * (w / w.sum())
    counts = np.floor(quota).astype(np.int64)
    left = total - int(counts.sum())
    if left > 0:
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[:left]] += 1
    return counts


@dataclass(frozen=True)
class Population:
    """Per-client device and jitter; arrays are read-only and indexed by client id."""

    device: np.ndarray  # int16 [num_clients]: index into the catalogue
    speed: np.ndarray  # float32 [num_clients]: multiplier of compute throughput (1 = nominal)
    bandwidth: np.ndarray  # float32 [num_clients]: multiplier of uplink and downlink bandwidth

    def __len__(self) -> int:
        return int(self.device.shape[0])

    @property
    def num_clients(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return int(self.device.nbytes + self.speed.nbytes + self.bandwidth.nbytes)

    def counts(self, num_devices: int) -> np.ndarray:
        """Clients per device index, int64 ``[num_devices]``."""
        return np.bincount(self.device.astype(np.int64), minlength=num_devices)


def _jitter(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Lognormal multipliers with mean 1 (mu = -sigma^2/2), clipped to JITTER_CLIP; exactly 1 if sigma = 0."""
    if sigma == 0:
        return np.ones(n, dtype=np.float32)
    x = rng.lognormal(mean=-0.5 * sigma * sigma, sigma=sigma, size=n)
    return np.clip(x, *JITTER_CLIP).astype(np.float32)


def make_population(
    num_clients: int, *, mix: Mapping[str, float], catalogue: Catalogue, rng: np.random.Generator, jitter: float
) -> Population:
    """Assign a device to each of ``num_clients`` clients in exact ``mix`` proportions.

    Counts come from :func:`largest_remainder`; a permutation drawn from ``rng`` spreads
    them over clients; then ``rng`` draws the speed and then the bandwidth multipliers
    (lognormal, sigma = ``jitter``, mean 1, clipped to [0.5, 2]). The same ``rng`` state
    gives the same population; ``jitter`` does not change the device assignment.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise UserError(f"number of clients = {num_clients!r}: must be an integer >= 1")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise UserError(f"devices.jitter = {jitter!r}: must be a finite number >= 0")
    if len(catalogue) > np.iinfo(np.int16).max:
        raise UserError(f"device catalogue {catalogue.path}: {len(catalogue)} devices; at most 32767 are supported")
    if not mix:
        raise UserError("device mix: names no devices")
    names = list(mix)
    index = np.array([catalogue.index(name, key="devices.mix device") for name in names], dtype=np.int16)
    weights = np.array([mix[name] for name in names], dtype=np.float64)
    if not (np.all(np.isfinite(weights)) and np.all(weights > 0)):
        raise UserError(f"device mix {dict(mix)!r}: weights must be finite numbers > 0")
    counts = largest_remainder(int(num_clients), weights)
    device = rng.permutation(np.repeat(index, counts))
    speed = _jitter(rng, int(num_clients), float(jitter))
    bandwidth = _jitter(rng, int(num_clients), float(jitter))
    for arr in (device, speed, bandwidth):
        arr.setflags(write=False)
    return Population(device=device, speed=speed, bandwidth=bandwidth)
