"""Partitioners: every sample exactly once, the documented skew, and scale."""

from __future__ import annotations

import itertools
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.data import PARTITIONERS, ClientShards, partition
from emulator.errors import UserError

NAMES = ["iid", "dirichlet", "shards", "quantity"]


def split(name: str, labels: np.ndarray, num_clients: int, seed: int = 0, **kw: object):
    args: dict = dict(
        num_clients=num_clients, rng=np.random.default_rng(seed), alpha=0.5, shards_per_client=2
    )
    args.update(kw)
    return partition(name, labels, **args)


def assert_valid(shards: ClientShards, n: int, num_clients: int) -> None:
    assert shards.indices.dtype == np.int64 and shards.offsets.dtype == np.int64
    assert shards.indices.shape == (n,)
    np.testing.assert_array_equal(np.sort(shards.indices), np.arange(n))
    assert shards.offsets.shape == (num_clients + 1,)
    assert shards.offsets[0] == 0 and shards.offsets[-1] == n
    assert (np.diff(shards.offsets) >= 0).all()
    assert shards.num_clients == num_clients
    np.testing.assert_array_equal(shards.sizes, np.diff(shards.offsets))
    assert shards.nbytes == shards.indices.nbytes + shards.offsets.nbytes


def test_registered() -> None:
    assert set(NAMES) <= set(PARTITIONERS.names())


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    n=st.integers(0, 400),
    num_classes=st.integers(1, 12),
    num_clients=st.integers(1, 60),
    alpha=st.floats(0.01, 100.0),
    shards_per_client=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_sample_assigned_once(
    name: str,
    n: int,
    num_classes: int,
    num_clients: int,
    alpha: float,
    shards_per_client: int,
    seed: int,
) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, n)
    shards = split(name, labels, num_clients, seed, alpha=alpha, shards_per_client=shards_per_client)
    assert_valid(shards, n, num_clients)
    counts = shards.label_counts(labels, num_classes)
    assert counts.dtype == np.int32 and counts.shape == (num_clients, num_classes)
    np.testing.assert_array_equal(counts.sum(axis=1), shards.sizes)
    np.testing.assert_array_equal(counts.sum(axis=0), np.bincount(labels, minlength=num_classes))
    # shard(c) is a view of exactly client c's slice.
    c = num_clients // 2
    view = shards.shard(c)
    assert np.shares_memory(view, shards.indices) or view.size == 0
    np.testing.assert_array_equal(view, shards.indices[shards.offsets[c] : shards.offsets[c + 1]])
    # Deterministic given the generator's seed.
    again = split(name, labels, num_clients, seed, alpha=alpha, shards_per_client=shards_per_client)
    np.testing.assert_array_equal(again.indices, shards.indices)
    np.testing.assert_array_equal(again.offsets, shards.offsets)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 500), num_clients=st.integers(1, 80), seed=st.integers(0, 1000))
def test_iid_sizes_differ_by_at_most_one(n: int, num_clients: int, seed: int) -> None:
    shards = split("iid", np.zeros(n, np.int64), num_clients, seed)
    assert shards.sizes.max() - shards.sizes.min() <= 1


def mean_tv_from_global(shards: ClientShards, labels: np.ndarray, num_classes: int) -> float:
    counts = shards.label_counts(labels, num_classes).astype(np.float64)
    sizes = counts.sum(axis=1)
    nonempty = sizes > 0
    local = counts[nonempty] / sizes[nonempty, None]
    global_dist = np.bincount(labels, minlength=num_classes) / labels.size
    return float(0.5 * np.abs(local - global_dist).sum(axis=1).mean())


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    labels = np.random.default_rng(7).integers(0, 10, 20_000)
    skewed = mean_tv_from_global(split("dirichlet", labels, 50, 1, alpha=0.05), labels, 10)
    uniform = mean_tv_from_global(split("dirichlet", labels, 50, 1, alpha=100.0), labels, 10)
    middle = mean_tv_from_global(split("dirichlet", labels, 50, 1, alpha=1.0), labels, 10)
    assert skewed > 0.6  # most clients dominated by one or two classes
    assert uniform < 0.1  # close to the global distribution
    assert uniform < middle < skewed


def test_quantity_skews_sizes_not_labels() -> None:
    labels = np.random.default_rng(3).integers(0, 5, 50_000)
    skewed = split("quantity", labels, 40, 2, alpha=0.1)
    even = split("quantity", labels, 40, 2, alpha=1000.0)
    assert skewed.sizes.std() > 5 * even.sizes.std()
    big = skewed.sizes >= 2000  # label mix of big clients stays near global
    assert big.any()
    counts = skewed.label_counts(labels, 5)[big]
    np.testing.assert_allclose(counts / counts.sum(axis=1, keepdims=True), 0.2, atol=0.05)


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_give_few_labels_per_client(shards_per_client: int) -> None:
    # 10 classes x 120 samples, 20 clients: shard size divides the class size, so
    # every shard holds one label and each client at most shards_per_client labels.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 120))
    num_clients = 20
    shards = split("shards", labels, num_clients, 4, shards_per_client=shards_per_client)
    assert_valid(shards, labels.size, num_clients)
    distinct = (shards.label_counts(labels, 10) > 0).sum(axis=1)
    assert distinct.max() <= shards_per_client
    assert (shards.sizes == labels.size // num_clients).all()
    if shards_per_client > 1:
        assert distinct.max() > 1  # shards really are mixed across clients


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 300),
    num_clients=st.integers(1, 30),
    spc=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_shards_sizes_are_whole_shards(n: int, num_clients: int, spc: int, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 6, n)
    shards = split("shards", labels, num_clients, seed, shards_per_client=spc)
    low = spc * (n // (num_clients * spc))
    assert ((shards.sizes >= low) & (shards.sizes <= low + spc)).all()
    # A shard is a run of the label-sorted order, so a client sees at most spc times
    # the most labels any one run of that length spans.
    ordered = np.sort(labels)
    bounds = np.arange(num_clients * spc + 1) * n // (num_clients * spc)
    per_shard = max(
        (np.unique(ordered[a:b]).size for a, b in itertools.pairwise(bounds)),
        default=0,
    )
    distinct = (shards.label_counts(labels, 6) > 0).sum(axis=1)
    assert (distinct <= spc * per_shard).all()


def test_bad_arguments_are_user_errors() -> None:
    labels = np.zeros(10, np.int64)
    with pytest.raises(UserError, match="alpha"):
        split("dirichlet", labels, 3, alpha=0.0)
    with pytest.raises(UserError, match="alpha"):
        split("quantity", labels, 3, alpha=-1.0)
    with pytest.raises(UserError, match="shards_per_client"):
        split("shards", labels, 3, shards_per_client=0)
    with pytest.raises(UserError, match="num_clients"):
        split("iid", labels, 0)
    with pytest.raises(UserError, match="did you mean"):
        split("dirichlett", labels, 3)


@pytest.mark.parametrize("name", NAMES)
def test_100k_clients_over_1m_labels(name: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1_000_000)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        shards = split(name, labels, 100_000, 0, alpha=0.3, shards_per_client=2)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shards.num_clients == 100_000
    assert shards.offsets[-1] == 1_000_000
    assert shards.nbytes < 200 * 2**20
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert elapsed < 10.0
    counts = shards.label_counts(labels, 10)
    np.testing.assert_array_equal(counts.sum(axis=1), shards.sizes)
