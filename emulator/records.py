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

# FedStitch (/stitch) and its client weighting (/rl): one row per step, per candidate, per client.
STITCH_STEP_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("step", "<i2"),  # stitching step; the head round has step = -1
        ("kind", "S8"),  # "step" (a block was chosen), "stop" (no gain: nothing appended), "head"
        ("num_candidates", "<i2"),
        ("num_clients", "<i4"),  # clients whose scores were used
        ("chosen", "<i2"),  # index into this step's candidates; -1 when nothing was appended
        ("chosen_block", "S64"),
        ("models_before", "<i2"),  # source models left in the search space, before / after the optimizer
        ("models_after", "<i2"),
        ("blocks_before", "<i2"),  # blocks left in the search space, before / after the optimizer
        ("blocks_after", "<i2"),
        ("stitch_identity", "u1"),  # 1 when the chosen block needed no stitching layer
        ("stitch_residual", "<f4"),  # relative residual ||XW - T||^2 / ||T - mean T||^2 of the fitted layer
        ("proxy_before", "<f4"),  # data-weighted nearest-class-mean accuracy of the prefix, before / after
        ("proxy_after", "<f4"),
        ("reward", "<f4"),  # what the weighting policy was told (proxy gain; the last step: test accuracy)
        ("depth", "<i2"),  # blocks in the stitched prefix after this step
    ]
)
STITCH_CANDIDATE_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("index", "<i2"),
        ("block", "S64"),
        ("model", "S48"),
        ("score", "<f4"),  # aggregated with the policy's weights (what the choice used)
        ("data_score", "<f4"),  # aggregated with data-size weights (the "without RL" choice)
        ("proxy", "<f4"),  # data-weighted nearest-class-mean accuracy with this candidate appended
        ("num_scored", "<i4"),  # clients that could hold and score it
        ("kept", "u1"),  # still in the search space after the step's optimizer
    ]
)
STITCH_SCORE_DTYPE = np.dtype(
    [("round", "<i4"), ("client", "<i4"), ("index", "<i2"), ("score", "<f4"), ("proxy", "<f4")]
)
STITCH_CLIENT_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("client", "<i4"),
        ("num_samples", "<i4"),
        ("action", "<f4"),  # the policy's raw output for this client
        ("weight", "<f4"),  # normalised weight used in the aggregation
        ("data_weight", "<f4"),  # normalised sample-count weight
        ("log_samples", "<f4"),  # the observation's per-client features (StepObservation.meta)
        ("label_entropy", "<f4"),
        ("scored_fraction", "<f4"),
        ("prefix_proxy", "<f4"),
        ("score_agreement", "<f4"),
    ]
)
RL_STEP_DTYPE = np.dtype(
    [
        ("round", "<i4"),
        ("step", "<i2"),
        ("policy", "S16"),  # "data", "reinforce", or a loaded policy's name
        ("reward", "<f4"),
        ("done", "u1"),
        ("num_clients", "<i4"),
        ("num_candidates", "<i2"),
    ]
)
