"""Random streams keyed by purpose, round and client.

Every draw comes from ``SeedSequence(root_seed, spawn_key=(stream, round, client))``
so the result of a (round, client) never depends on which rank ran it or on what
that rank ran before: any number of ranks gives the same trace.
"""

from __future__ import annotations

import numpy as np

# Stream ids: separate purposes never share a sequence.
STREAM_PARTITION = 0
STREAM_MODEL_INIT = 1
STREAM_COHORT = 2
STREAM_CLIENT = 3
STREAM_POPULATION = 4
STREAM_DEVICE = 5

NO_CLIENT = 0  # rounds-level draws use client slot 0 of their own stream


def seed_sequence(root_seed: int, stream: int, round_: int = 0, client: int = NO_CLIENT) -> np.random.SeedSequence:
    return np.random.SeedSequence(root_seed, spawn_key=(stream, round_, client))


def rng(root_seed: int, stream: int, round_: int = 0, client: int = NO_CLIENT) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(root_seed, stream, round_, client)))


def torch_seed(root_seed: int, stream: int, round_: int = 0, client: int = NO_CLIENT) -> int:
    """A 63-bit seed for ``torch.manual_seed`` from the same keyed sequence."""
    return int(seed_sequence(root_seed, stream, round_, client).generate_state(1, np.uint64)[0] >> 1)

