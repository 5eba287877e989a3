"""Registered FL algorithms: ``@register_algorithm(name)`` and ``create_algorithm(name, ...)``."""

from __future__ import annotations

from typing import Any

from emulator.algorithms import fedavg  # noqa: F401  (registers "fedavg")
from emulator.algorithms import fedpeft  # noqa: F401  (registers "fedpeft")
from emulator.algorithms import raffm  # noqa: F401  (registers "raffm")
from emulator.algorithms import fedstitch  # noqa: F401  (registers "fedstitch")
from emulator.algorithms import profl  # noqa: F401  (registers "profl")
from emulator.algorithms.base import Algorithm, ClientResult, ClientTask
from emulator.algorithms.registry import ALGORITHMS, register_algorithm


def create_algorithm(name: str, **kwargs: Any) -> Algorithm:
    return ALGORITHMS.get(name, key="algorithm")(**kwargs)


__all__ = ["ALGORITHMS", "Algorithm", "ClientResult", "ClientTask", "create_algorithm", "register_algorithm"]
