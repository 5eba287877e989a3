"""Registered FL algorithms: ``@register_algorithm(name)`` and ``create_algorithm(name, ...)``."""

from __future__ import annotations

from typing import Any

from emulator.algorithms import (
    fedavg,  # noqa: F401  (registers "fedavg")
    fedpeft,  # noqa: F401  (registers "fedpeft")
    fedstitch,  # noqa: F401  (registers "fedstitch")
    profl,  # noqa: F401  (registers "profl")
    raffm,  # noqa: F401  (registers "raffm")
)
from emulator.algorithms.base import Algorithm, ClientResult, ClientTask
from emulator.algorithms.registry import ALGORITHMS, register_algorithm


def create_algorithm(name: str, **kwargs: Any) -> Algorithm:
    return ALGORITHMS.get(name, key="algorithm")(**kwargs)


__all__ = ["ALGORITHMS", "Algorithm", "ClientResult", "ClientTask", "create_algorithm", "register_algorithm"]
