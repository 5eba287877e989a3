"""Fixed-width record types shared by the runtime and the trace.

Per-client records travel between ranks as raw bytes of these structured dtypes
(``Gatherv``), and the trace stores them unchanged, so the layout is defined once
here. Units are in the field names; ``docs/trace-schema.md`` explains each column.
"""

from __future__ import annotations

import numpy as np

SCHEMA_VERSION = 2

# Client status codes: a client's result is a status, never a crashed job.
STATUS_OK = 0
STATUS_OOM = 1
STATUS_DROPPED = 2
STATUS_LATE = 3
STATUS_UNAVAILABLE = 4
STATUS_NAMES = ("ok", "oom", "dropped", "late", "unavailable")

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
        # Device emulation (DESIGN.md §4): emulated times in seconds, energy in joules.
        ("device", "<i2"),
        ("level", "<i2"),
        ("freq_mhz", "<f4"),
        ("flops", "<f8"),
        ("compute_time_s", "<f8"),
        ("comm_time_s", "<f8"),
        ("wait_time_s", "<f8"),
        ("energy_compute_j", "<f8"),
        ("energy_comm_j", "<f8"),
        ("energy_idle_j", "<f8"),
        ("energy_j", "<f8"),
        ("energy_measured_j", "<f8"),
        ("meter_short", "u1"),
        ("peak_memory_bytes", "<i8"),
        ("memory_budget_bytes", "<i8"),
        ("cuda_peak_bytes", "<i8"),
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
        ("num_oom", "<i4"),
        ("num_late", "<i4"),
        ("num_dropped", "<i4"),
        ("num_unavailable", "<i4"),
        ("target_time_s", "<f8"),
        ("round_time_s", "<f8"),
        ("emulated_time_s", "<f8"),
        ("energy_j", "<f8"),
        ("energy_measured_j", "<f8"),
        ("accounting_s", "<f8"),
    ]
)

CLIENT_DTYPE = np.dtype(
    [
        ("client", "<i4"),
        ("num_samples", "<i4"),
        ("device", "<i2"),
        ("speed", "<f4"),
        ("bandwidth", "<f4"),
    ]
)

# One row per catalogue device; /clients.device and /client_rounds.device index it.
DEVICE_DTYPE = np.dtype(
    [
        ("name", "S32"),
        ("label", "S64"),
        ("kind", "S16"),
        ("memory_bytes", "<i8"),
        ("idle_power_w", "<f4"),
        ("uplink_bps", "<f8"),
        ("downlink_bps", "<f8"),
        ("radio_power_w", "<f4"),
        ("availability", "<f4"),
        ("num_levels", "<i2"),
        ("max_freq_mhz", "<f4"),
        ("max_flops", "<f8"),
        ("max_power_w", "<f4"),
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

# Background NVML samples, one row per sample per rank (empty where there is no meter).
NVML_SAMPLE_DTYPE = np.dtype(
    [
        ("unix_time_s", "<f8"),
        ("rank", "<i4"),
        ("gpu", "<i4"),
        ("power_w", "<f4"),
        ("energy_j", "<f8"),
        ("memory_used_bytes", "<i8"),
        ("utilization_pct", "<f4"),
        ("sm_clock_mhz", "<f4"),
    ]
)
