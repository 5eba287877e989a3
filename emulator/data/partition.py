"""Splitting a dataset's samples among virtual clients.

A partition is two int64 arrays (a permutation of the sample indices and per-client
offsets into it), never per-client Python objects, so 100,000 clients over a million
samples cost ~8 MB and partition in well under a second. Every partitioner is
vectorised: no Python loop runs over clients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emulator.errors import UserError
from emulator.registry import Registry

__all__ = ["PARTITIONERS", "ClientShards", "partition", "register_partitioner"]


@dataclass(frozen=True)
class ClientShards:
    """Client ``c`` owns samples ``indices[offsets[c]:offsets[c + 1]]``.

    ``indices`` is a permutation of ``range(N)`` (every sample assigned exactly once);
    ``offsets`` has ``num_clients + 1`` non-decreasing entries from 0 to N. A client
    may own no samples.
    """

    indices: np.ndarray
    offsets: np.ndarray

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_samples(self) -> int:
        return int(self.indices.shape[0])

    @property
    def sizes(self) -> np.ndarray:
        """Samples per client, int64 ``[num_clients]``."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.indices.nbytes + self.offsets.nbytes)

    def shard(self, client: int) -> np.ndarray:
        """Client ``client``'s sample indices (a view, no copy)."""
        return self.indices[self.offsets[client] : self.offsets[client + 1]]

    def client_of_position(self) -> np.ndarray:
        """Owner of each entry of ``indices`` (int64 ``[N]``)."""
        return np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes)

    def label_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Per-client label histogram, int32 ``[num_clients, num_classes]``."""
        labels = np.asarray(labels)
        if labels.shape[0] != self.num_samples:
            raise ValueError(f"{labels.shape[0]} labels for a partition of {self.num_samples}")
        lab = labels[self.indices].astype(np.int64, copy=False)
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"labels outside 0..{num_classes - 1}")
        flat = self.client_of_position() * num_classes + lab
        counts = np.bincount(flat, minlength=self.num_clients * num_classes)
        return counts.astype(np.int32).reshape(self.num_clients, num_classes)


PARTITIONERS: Registry[ClientShards] = Registry("partitioner")


def register_partitioner(
    name: str,
) -> Callable[[Callable[..., ClientShards]], Callable[..., ClientShards]]:
    """Decorator registering a partitioner under ``name``.

    The partitioner is called as ``fn(labels, *, num_clients, rng, alpha,
    shards_per_client)`` and uses the keyword arguments it needs.
    """
    return PARTITIONERS.register(name)


def partition(
    name: str,
    labels: np.ndarray,
    *,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    shards_per_client: int,
) -> ClientShards:
    """Split ``len(labels)`` samples among ``num_clients`` clients with partitioner ``name``."""
    fn = PARTITIONERS.get(name)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if int(num_clients) < 1:
        raise UserError(f"partitioner {name!r}: num_clients = {num_clients}: must be >= 1")
    shards = fn(
        labels,
        num_clients=int(num_clients),
        rng=rng,
        alpha=float(alpha),
        shards_per_client=int(shards_per_client),
    )
    return shards


# --------------------------------------------------------------------------- helpers


def _from_owner(order: np.ndarray, owner: np.ndarray, num_clients: int) -> ClientShards:
    """Group ``order`` by ``owner`` (stable: each client keeps the order it had in ``order``)."""
    grouped = np.argsort(owner, kind="stable")
    indices = order[grouped].astype(np.int64, copy=False)
    sizes = np.bincount(owner, minlength=num_clients)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return ClientShards(indices=indices, offsets=offsets)


def _cuts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Turn proportions (summing to 1) into integer counts summing exactly to ``total``.

    Rounded cumulative sums stay non-decreasing, so no count is negative.
    """
    bounds = np.rint(np.cumsum(proportions) * total).astype(np.int64)
    bounds = np.minimum(bounds, total)
    bounds[-1] = total
    return np.diff(bounds, prepend=0)


def _owner_dtype(num_clients: int) -> type[np.integer]:
    # int32 halves the per-sample owner array (and the argsort on it) at scale.
    return np.int32 if num_clients < 2**31 else np.int64


def _check_alpha(name: str, alpha: float) -> None:
    if not alpha > 0 or not np.isfinite(alpha):
        raise UserError(f"partitioner {name!r}: alpha = {alpha}: must be a finite number > 0")


# --------------------------------------------------------------------------- partitioners


@register_partitioner("iid")
def _iid(labels: np.ndarray, *, num_clients: int, rng: np.random.Generator, **_: object) -> ClientShards:
    """A random permutation cut into ``num_clients`` parts differing by at most one."""
    n = labels.shape[0]
    indices = rng.permutation(n).astype(np.int64, copy=False)
    offsets = np.arange(num_clients + 1, dtype=np.int64) * n // num_clients
    return ClientShards(indices=indices, offsets=offsets)


@register_partitioner("dirichlet")
def _dirichlet(
    labels: np.ndarray,
    *,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    **_: object,
) -> ClientShards:
    """Label skew: each class's samples go to clients in proportions ~ Dir(alpha*1).

    Smaller alpha -> each client sees fewer classes. Loops over classes only; the
    per-class draw and cut are vectorised over clients.
    """
    _check_alpha("dirichlet", alpha)
    n = labels.shape[0]
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, shuffled within
    _, class_sizes = np.unique(labels, return_counts=True)
    owner = np.empty(n, dtype=_owner_dtype(num_clients))
    clients = np.arange(num_clients, dtype=owner.dtype)
    concentration = np.full(num_clients, alpha)
    start = 0
    for size in class_sizes.tolist():
        counts = _cuts(rng.dirichlet(concentration), size)
        owner[start : start + size] = np.repeat(clients, counts)
        start += size
    return _from_owner(order, owner, num_clients)


@register_partitioner("shards")
def _shards(
    labels: np.ndarray,
    *,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int,
    **_: object,
) -> ClientShards:
    """McMahan et al.'s pathological non-IID split.

    Samples sorted by label are cut into ``num_clients * shards_per_client`` shards of
    equal size (+-1); each client gets ``shards_per_client`` random shards. A shard is
    a contiguous run of the label-sorted order, so it holds one label unless it
    straddles a class boundary; when every class size is a multiple of the shard size,
    each client holds at most ``shards_per_client`` distinct labels.
    """
    if shards_per_client < 1:
        raise UserError(f"partitioner 'shards': shards_per_client = {shards_per_client}: must be >= 1")
    n = labels.shape[0]
    num_shards = num_clients * shards_per_client
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    dtype = _owner_dtype(num_clients)
    shard_sizes = np.diff(np.arange(num_shards + 1, dtype=np.int64) * n // num_shards)
    # Shard j goes to client shard_owner[j]; each client receives shards_per_client.
    shard_owner = np.empty(num_shards, dtype=dtype)
    shard_owner[rng.permutation(num_shards)] = np.arange(num_shards, dtype=dtype) // dtype(shards_per_client)
    owner = np.repeat(shard_owner, shard_sizes)
    return _from_owner(order, owner, num_clients)


@register_partitioner("quantity")
def _quantity(
    labels: np.ndarray,
    *,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    **_: object,
) -> ClientShards:
    """Quantity skew: client sizes proportional to Dir(alpha*1), samples IID (a random permutation)."""
    _check_alpha("quantity", alpha)
    n = labels.shape[0]
    indices = rng.permutation(n).astype(np.int64, copy=False)
    sizes = _cuts(rng.dirichlet(np.full(num_clients, alpha)), n)
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return ClientShards(indices=indices, offsets=offsets)
