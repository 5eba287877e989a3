"""One emulation on every rank: set up, then the synchronous rounds of DESIGN.md §3."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from emulator import checkpoint, faults, seeding
from emulator.algorithms import create_algorithm
from emulator.algorithms.stitch_weighting import ClientWeighting
from emulator.batches import BatchMaker
from emulator.comm import Comm, RankFailedError
from emulator.config import Config, to_toml
from emulator.data import ArrayDataset, ClientShards, check_dataset, load_dataset, partition
from emulator.devices import configured_catalogue
from emulator.devices.binding import choose_device, gpu_identity, gpu_nvml_index
from emulator.devices.catalogue import Catalogue, catalogue_text
from emulator.devices.nvml import Meter, PowerSampler, shared_gpu_ranks
from emulator.devices.planner import DevicePlanner, device_table
from emulator.devices.population import Population, make_population, parse_mix
from emulator.flat import FlatModel
from emulator.models import create_model
from emulator.progress import RoundProgress
from emulator.records import CLIENT_DTYPE, CLIENT_ROUND_DTYPE, NVML_SAMPLE_DTYPE
from emulator.roles.client_group import ClientGroup
from emulator.roles.plan import worker_ranks
from emulator.roles.server import RunSummary, Server
from emulator.stopping import RoundAbandonedError, StopSignals
from emulator.trace import TraceWriter
from emulator.watchdog import Watchdog

# torch imports these lazily on the first optimizer or FLOP counter (~1.5 s of CPU, inside round 0:
# rank 0 while it counts FLOPs for the first plan, then every worker in its first client, one after
# the other). Imported on a background thread from the start of run(), they load while the rank
# reads its data; a main-thread import that comes first waits on the module lock.
_LAZY_TORCH_MODULES = ("torch._dynamo",)


def warm_up_imports() -> None:
    """Import torch's lazily loaded modules on a daemon thread (once per process)."""
    missing = [m for m in _LAZY_TORCH_MODULES if m not in sys.modules]
    if missing and not any(t.name == "fedemu-warm-up" for t in threading.enumerate()):
        threading.Thread(target=lambda: [importlib.import_module(m) for m in missing],
                         name="fedemu-warm-up", daemon=True).start()


PACKAGES = ("fedemu", "torch", "torchvision", "timm", "numpy", "h5py", "mpi4py", "gymnasium")


def trace_path(cfg: Config) -> Path:
    if cfg.output.trace:
        return Path(cfg.output.trace)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.dir) / f"{cfg.name}-{stamp}.h5"


