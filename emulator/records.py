"""Fixed-width record types shared by the runtime and the trace.

Per-client records travel between ranks as raw bytes of these structured dtypes
(``Gatherv``), and the trace stores them unchanged, so the layout is defined once
here. Units are in the field names; ``docs/trace-schema.md`` explains each column.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 1

# Client status codes: a client's result is a status, never a crashed job.
STATUS_OK = 0
STATUS_OOM = 1
STATUS_DROPPED = 2
STATUS_LATE = 3
STATUS_NAMES = ("ok", "oom", "dropped", "late")

CLIENT_ROUND_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("client", "<i4"),
        ("rank", "<i4"),
        ("num_samples", "<i4"),
        ("steps", "<i4"),
        ("status", "u1"),
        ("train_loss", "<f4"),
        ("wall_time_s", "<f8"),
        ("bytes_down", "<i8"),
        ("bytes_up", "<i8"),
    ]
)

ROUND_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("cohort_size", "<i4"),
        ("num_ok", "<i4"),
        ("train_loss", "<f4"),
        ("test_accuracy", "<f4"),
        ("test_loss", "<f4"),
        ("wall_time_s", "<f8"),
        ("bytes_down", "<i8"),
        ("bytes_up", "<i8"),
        ("unix_time_s", "<f8"),
    ]
)

CLIENT_DTYPE = np.dtype(
    [
        ("client", "<i4"),
        ("num_samples", "<i4"),
    ]
)

EVENT_DTYPE = np.dtype(
    [
        ("unix_time_s", "<f8"),
        ("round", "<i4"),
        ("rank", "<i4"),
        ("level", "S8"),
        ("kind", "S32"),
        ("message", "S480"),
    ]
)
