"""Datasets (uint8 arrays from local files) and client partitioners (indices + offsets)."""

from emulator.data.datasets import (
    DATASETS,
    ArrayDataset,
    check_dataset,
    load_dataset,
    register_dataset,
    resize_images,
)
from emulator.data.partition import (
    PARTITIONERS,
    ClientShards,
    partition,
    register_partitioner,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ArrayDataset",
    "ClientShards",
    "check_dataset",
    "load_dataset",
    "partition",
    "register_dataset",
    "register_partitioner",
    "resize_images",
]