def node_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_rank(cfg: Config, comm: Comm) -> int:
    """Split the node's cores between its ranks unless the config says otherwise."""
    if cfg.runtime.threads:
        return cfg.runtime.threads
    return max(1, node_cores() // max(1, comm.node_size))


def evaluation_threads(cfg: Config, threads: int) -> int:
    """Rank 0's torch threads while it evaluates: the node's cores (its workers sleep in the next
    broadcast meanwhile), unless ``runtime.threads`` fixes every rank's count."""
    return cfg.runtime.threads or max(threads, node_cores())


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


def trace_attrs(cfg: Config, comm: Comm, threads: int, eval_threads: int) -> dict[str, str | int | float | bool]:
    versions = _versions()
    return {
        "config": to_toml(cfg),
        "fedemu_version": versions["fedemu"],
        "package_versions": json.dumps(versions),
        "mpi_library": comm.library(),
        "ranks": comm.size,
        "workers": len(worker_ranks(comm.size)),
        "threads_per_rank": threads,
        "eval_threads": eval_threads,
        "hosts": json.dumps(comm.hosts()),
        "seed": cfg.seed,
        "command": " ".join(sys.argv),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def build_population(cfg: Config, catalogue: Catalogue, num_clients: int) -> Population:
    dev = cfg.devices
    return make_population(
        num_clients, mix=parse_mix(dev.mix, catalogue), catalogue=catalogue,
        rng=seeding.rng(cfg.seed, seeding.STREAM_POPULATION), jitter=dev.jitter,
    )


def clients_table(shards: ClientShards, population: Population) -> np.ndarray:
    clients = np.zeros(shards.num_clients, dtype=CLIENT_DTYPE)
    clients["client"] = np.arange(shards.num_clients)
    clients["num_samples"] = shards.sizes
    clients["device"] = population.device
    clients["speed"] = population.speed
    clients["bandwidth"] = population.bandwidth
    return clients


INTERRUPTED = "interrupted"  # the plan's value when rank 0 stops at a round boundary on a signal


def run(
    cfg: Config, comm: Comm, *, weighting: ClientWeighting | None = None, resume: bool = False
) -> RunSummary | None:
    """Run the emulation on this rank; rank 0 returns the summary, other ranks None.

    ``weighting``: FedStitch's client-weighting policy on rank 0 (e.g. ``rl_agent``'s); None = the
    config's default that needs no ``rl_agent`` (data-size weights).
    ``resume``: continue the trace at ``output.trace`` from the newest checkpoint beside it (a
    fresh start when there is none yet).
    """
    started = time.perf_counter()
    warm_up_imports()
    threads = threads_per_rank(cfg, comm)
    torch.set_num_threads(threads)
    # Cheap checks on every rank first: bad input is a clean error, not a hang.
    check_dataset(cfg.data.dataset, root=Path(cfg.data.root))
    catalogue = configured_catalogue(cfg)
    device = torch.device(choose_device(cfg.devices.device, node_rank=comm.node_rank,
                                        cuda_count=torch.cuda.device_count()))
    data = comm.node_share(lambda: load_data(cfg))
    shards = make_shards(cfg, data.y_train)
    model = build_model(cfg, data).to(device)
    flat = FlatModel(model)
    train_batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std, device=device)
    algorithm = create_algorithm(
        cfg.algorithm, cfg=cfg, model=model, flat=flat, batches=train_batches, num_classes=data.num_classes
    )

    is_server = comm.rank == 0
    if weighting is not None and is_server:
        algorithm.use_weighting(weighting)
    meter = Meter(gpu_nvml_index(str(device)))
    sampler = PowerSampler(meter, rank=comm.rank, period_s=cfg.devices.meter_period_s)
    group = None
    if comm.rank in worker_ranks(comm.size):
        group = ClientGroup(
            rank=comm.rank, seed=cfg.seed, algorithm=algorithm, shards=shards, meter=meter, device=device
        )
    # Collectives: every rank calls them.
    eval_threads = evaluation_threads(cfg, threads)
    attrs = trace_attrs(cfg, comm, threads, eval_threads)
    gpus = comm.gather(gpu_identity(str(device)))
    meters = comm.gather(meter.kind)
    sampling = comm.bcast(any(kind != "none" for kind in meters) if is_server else None)

    server = None
    if is_server:
        population = build_population(cfg, catalogue, shards.num_clients)
        attrs.update(
            gpus=json.dumps(gpus), gpu_sharing=json.dumps(shared_gpu_ranks(gpus)),
            meter="nvml" if sampling else "none", catalogue=catalogue_text(catalogue), device=str(device),
        )
        path = trace_path(cfg)
        saved = checkpoint.latest(checkpoint.checkpoint_dir(path)) if resume else None
        if saved is None:
            trace = TraceWriter(
                path, attrs=attrs, clients=clients_table(shards, population),
                label_counts=shards.label_counts(data.y_train, data.num_classes), devices=device_table(catalogue),
                overwrite=cfg.output.overwrite or resume, cohort_size=math.ceil(cfg.clients_per_round * cfg.overcommit),
                tables=algorithm.trace_layout(),
            )
            trace.event("start", f"{cfg.algorithm} on {cfg.data.dataset}: {cfg.rounds} rounds, {comm.size} ranks")
        else:
            attrs.pop("started_at")
            attrs["resumes"] = int(saved.meta.get("resumes", 0)) + 1
            trace = TraceWriter.resume(path, lengths=saved.meta["trace_lengths"], attrs=attrs,
                                       tables=algorithm.trace_layout())
            algorithm.load_state_dict(saved.section("algorithm"), saved.meta["algorithm_state"])
            trace.event("resume", f"from {saved.path.name}: rounds {saved.round + 1}..{cfg.rounds - 1} to go, "
                                  f"{comm.size} ranks", round=saved.round)
        algorithm.attach_trace(trace)
        if not sampling:
            trace.event("meter", f"no energy meter: {meter.reason or 'no GPU'}; measured columns are NaN")
        server = Server(
            cfg=cfg, size=comm.size, algorithm=algorithm, model=model,
            test_batches=BatchMaker(data.x_test, data.y_test, data.mean, data.std, device=device),
            client_sizes=shards.sizes, planner=DevicePlanner(cfg=cfg, catalogue=catalogue, population=population),
            trace=trace, progress=RoundProgress(cfg.rounds, cfg.runtime.progress),
            eval_threads=eval_threads,
        )
        if saved is not None:
            server.restore(saved)
    start = comm.bcast(server.next_round if server else None)
    stop = StopSignals(rank=comm.rank)
    watchdog = Watchdog(cfg.runtime.round_timeout_s, rank=comm.rank, abort=comm.abort,
                        on_timeout=server.on_watchdog if server else None)
    stopped_by: str | None = None

    sampler.start()
    try:
        stop.__enter__()
        for r in range(start, cfg.rounds):
            watchdog.arm(r)
            faults.maybe_inject(comm.rank, r)
            if server is not None and stop.received:
                server.checkpoint(r - 1, reason=stop.received)
                plan = INTERRUPTED
            else:
                plan = server.plan(r) if server else None
            plan = comm.bcast(plan)
            if plan is None:  # the algorithm finished early (e.g. FedStitch reached its depth)
                break
            if isinstance(plan, str) and plan == INTERRUPTED:
                stopped_by = stop.received or "a stop signal"
                break
            state = algorithm.broadcast_state() if is_server else np.empty(plan.state_size, dtype=np.float32)
            comm.Bcast(state)
            if group is not None:
                summed, records, extras = group.run(plan, state)
            else:
                summed = np.zeros(algorithm.accumulator_size(plan.info), dtype=np.float64)
                records, extras = np.zeros(0, dtype=CLIENT_ROUND_DTYPE), []
            total = np.empty_like(summed) if is_server else None
            comm.Reduce(summed, total)
            gathered = np.empty(len(plan.clients), dtype=CLIENT_ROUND_DTYPE) if is_server else None
            comm.Gatherv(records, gathered, plan.counts(comm.size) if is_server else None)
            all_extras = gather_extras(comm, extras) if algorithm.uses_extras else None
            if sampling:
                samples = gather_rows(comm, sampler.drain(), NVML_SAMPLE_DTYPE)
                if server is not None:
                    server.trace.append_nvml(samples)
            if server is not None:
                server.finish_round(plan, total, gathered, all_extras)
                if server.checkpoint_due(r):
                    server.checkpoint(r)
            watchdog.disarm()
    except BaseException as err:
        watchdog.close()
        stop.__exit__(None, None, None)
        sampler.stop()
        if server is not None:
            server.progress.close()
            rank = err.rank if isinstance(err, RankFailedError) else 0
            kind = "abandoned" if isinstance(err, RoundAbandonedError) else "error"
            message = err.message if isinstance(err, RankFailedError) else f"{type(err).__name__}: {err}"
            server.trace.event(kind, message, level="error", rank=rank, round=server.current_round)
            server.trace.close()
        elif comm.size > 1:
            # Print the traceback now (rank 0 may end the job before it would be), then tell rank 0,
            # which records the message in /events and ends the job; then fail as usual.
            traceback.print_exc()
            sys.stderr.flush()
            comm.report_failure(f"{type(err).__name__}: {err}")
        raise
    watchdog.close()
    stop.__exit__(None, None, None)
    sampler.stop()
    if server is None:
        return None
    server.progress.close()
    wall = time.perf_counter() - started
    if stopped_by is None:
        last = int(server.rows[-1]["round"][0]) if server.rows else -1
        if cfg.checkpoint.every and last >= 0 and server.last_checkpoint != last:
            server.checkpoint(last)  # the end is a round boundary too: a later run may add rounds
        server.trace.event("finish", f"{len(server.rows)} rounds in {wall:.2f} s")
    else:
        server.trace.event("stop", f"{stopped_by}: stopped after round {server.last_checkpoint}, "
                                   f"checkpointed; continue with --resume", level="warning",
                           round=server.last_checkpoint)
    server.trace.close()
    return RunSummary(
        trace_path=str(server.trace.path), rounds=server.all_rounds(), wall_time_s=wall,
        trace_write_s=server.trace.write_seconds, ranks=comm.size, stopped_by=stopped_by,
        checkpoint_s=server.checkpoint_s,
    )


def gather_extras(comm: Comm, extras: list[np.ndarray]) -> list[np.ndarray] | None:
    """Per-client float32 vectors of any length onto rank 0, in rank order (lengths pickled, values Gatherv)."""
    lengths = comm.gather([len(e) for e in extras])
    values = np.concatenate(extras) if extras else np.zeros(0, dtype=np.float32)
    counts = [sum(per_rank) for per_rank in lengths] if lengths is not None else None
    out = np.empty(sum(counts), dtype=np.float32) if counts is not None else None
    comm.Gatherv(values.astype(np.float32, copy=False), out, counts)
    if lengths is None or out is None:
        return None
    flat_lengths = [n for per_rank in lengths for n in per_rank]
    return np.split(out, np.cumsum(flat_lengths)[:-1]) if flat_lengths else []


def gather_rows(comm: Comm, rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Variable-length structured rows from every rank onto rank 0 (counts first, then Gatherv)."""
    counts = comm.gather(len(rows))
    out = np.empty(sum(counts), dtype=dtype) if counts is not None else None
    comm.Gatherv(rows, out, counts)
    return out if out is not None else np.zeros(0, dtype=dtype)
