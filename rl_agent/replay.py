"""Recorded FedStitch steps read back from traces (``stitch/*`` tables), for offline training.

Each stitching step of a trace (a ``stitch/steps`` row of kind ``step`` or ``stop`` with its
candidates) becomes a :class:`RecordedStep`: the :class:`StepObservation` the server had, each
candidate's recorded data-weighted proxy with it appended, and the prefix's proxy before the step.
Rows of the tables are joined by ``round``; a round whose rows are incomplete (a killed run's last
round) is skipped.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emulator.algorithms.stitch_weighting import META_COLUMNS, StepObservation, aggregate_scores
from emulator.errors import UserError
from emulator.trace import open_trace

TABLES = ("stitch/steps", "stitch/candidates", "stitch/scores", "stitch/clients")


@dataclass(frozen=True)
class RecordedStep:
    obs: StepObservation
    candidate_proxy: np.ndarray  # [candidates] data-weighted proxy with each candidate appended
    proxy_before: float
    recorded_chosen: int  # what the recorded run chose (-1: nothing)

    def choose(self, client_actions: np.ndarray) -> int:
        """The candidate that weights n_i * a_i pick: argmax of the aggregated scores, as FedStitch picks.

        Like FedStitch: all-zero weights count as data-size weights, and when no candidate has a finite
        aggregated score the best recorded proxy is taken.
        """
        n = np.asarray(self.obs.num_samples, dtype=np.float64)
        w = n * np.asarray(client_actions, dtype=np.float64)
        agg = aggregate_scores(self.obs.scores, w if w.sum() > 0 else n)
        if not np.isfinite(agg).any():
            agg = self.candidate_proxy
        if not np.isfinite(agg).any():
            return -1
        return int(np.nanargmax(np.where(np.isfinite(agg), agg, -np.inf)))

    def gain(self, chosen: int) -> float:
        """Proxy gain of appending candidate ``chosen`` (0 for none or an unrecorded proxy)."""
        if chosen < 0:
            return 0.0
        value = float(self.candidate_proxy[chosen]) - self.proxy_before
        return value if np.isfinite(value) else 0.0


def _depth(config_text: str | bytes | None) -> int | None:
    if not config_text:
        return None
    text = config_text.decode() if isinstance(config_text, bytes) else str(config_text)
    try:
        return int(tomllib.loads(text).get("stitch", {}).get("depth"))
    except (tomllib.TOMLDecodeError, TypeError, ValueError):
        return None


def load_episode(path: Path) -> list[RecordedStep]:
    """The recorded stitching steps of one trace, in round order; a one-line UserError for non-FedStitch traces."""
    path = Path(path)
    with open_trace(path) as f:
        missing = [t for t in TABLES if t not in f]
        if missing:
            raise UserError(f"trace {path} has no {', '.join(missing)}: not a FedStitch run (algorithm = 'fedstitch')")
        steps, cands, scores, clients = (f[t][:] for t in TABLES)
        depth = _depth(f.attrs.get("config"))
    usable = steps[np.isin(steps["kind"], [b"step", b"stop"]) & (steps["step"] >= 0) & (steps["num_candidates"] > 0)]
    max_steps = depth or (int(usable["step"].max()) + 1 if len(usable) else 1)
    out: list[RecordedStep] = []
    for row in np.sort(usable, order="round"):
        r = int(row["round"])
        k = int(row["num_candidates"])
        c = cands[cands["round"] == r]
        c = c[np.argsort(c["index"], kind="stable")]
        if len(c) != k or not np.array_equal(c["index"], np.arange(k)):
            continue  # incomplete round (e.g. killed while appending)
        cl = clients[clients["round"] == r]
        sc = scores[scores["round"] == r]
        if len(cl) == 0:
            continue
        ids = cl["client"].astype(np.int64)
        where = {int(cid): i for i, cid in enumerate(ids)}
        mat = np.full((len(ids), k), np.nan, dtype=np.float32)
        prox = np.full((len(ids), k), np.nan, dtype=np.float32)
        for s in sc:
            i = where.get(int(s["client"]))
            j = int(s["index"])
            if i is not None and 0 <= j < k:
                mat[i, j] = s["score"]
                prox[i, j] = s["proxy"]
        meta = np.stack([cl[name].astype(np.float32) for name in META_COLUMNS], axis=1)
        obs = StepObservation(
            round=r, step=int(row["step"]), max_steps=max_steps, scores=mat, proxies=prox,
            num_samples=cl["num_samples"].astype(np.int64), meta=meta, clients=ids,
            candidates=tuple(b.decode(errors="replace") for b in c["block"]),
        )
        out.append(RecordedStep(obs=obs, candidate_proxy=c["proxy"].astype(np.float64),
                                proxy_before=float(row["proxy_before"]), recorded_chosen=int(row["chosen"])))
    return out


def load_episodes(paths: list[Path]) -> list[list[RecordedStep]]:
    """One episode per trace (traces without usable steps are left out); UserError when none has any."""
    if not paths:
        raise UserError("no traces given; pass FedStitch traces, e.g. --traces runs/*.h5")
    episodes = [ep for ep in (load_episode(Path(p)) for p in paths) if ep]
    if not episodes:
        raise UserError(f"no recorded FedStitch steps with candidates in {len(paths)} trace(s)")
    return episodes
