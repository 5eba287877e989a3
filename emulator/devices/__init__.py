"""Device emulation (DESIGN.md §4): catalogue, populations, memory, FLOPs, time and energy, NVML."""

from __future__ import annotations

from emulator.config import Config


def check_devices(cfg: Config) -> None:
    """Catalogue files, the population mix and the compute device, checked before anything runs."""
    from emulator.devices.binding import choose_device
    from emulator.devices.catalogue import load_catalogue
    from emulator.devices.population import parse_mix

    dev = cfg.devices
    catalogue = load_catalogue(dev.catalogue, extra=[dev.extra_catalogue] if dev.extra_catalogue else [])
    parse_mix(dev.mix, catalogue)
    choose_device(dev.device, node_rank=0)
