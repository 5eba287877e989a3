"""Device emulation (DESIGN.md §4): catalogue, populations, memory, FLOPs, time and energy, NVML."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emulator.config import Config

if TYPE_CHECKING:
    from emulator.devices.catalogue import Catalogue


def configured_catalogue(cfg: Config) -> Catalogue:
    """The catalogue a run uses: ``devices.catalogue`` plus ``devices.extra_catalogue`` when set."""
    from emulator.devices.catalogue import load_catalogue

    dev = cfg.devices
    return load_catalogue(dev.catalogue, extra=[dev.extra_catalogue] if dev.extra_catalogue else [])


def check_devices(cfg: Config) -> None:
    """Catalogue files, the population mix and the compute device, checked before anything runs."""
    from emulator.devices.binding import choose_device
    from emulator.devices.population import parse_mix

    parse_mix(cfg.devices.mix, configured_catalogue(cfg))
    choose_device(cfg.devices.device, node_rank=0)
