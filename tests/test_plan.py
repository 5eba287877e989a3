"""Cohort sampling and the longest-processing-time assignment."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from emulator.roles.plan import RoundPlan, assign_lpt, sample_cohort, worker_ranks


def test_cohort_is_keyed_by_seed_and_round_only() -> None:
    eligible = np.arange(0, 1000, 3)
    a = sample_cohort(7, 4, eligible, 20)
    assert np.array_equal(a, sample_cohort(7, 4, eligible, 20))
    assert len(np.unique(a)) == 20 and np.isin(a, eligible).all()
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, sample_cohort(7, 5, eligible, 20))
    assert not np.array_equal(a, sample_cohort(8, 4, eligible, 20))


def test_lpt_known_case() -> None:
    # Biggest first onto the least-loaded worker: 7→1, 5→2, 4→2 (load 5 < 7), 3→1, 1→2.
    ranks = assign_lpt(np.array([3.0, 7.0, 1.0, 5.0, 4.0]), [1, 2])
    assert ranks.tolist() == [1, 1, 2, 2, 2]


@settings(max_examples=60, deadline=None)
@example(costs=[1, 1, 1, 1], workers=3)
@given(
    costs=st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    workers=st.integers(1, 8),
)
def test_lpt_properties(costs: list[int], workers: int) -> None:
    c = np.array(costs, dtype=np.float64)
    ranks = assign_lpt(c, list(range(1, workers + 1)))
    assert np.array_equal(ranks, assign_lpt(c, list(range(1, workers + 1))))  # deterministic
    assert set(ranks.tolist()) <= set(range(1, workers + 1))
    loads = np.bincount(ranks, weights=c, minlength=workers + 1)[1:]
    # Graham's bound for greedy list scheduling: makespan <= mean load + (1 - 1/m) * biggest job.
    assert loads.max() <= c.sum() / workers + (1 - 1 / workers) * c.max() + 1e-9
    # LPT's own guarantee, checked where OPT is known exactly: equal jobs.
    if len(set(costs)) == 1:
        assert loads.max() == np.ceil(len(costs) / workers) * costs[0]


def test_plan_counts_and_worker_ranks() -> None:
    plan = RoundPlan(round=0, clients=np.array([2, 5, 9]), ranks=np.array([1, 3, 1], dtype=np.int32))
    assert plan.counts(4).tolist() == [0, 2, 0, 1]
    assert plan.clients_of(1).tolist() == [2, 9]
    assert worker_ranks(1) == [0]
    assert worker_ranks(4) == [1, 2, 3]
