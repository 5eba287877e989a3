"""`fedemu pools build | pretrain | show | probe`: the CLI side of `pools/` (which knows no FL or MPI).

The emulator owns the datasets, so it loads them here and hands `pools` plain arrays.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from emulator.config import Config
from emulator.data import ArrayDataset, load_dataset
from emulator.models import check_model_name


def _check_models(cfg: Config) -> None:
    for i, name in enumerate(cfg.pool.models):
        check_model_name(name, key=f"pool.models[{i}]")


def build(cfg: Config) -> str:
    """Build the pool from its configured source: timm weights, or pretraining here."""
    if cfg.pool.source == "pretrain":
        return pretrain(cfg)
    from pools import build_pool

    _check_models(cfg)
    p = cfg.pool
    started = time.perf_counter()
    pool = build_pool(
        Path(p.path), models=list(p.models), pretrained=p.pretrained, input_size=p.input_size, in_chans=3,
        vit_groups=p.vit_groups, overwrite=p.overwrite,
    )
    seconds = time.perf_counter() - started
    return f"wrote pool {pool.path}: {len(pool)} blocks from {len(p.models)} models in {seconds:.1f} s"


def source_dataset(cfg: Config) -> ArrayDataset:
    """The pretraining task: its own dataset and seed, at the pool's input size."""
    pt = cfg.pool.pretrain
    return load_dataset(
        pt.dataset, root=Path(pt.root), image_size=cfg.pool.input_size, seed=pt.seed, num_classes=pt.num_classes,
        num_samples=pt.num_samples, channels=3, test_fraction=0.1,
    )


def pretrain(cfg: Config) -> str:
    from pools import pretrain_pool

    _check_models(cfg)
    p, pt = cfg.pool, cfg.pool.pretrain
    data = source_dataset(cfg)
    lines = None if _bar(cfg.runtime.progress) or cfg.runtime.progress == "none" else _EpochLines(pt.epochs)
    started = time.perf_counter()
    pool = pretrain_pool(
        Path(p.path), models=list(p.models), x=data.x_train, y=data.y_train, num_classes=data.num_classes,
        epochs=pt.epochs, batch_size=pt.batch_size, lr=pt.lr, optimizer=pt.optimizer, seed=pt.seed,
        input_size=p.input_size, progress=_bar(cfg.runtime.progress), on_batch=lines,
        overwrite=p.overwrite,
        dataset={"name": pt.dataset, "num_classes": data.num_classes, "num_train": data.num_train, "seed": pt.seed},
    )
    if lines is not None:
        lines.flush()
    return f"wrote pool {pool.path}: {len(pool)} blocks, pretrained in {time.perf_counter() - started:.1f} s"


def _bar(mode: str) -> bool:
    """A tqdm bar on a terminal only; batch logs get one line per epoch instead."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class _EpochLines:
    """Batch logs: one plain line per finished (model, epoch) with its mean loss."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.current: tuple[str, int] | None = None
        self.losses: list[float] = []

    def __call__(self, *, model: str, model_index: int, epoch: int, batch: int, loss: float) -> None:
        if self.current != (model, epoch):
            self.flush()
            self.current = (model, epoch)
        self.losses.append(loss)

    def flush(self) -> None:
        if self.current and self.losses:
            model, epoch = self.current
            mean = sum(self.losses) / len(self.losses)
            print(f"pretrain {model} epoch {epoch + 1}/{self.epochs}: mean loss {mean:.4f}", flush=True)
        self.losses = []


def show(path: str) -> str:
    """Every block with its signatures and costs, then a summary of which blocks can follow which."""
    from pools import Pool, join_matrix

    pool = Pool.load(Path(path))
    infos = pool.infos
    rows = [f"pool {pool.path}: {len(infos)} blocks at {pool.input_size}x{pool.input_size}, source "
            f"{pool.source.get('kind', '?')}"]
    head = f"{'block':<28} {'family':<13} {'in':>17} {'out':>17} {'params':>10} {'MFLOPs':>9} {'act KB':>8}"
    rows.append(head)
    for info in infos:
        rows.append(
            f"{info.name:<28} {info.family:<13} {_sig(info.input):>17} {_sig(info.output):>17} "
            f"{info.params:>10,} {info.flops / 1e6:>9.2f} {info.activation_bytes / 1024:>8.1f}"
        )
    joins = join_matrix(infos, pool.input_size)
    by_pair: Counter[tuple[str, str]] = Counter()
    for i, j in zip(*np.nonzero(joins), strict=True):
        by_pair[(infos[i].model, infos[j].model)] += 1
    models = list(dict.fromkeys(info.model for info in infos))
    rows.append(f"joins: {int(joins.sum())} of {joins.size} ordered block pairs can be stitched "
                "(rows: from model, columns: to model)")
    width = max(len(m) for m in models)
    rows.append(" " * (width + 1) + " ".join(f"{m[:12]:>12}" for m in models))
    for a in models:
        rows.append(f"{a:<{width}} " + " ".join(f"{by_pair[(a, b)]:>12}" for b in models))
    return "\n".join(rows)


def _sig(sig: object) -> str:
    kind, channels, reduction = sig.kind, sig.channels, sig.reduction  # type: ignore[attr-defined]
    return f"{'map' if kind == 'map' else 'tok'} {channels}@/{reduction}"


def probe(cfg: Config) -> str:
    """Linear-probe accuracy on the target task (the config's [data]) of each model's whole block chain,
    with the pool's weights and with the same blocks randomly initialised."""
    from pools import Pool, build_pool, linear_probe

    pool = Pool.load(Path(cfg.pool.path))
    d = cfg.data
    target = load_dataset(
        d.dataset, root=Path(d.root), image_size=pool.input_size, seed=cfg.seed, num_classes=d.num_classes,
        num_samples=d.num_samples, channels=3, test_fraction=d.test_fraction,
    )
    if target.in_chans != pool.in_chans:
        target = _to_channels(target, pool.in_chans)
    models = list(dict.fromkeys(info.model for info in pool.infos))
    with _tempdir() as tmp:
        random_pool = build_pool(
            Path(tmp) / "random", models=models, pretrained="none", input_size=pool.input_size,
            in_chans=pool.in_chans, vit_groups=cfg.pool.vit_groups,
        )
        rows = [f"linear probe on {d.dataset} ({target.num_classes} classes, {target.num_train} train / "
                f"{target.num_test} test), whole chain of each model:",
                f"{'model':<28} {'pretrained':>10} {'random':>8}"]
        for model in models:
            chain = [info.name for info in pool.infos if info.model == model]
            args = (target.x_train, target.y_train, target.x_test, target.y_test, target.num_classes)
            trained = linear_probe(pool, chain, *args)
            random = linear_probe(random_pool, chain, *args)
            rows.append(f"{model:<28} {trained:>10.4f} {random:>8.4f}")
    return "\n".join(rows)


def _to_channels(data: ArrayDataset, chans: int) -> ArrayDataset:
    import dataclasses

    def rep(x: np.ndarray) -> np.ndarray:
        return np.repeat(x[:, :1], chans, axis=1)

    return dataclasses.replace(
        data, x_train=rep(data.x_train), x_test=rep(data.x_test), mean=data.mean[:1] * chans, std=data.std[:1] * chans
    )


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="fedemu-probe-")
