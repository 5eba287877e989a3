"""One emulation on every rank: set up, then the synchronous rounds of DESIGN.md §3."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from emulator import seeding
from emulator.algorithms import create_algorithm
from emulator.batches import BatchMaker
from emulator.comm import Comm
from emulator.config import Config, to_toml
from emulator.data import ArrayDataset, ClientShards, check_dataset, load_dataset, partition
from emulator.flat import FlatModel
from emulator.models import create_model
from emulator.progress import RoundProgress
from emulator.records import CLIENT_DTYPE, CLIENT_ROUND_DTYPE
from emulator.roles.client_group import ClientGroup
from emulator.roles.plan import worker_ranks
from emulator.roles.server import RunSummary, Server
from emulator.trace import TraceWriter

PACKAGES = ("fedemu", "torch", "torchvision", "timm", "numpy", "h5py", "mpi4py", "gymnasium")


def trace_path(cfg: Config) -> Path:
    if cfg.output.trace:
        return Path(cfg.output.trace)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.dir) / f"{cfg.name}-{stamp}.h5"


def threads_per_rank(cfg: Config, comm: Comm) -> int:
    """Split the node's cores between its ranks unless the config says otherwise."""
    if cfg.runtime.threads:
        return cfg.runtime.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, comm.node_size))


def load_data(cfg: Config) -> ArrayDataset:
    d = cfg.data
    return load_dataset(
        d.dataset, root=Path(d.root), image_size=d.image_size, seed=cfg.seed, num_classes=d.num_classes,
        num_samples=d.num_samples, channels=d.channels, test_fraction=d.test_fraction,
    )


def make_shards(cfg: Config, labels: np.ndarray) -> ClientShards:
    p = cfg.data.partition
    return partition(
        p.name, labels, num_clients=p.num_clients, rng=seeding.rng(cfg.seed, seeding.STREAM_PARTITION),
        alpha=p.alpha, shards_per_client=p.shards_per_client,
    )


def build_model(cfg: Config, data: ArrayDataset) -> torch.nn.Module:
    # The same seed on every rank: every rank starts from the same global model.
    torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.STREAM_MODEL_INIT))
    return create_model(
        cfg.model.name, num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
        pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint,
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def trace_attrs(cfg: Config, comm: Comm, threads: int) -> dict[str, str | int | float | bool]:
    return {
        "config": to_toml(cfg),
        "fedemu_version": _versions()["fedemu"],
        "package_versions": json.dumps(_versions()),
        "mpi_library": comm.library(),
        "ranks": comm.size,
        "workers": len(worker_ranks(comm.size)),
        "threads_per_rank": threads,
        "hosts": json.dumps(comm.hosts()),
        "gpus": json.dumps([]),  # device binding arrives with the device-emulation issue
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def run(cfg: Config, comm: Comm) -> RunSummary | None:
    """Run the emulation on this rank; rank 0 returns the summary, other ranks None."""
    started = time.perf_counter()
    threads = threads_per_rank(cfg, comm)
    torch.set_num_threads(threads)
    # Cheap file checks on every rank first: a missing dataset is a clean error, not a hang.
    check_dataset(cfg.data.dataset, root=Path(cfg.data.root))
    data = comm.node_share(lambda: load_data(cfg))
    shards = make_shards(cfg, data.y_train)
    model = build_model(cfg, data)
    flat = FlatModel(model)
    train_batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std)
    algorithm = create_algorithm(cfg.algorithm, cfg=cfg, model=model, flat=flat, batches=train_batches)
    global_params = flat.get()

    is_server = comm.rank == 0
    group = None
    if comm.rank in worker_ranks(comm.size):
        group = ClientGroup(rank=comm.rank, seed=cfg.seed, algorithm=algorithm, shards=shards)
    attrs = trace_attrs(cfg, comm, threads)  # collective (hosts): every rank calls it

    server = None
    if is_server:
        sizes = shards.sizes
        clients = np.zeros(shards.num_clients, dtype=CLIENT_DTYPE)
        clients["client"] = np.arange(shards.num_clients)
        clients["num_samples"] = sizes
        trace = TraceWriter(
            trace_path(cfg), attrs=attrs, clients=clients,
            label_counts=shards.label_counts(data.y_train, data.num_classes), overwrite=cfg.output.overwrite,
            cohort_size=cfg.clients_per_round,
        )
        trace.event("start", f"{cfg.algorithm} on {cfg.data.dataset}: {cfg.rounds} rounds, {comm.size} ranks")
        server = Server(
            cfg=cfg, size=comm.size, algorithm=algorithm, model=model,
            test_batches=BatchMaker(data.x_test, data.y_test, data.mean, data.std),
            client_sizes=sizes, trace=trace, progress=RoundProgress(cfg.rounds, cfg.runtime.progress),
        )

    empty = np.zeros(flat.size + 1, dtype=np.float64)
    try:
        for r in range(cfg.rounds):
            plan = comm.bcast(server.plan(r) if server else None)
            comm.Bcast(global_params)
            if group is not None:
                summed, records = group.run(plan, global_params)
            else:
                summed, records = empty, np.zeros(0, dtype=CLIENT_ROUND_DTYPE)
            total = np.empty_like(summed) if is_server else None
            comm.Reduce(summed, total)
            gathered = np.empty(len(plan.clients), dtype=CLIENT_ROUND_DTYPE) if is_server else None
            comm.Gatherv(records, gathered, plan.counts(comm.size) if is_server else None)
            if server is not None:
                global_params = server.finish_round(plan, global_params, total, gathered)
    except BaseException as err:
        if server is not None:
            server.progress.close()
            server.trace.event("error", f"{type(err).__name__}: {err}", level="error")
            server.trace.close()
        raise
    if server is None:
        return None
    server.progress.close()
    wall = time.perf_counter() - started
    server.trace.event("finish", f"{cfg.rounds} rounds in {wall:.2f} s")
    server.trace.close()
    return RunSummary(
        trace_path=str(server.trace.path), rounds=server.all_rounds(), wall_time_s=wall,
        trace_write_s=server.trace.write_seconds, ranks=comm.size,
    )
