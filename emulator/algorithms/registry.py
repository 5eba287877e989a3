"""The algorithm registry (kept apart from the plugins so they can import it)."""

from __future__ import annotations

from emulator.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")
register_algorithm = ALGORITHMS.register
