"""A fixed-size, padded observation of one FedStitch step (DESIGN.md §6).

Cohorts and candidate counts vary from step to step, so a :class:`StepObservation` is padded
into a ``gymnasium.spaces.Dict`` of fixed-shape float32 boxes with masks:

- ``scores`` [max_clients, max_candidates]: the clients' candidate scores, standardised per step
  over the valid entries (mean 0, std 1), clipped to [-10, 10]; NaN (could not score) and padding are 0;
- ``proxies`` [max_clients, max_candidates]: each client's nearest-class-mean accuracy with the
  candidate appended, in [0, 1]; NaN and padding are 0;
- ``meta`` [max_clients, len(META_COLUMNS)]: the per-client features of ``META_COLUMNS``, clipped to
  :data:`META_LOW` / :data:`META_HIGH`;
- ``client_mask`` [max_clients], ``candidate_mask`` [max_candidates]: 1 for a real row / column;
- ``step`` [1]: step / max_steps in [0, 1].

Masks are float32 boxes with bounds {0, 1} rather than ``MultiBinary``: both pass
``check_env``, and a box needs no special case in stable-baselines3's ``MultiInputPolicy``.

Larger cohorts: only the ``max_clients`` clients with the most samples are observed (ties keep the
step's order); the others are not seen by the policy and keep action 1, i.e. their data-size weight.
Larger candidate sets: only the ``max_candidates`` candidates with the highest data-weighted
aggregated score are observed (in their original order); the block choice itself always
considers every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gymnasium import spaces

from emulator.algorithms.stitch_weighting import META_COLUMNS, StepObservation, aggregate_scores

SCORE_CLIP = 10.0
# Bounds of the META_COLUMNS features: log(1 + n) stays far below 50 for any int64 count;
# the Spearman agreement is in [-1, 1]; the others are shares or accuracies in [0, 1].
META_LOW = np.array([0.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float32)
META_HIGH = np.array([50.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
assert len(META_LOW) == len(META_COLUMNS), "update META_LOW/META_HIGH with META_COLUMNS"

KEYS = ("scores", "proxies", "meta", "client_mask", "candidate_mask", "step")


def observation_space(max_clients: int, max_candidates: int) -> spaces.Dict:
    """The Dict space of :func:`encode`'s observations."""
    c, k = max_clients, max_candidates
    return spaces.Dict(
        {
            "scores": spaces.Box(-SCORE_CLIP, SCORE_CLIP, shape=(c, k), dtype=np.float32),
            "proxies": spaces.Box(0.0, 1.0, shape=(c, k), dtype=np.float32),
            "meta": spaces.Box(np.tile(META_LOW, (c, 1)), np.tile(META_HIGH, (c, 1)), dtype=np.float32),
            "client_mask": spaces.Box(0.0, 1.0, shape=(c,), dtype=np.float32),
            "candidate_mask": spaces.Box(0.0, 1.0, shape=(k,), dtype=np.float32),
            "step": spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32),
        }
    )


def action_space(max_clients: int) -> spaces.Box:
    """One action a_i in [0, 1] per client slot; the client's weight is n_i * a_i (padding ignored)."""
    return spaces.Box(0.0, 1.0, shape=(max_clients,), dtype=np.float32)


@dataclass(frozen=True)
class Encoded:
    """An encoded observation and where its rows and columns came from."""

    obs: dict[str, np.ndarray]
    rows: np.ndarray  # indices into the step's clients, one per observed slot (len <= max_clients)
    cols: np.ndarray  # indices into the step's candidates, one per observed column


def observed_rows(num_samples: np.ndarray, max_clients: int) -> np.ndarray:
    """The clients a padded observation keeps: the ``max_clients`` largest, in the step's order."""
    n = len(num_samples)
    if n <= max_clients:
        return np.arange(n)
    # Stable sort on -n: ties keep the step's order, so truncation is deterministic.
    largest = np.argsort(-np.asarray(num_samples, dtype=np.int64), kind="stable")[:max_clients]
    return np.sort(largest)


def observed_cols(scores: np.ndarray, num_samples: np.ndarray, max_candidates: int) -> np.ndarray:
    """The candidates a padded observation keeps: the ``max_candidates`` best by data-weighted score."""
    k = scores.shape[1]
    if k <= max_candidates:
        return np.arange(k)
    agg = aggregate_scores(scores, num_samples.astype(np.float64))
    agg = np.where(np.isfinite(agg), agg, -np.inf)  # nobody scored it: last
    best = np.argsort(-agg, kind="stable")[:max_candidates]
    return np.sort(best)


def standardise(scores: np.ndarray) -> np.ndarray:
    """Scores minus their mean over the finite entries, over their std (when > 0); NaN -> 0, clipped."""
    out = np.zeros(scores.shape, dtype=np.float64)
    valid = np.isfinite(scores)
    if valid.any():
        values = scores[valid].astype(np.float64)
        std = values.std()
        out[valid] = (values - values.mean()) / (std if std > 0 else 1.0)
    return np.clip(out, -SCORE_CLIP, SCORE_CLIP).astype(np.float32)


def encode(obs: StepObservation, max_clients: int, max_candidates: int) -> Encoded:
    """Pad (or truncate) one step's observation to the fixed shapes of :func:`observation_space`."""
    scores = np.asarray(obs.scores, dtype=np.float64)
    n_clients = scores.shape[0]
    num_samples = np.asarray(obs.num_samples)
    if len(num_samples) != n_clients or obs.meta.shape[0] != n_clients or obs.proxies.shape != scores.shape:
        raise ValueError(
            f"inconsistent StepObservation: scores {scores.shape}, proxies {obs.proxies.shape}, "
            f"num_samples {num_samples.shape}, meta {obs.meta.shape}"
        )
    rows = observed_rows(num_samples, max_clients)
    cols = observed_cols(scores, num_samples, max_candidates)
    c, k = len(rows), len(cols)
    sub = scores[np.ix_(rows, cols)]
    prox = np.asarray(obs.proxies, dtype=np.float32)[np.ix_(rows, cols)]
    meta = np.nan_to_num(np.asarray(obs.meta, dtype=np.float32)[rows], nan=0.0, posinf=0.0, neginf=0.0)

    out = {
        "scores": np.zeros((max_clients, max_candidates), np.float32),
        "proxies": np.zeros((max_clients, max_candidates), np.float32),
        "meta": np.zeros((max_clients, len(META_COLUMNS)), np.float32),
        "client_mask": np.zeros(max_clients, np.float32),
        "candidate_mask": np.zeros(max_candidates, np.float32),
        "step": np.zeros(1, np.float32),
    }
    # Standardised over the observed entries only: what the policy sees is self-consistent.
    out["scores"][:c, :k] = standardise(sub)
    out["proxies"][:c, :k] = np.clip(np.nan_to_num(prox, nan=0.0), 0.0, 1.0)
    out["meta"][:c] = np.clip(meta, META_LOW, META_HIGH)
    out["client_mask"][:c] = 1.0
    out["candidate_mask"][:k] = 1.0
    out["step"][0] = np.clip(obs.step / max(obs.max_steps, 1), 0.0, 1.0)
    return Encoded(obs=out, rows=rows, cols=cols)


def expand_actions(actions: np.ndarray, rows: np.ndarray, num_clients: int) -> np.ndarray:
    """Per-client actions of the whole step from the padded action vector (unobserved clients: 1)."""
    full = np.ones(num_clients, dtype=np.float64)
    a = np.asarray(actions, dtype=np.float64).reshape(-1)
    full[rows] = np.clip(np.nan_to_num(a[: len(rows)], nan=1.0), 0.0, 1.0)
    return full
