"""Errors a user can cause with pools (bad pool folder, unknown model, no weights offline)."""

from __future__ import annotations


class PoolError(Exception):
    """One line naming the block or file and the fix; the CLI prints it and exits 2."""

    EXIT_CODE = 2
