"""Errors a user can cause: one line, exit code 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, data folder, trace path).

    The CLI prints ``str(err)`` as one line and exits with :data:`EXIT_CODE`.
    """

    EXIT_CODE = 2


class ConfigError(UserError):
    """A config key has a bad value or is unknown.

    ``key`` is the dotted path (``data.partition.alpha``); the loader prefixes it
    when the error is raised inside a nested section.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(self._message())

    def _message(self) -> str:
        return f"{self.key} = {self.value!r}: {self.allowed}"

    def with_prefix(self, prefix: str) -> ConfigError:
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.value, self.allowed)
