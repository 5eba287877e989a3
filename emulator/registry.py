"""One registry per plugin family: a ``register`` decorator and a ``create`` factory.

Modelled on timm's ``register_model`` / ``create_model``: plugins register under a
name at import time; unknown names answer with "did you mean".
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from emulator.errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A short hint naming the closest choices, or all of them when none is close."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "choose one of " + ", ".join(sorted(choices))


class Registry(Generic[T]):
    """Maps names to factories of one plugin family (datasets, partitioners, ...)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str, *, key: str | None = None) -> Callable[..., T]:
        """The factory for ``name``; a one-line UserError naming ``key`` otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key} = {name!r}" if key else f"{self.family} {name!r}"
            raise UserError(
                f"{where}: unknown {self.family}; {did_you_mean(name, list(self._entries))}"
            ) from None

    def create(self, name: str, /, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
