"""The ``pretrain`` pool source: train timm models on a source dataset (arrays in), resumably; and a linear probe.

``pretrain_pool`` trains each model from random init on ``(x, y)`` and then cuts the trained models into a pool.
After every epoch it checkpoints the model and optimizer state (safetensors) plus a small JSON into
``checkpoint_dir`` (default ``<path>.partial/``), so running the same call again resumes after the last finished
epoch. Randomness is keyed by (seed, model index, epoch) rather than carried along, so a resumed run computes
exactly what an uninterrupted one does.

``linear_probe`` measures how good a chain of pool blocks is as a frozen feature extractor: closed-form ridge
regression on globally pooled features, test accuracy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pools.blocks import cut_model, describe_blocks
from pools.errors import PoolError
from pools.sources import check_models, check_new_path, model_spec, timm_kwargs
from pools.stitch import stitched
from pools.store import Pool, one_line, write_pool

CHECKPOINT_VERSION = 1
STATE_JSON = "state.json"
OPTIMIZERS = ("sgd", "adamw")

BatchCallback = Callable[..., None]  # on_batch(*, model, model_index, epoch, batch, loss)


def _seed(seed: int, *key: int) -> int:
    """A 63-bit torch seed for (seed, *key), independent across keys."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _check_arrays(x: np.ndarray, y: np.ndarray, num_classes: int, what: str = "x, y") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise PoolError(f"{what}: images must be a uint8 array [N, C, H, W]; got {got}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.kind not in "iu":
        got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise PoolError(f"{what}: labels must be an integer array [N] matching {x.shape[0]} images; got {got}")
    if x.shape[0] == 0:
        raise PoolError(f"{what}: no samples")
    if num_classes < 2 or y.min() < 0 or y.max() >= num_classes:
        raise PoolError(f"{what}: labels must lie in [0, num_classes={num_classes}); got [{y.min()}, {y.max()}]")


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W] scaled to [0, 1] (chunked: no float copy of x)."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        squares += (part * part).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return [float(m) for m in mean], [float(max(s, 1e-3)) for s in std]


def to_input(x: np.ndarray, mean: Sequence[float], std: Sequence[float], input_size: int, device: Any) -> torch.Tensor:
    """uint8 images [B, C, H, W] -> normalised float32 at ``input_size`` (bilinear resize when the size differs).

    Float arrays are taken as already prepared and only resized.
    """
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if t.dtype == torch.uint8:
        t = t.float().div_(255.0)
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        t = (t - m) / s
    else:
        t = t.float()
    if t.shape[-2:] != (input_size, input_size):
        t = F.interpolate(t, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return t


def _data_digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str((x.shape, str(x.dtype), y.shape, str(y.dtype))).encode())
    h.update(np.ascontiguousarray(x).data)
    h.update(np.ascontiguousarray(y).data)
    return h.hexdigest()


def _batches(n: int, batch_size: int) -> int:
    """Batches per epoch: full batches, plus the remainder unless it is a single sample (BatchNorm needs 2)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or (full == 0 and rest > 0) else 0)


# --------------------------------------------------------------------------- checkpoints (safetensors + JSON)
def _save_checkpoint(file: Path, model: nn.Module, opt: torch.optim.Optimizer, *, epochs_done: int, fp: str) -> None:
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    scalars: dict[str, Any] = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"epochs_done": str(epochs_done), "fingerprint": fp, "opt_scalars": json.dumps(scalars)}
    tmp = file.with_name(file.name + ".tmp")
    safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, file)


def _checkpoint_epochs(file: Path, fp: str) -> int:
    """Epochs done according to a model checkpoint file (0 when absent); PoolError when unreadable or foreign."""
    if not file.is_file():
        return 0
    try:
        with safetensors.safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:
        raise PoolError(f"checkpoint {file} is corrupt ({one_line(err)}); delete it to redo that model") from None
    if meta.get("fingerprint") != fp:
        raise PoolError(
            f"checkpoint {file} belongs to a different pretraining run (other data or settings); "
            "delete its folder or pass another checkpoint_dir"
        )
    return int(meta.get("epochs_done", "0"))


def _load_checkpoint(file: Path, model: nn.Module, opt: torch.optim.Optimizer | None, device: Any) -> None:
    try:
        with safetensors.safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = safetensors.torch.load_file(str(file), device=str(device))
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        if opt is not None:
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("opt."):
                    _, idx, name = key.split(".", 2)
                    state.setdefault(int(idx), {})[name] = value
            for key, value in json.loads(meta.get("opt_scalars", "{}")).items():
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = value
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except PoolError:
        raise
    except Exception as err:
        raise PoolError(f"checkpoint {file} cannot be loaded ({one_line(err)}); delete it to redo that model") from None


def _write_state(ckpt: Path, payload: dict[str, Any]) -> None:
    tmp = ckpt / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, ckpt / STATE_JSON)


def _make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


# --------------------------------------------------------------------------- pretraining
def pretrain_pool(
    path: str | os.PathLike[str],
    *,
    models: list[str],
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    input_size: int,
    dataset: str | dict[str, Any] | None = None,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    vit_groups: int = 4,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_epochs_this_call: int | None = None,
    on_batch: BatchCallback | None = None,
) -> Pool | None:
    """Train each timm model in ``models`` on ``(x, y)`` from random init, then cut them into a pool at ``path``.

    ``x``: uint8 images [N, C, H, W] (normalised per channel with their own mean/std, resized to ``input_size``
    when H, W differ); ``y``: integer labels in ``[0, num_classes)``. Optimiser ``sgd`` (momentum 0.9, Nesterov)
    or ``adamw``, learning rate cosine-annealed per batch from ``lr`` to 0 over all epochs, cross-entropy loss.
    ``dataset`` describes the data for the manifest (a name or a dict).

    After every epoch the model and optimizer state go to ``checkpoint_dir`` (default ``<path>.partial``); the
    same call run again resumes there (a checkpoint of another run — other data or settings — is a PoolError).
    ``max_epochs_this_call`` stops after that many epochs (all models together) and returns None, leaving the
    checkpoints to resume from. ``on_batch(model=, model_index=, epoch=, batch=, loss=)`` is called after every
    optimisation step. When every model is trained the pool is written and the checkpoint folder deleted.
    Deterministic given ``seed`` (on CPU; cuDNN kernels may differ run to run).
    """
    path = Path(path)
    check_new_path(path, overwrite)
    check_models(models)
    _check_arrays(x, y, num_classes)
    if optimizer not in OPTIMIZERS:
        raise PoolError(f"optimizer = {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("input_size", input_size)):
        if not (isinstance(value, int) and value >= 1):
            raise PoolError(f"{key} = {value!r}: must be an integer >= 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise PoolError(f"lr = {lr!r}: must be a positive number")
    if max_epochs_this_call is not None and max_epochs_this_call < 0:
        raise PoolError(f"max_epochs_this_call = {max_epochs_this_call!r}: must be >= 0")

    in_chans = int(x.shape[1])
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean, std = channel_stats(x)
    n = int(x.shape[0])
    nb = _batches(n, batch_size)
    total_steps = epochs * nb
    settings = {
        "models": list(models),
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "input_size": input_size,
        "in_chans": in_chans,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "data_sha256": _data_digest(x, y),
    }
    fp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else path.with_name(path.name + ".partial")
    ckpt.mkdir(parents=True, exist_ok=True)
    files = [ckpt / f"{i:02d}-{name.replace('/', '_')}.safetensors" for i, name in enumerate(models)]
    done = [_checkpoint_epochs(f, fp) for f in files]
    record = {"version": CHECKPOINT_VERSION, "fingerprint": fp, "settings": settings}
    _write_state(ckpt, {**record, "epochs_done": dict(zip(models, done, strict=True))})

    bar = tqdm(
        total=len(models) * total_steps,
        initial=sum(min(d, epochs) for d in done) * nb,
        desc="pretrain",
        unit="batch",
        disable=not progress,
        dynamic_ncols=True,
    )
    budget = max_epochs_this_call
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for i, name in enumerate(models):
                if done[i] >= epochs:
                    continue
                if budget is not None and budget <= 0:
                    return None
                kwargs = timm_kwargs(name, input_size=input_size, in_chans=in_chans, num_classes=num_classes)
                torch.manual_seed(_seed(seed, i))
                model = timm.create_model(name, pretrained=False, **kwargs).to(dev)
                opt = _make_optimizer(optimizer, model, lr, weight_decay)
                if done[i] > 0:
                    _load_checkpoint(files[i], model, opt, dev)
                for epoch in range(done[i], epochs):
                    if budget is not None:
                        if budget <= 0:
                            return None
                        budget -= 1
                    _train_epoch(
                        model,
                        opt,
                        x,
                        y,
                        mean=mean,
                        std=std,
                        input_size=input_size,
                        batch_size=batch_size,
                        nb=nb,
                        lr=lr,
                        step0=epoch * nb,
                        total_steps=total_steps,
                        seed=_seed(seed, i, epoch),
                        order_seed=(seed, i, epoch),
                        device=dev,
                        bar=bar,
                        model_name=name,
                        model_index=i,
                        epoch=epoch,
                        on_batch=on_batch,
                    )
                    _save_checkpoint(files[i], model, opt, epochs_done=epoch + 1, fp=fp)
                    done[i] = epoch + 1
                    _write_state(ckpt, {**record, "epochs_done": dict(zip(models, done, strict=True))})
                del model, opt
    finally:
        bar.close()

    # every model is trained: cut them into the pool
    pairs: list[tuple[nn.Module, Any]] = []
    records = []
    for i, name in enumerate(models):
        kwargs = timm_kwargs(name, input_size=input_size, in_chans=in_chans, num_classes=num_classes)
        model = timm.create_model(name, pretrained=False, **kwargs)
        _load_checkpoint(files[i], model, None, "cpu")
        model.eval()
        blocks = cut_model(model, name, vit_groups=vit_groups)
        infos = describe_blocks(blocks, model_name=name, input_size=input_size, in_chans=in_chans)
        pairs.extend(zip(blocks, infos, strict=True))
        records.append(model_spec(model, name, kwargs, vit_groups=vit_groups, mean=mean, std=std))
    description = dataset if isinstance(dataset, dict) else {"name": dataset} if dataset else {}
    source = {
        "kind": "pretrain",
        "models": records,
        "dataset": {
            **description,
            "samples": n,
            "shape": list(x.shape[1:]),
            "num_classes": num_classes,
            "sha256": settings["data_sha256"],
        },
        "normalize": {"mean": mean, "std": std},
        **{k: settings[k] for k in ("epochs", "batch_size", "lr", "seed", "optimizer", "weight_decay")},
        "schedule": "cosine per batch",
        "vit_groups": vit_groups,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    pool = write_pool(path, blocks=pairs, input_size=input_size, in_chans=in_chans, source=source, overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return pool


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mean: list[float],
    std: list[float],
    input_size: int,
    batch_size: int,
    nb: int,
    lr: float,
    step0: int,
    total_steps: int,
    seed: int,
    order_seed: tuple[int, int, int],
    device: torch.device,
    bar: Any,
    model_name: str,
    model_index: int,
    epoch: int,
    on_batch: BatchCallback | None,
) -> None:
    torch.manual_seed(seed)  # dropout / drop-path draws of this epoch
    base, *key = order_seed
    order = np.random.default_rng(np.random.SeedSequence(base, spawn_key=tuple(key))).permutation(x.shape[0])
    model.train()
    for b in range(nb):
        idx = np.sort(order[b * batch_size : (b + 1) * batch_size])
        step = step0 + b
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
        inputs = to_input(x[idx], mean, std, input_size, device)
        labels = torch.from_numpy(y[idx].astype(np.int64)).to(device)
        loss = F.cross_entropy(model(inputs), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PoolError(f"pretraining {model_name!r} diverged (loss {value}) in epoch {epoch + 1}; lower lr")
        bar.update(1)
        if b % 10 == 0 or b == nb - 1:
            bar.set_postfix(model=model_name, epoch=f"{epoch + 1}", loss=f"{value:.3f}", refresh=False)
        if on_batch is not None:
            on_batch(model=model_name, model_index=model_index, epoch=epoch, batch=b, loss=value)


# --------------------------------------------------------------------------- linear probe
def _chain(pool: Pool, name_chain: Sequence[str], seed: int) -> nn.Module:
    if not name_chain:
        raise PoolError("linear_probe needs at least one block name")
    infos = [pool.info(name) for name in name_chain]
    if not infos[0].is_first:
        raise PoolError(f"chain starts with {infos[0].name}, which does not take the image; start with a block 0")
    blocks = [pool.block(name) for name in name_chain]
    # consecutive blocks of one model need no stitching
    own = all(a.model == b.model and b.index == a.index + 1 for a, b in itertools.pairwise(infos))
    if own:
        return nn.Sequential(*blocks).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the stitching layers' random init
        return stitched(list(zip(blocks, infos, strict=True)), pool.input_size).eval()


def _features(
    chain: nn.Module,
    x: np.ndarray,
    *,
    mean: list[float],
    std: list[float],
    input_size: int,
    prefix: int,
    batch_size: int,
) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            h = chain(to_input(x[start : start + batch_size], mean, std, input_size, "cpu"))
            if h.ndim == 4:  # feature map -> global average pool
                h = h.mean(dim=(2, 3))
            elif h.ndim == 3:  # tokens -> mean over the patch tokens
                h = h[:, prefix:].mean(dim=1)
            out.append(h.double().numpy())
    return np.concatenate(out)


def linear_probe(
    pool: Pool,
    name_chain: Sequence[str],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    ridge: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Test accuracy of a ridge-regression classifier on the frozen features of a chain of pool blocks.

    The images (uint8 [N, C, H, W], normalised with the first block's model statistics; float arrays are taken as
    prepared) go through the blocks in order (stitched with ``pools.stitch.stitched``, layers randomly initialised
    from ``seed``, unless they are consecutive blocks of one model), are globally average pooled (tokens: mean of
    the patch tokens), standardised, and one-hot targets are fitted in closed form with ridge
    ``ridge * trace(X^T X) / d``. Returns the fraction of ``x_test`` classified correctly.
    """
    for what, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        if not isinstance(xs, np.ndarray) or xs.ndim != 4:
            raise PoolError(f"linear_probe {what} images must be an array [N, C, H, W]")
        if not isinstance(ys, np.ndarray) or ys.shape != (xs.shape[0],):
            raise PoolError(f"linear_probe {what} labels must be an array [N] matching the images")
    chain = _chain(pool, name_chain, seed)
    first, last = pool.info(name_chain[0]), pool.info(name_chain[-1])
    mean, std = pool.normalization(first.model)
    prefix = last.output.prefix_tokens if last.output.kind == "tokens" else 0
    opts = {"mean": mean, "std": std, "input_size": pool.input_size, "prefix": prefix, "batch_size": batch_size}
    f_train = _features(chain, x_train, **opts)
    f_test = _features(chain, x_test, **opts)
    mu = f_train.mean(axis=0)
    sd = f_train.std(axis=0) + 1e-8
    a_train = np.hstack([(f_train - mu) / sd, np.ones((len(f_train), 1))])
    a_test = np.hstack([(f_test - mu) / sd, np.ones((len(f_test), 1))])
    targets = np.eye(num_classes)[y_train.astype(np.int64)]
    gram = a_train.T @ a_train
    lam = ridge * np.trace(gram) / gram.shape[0]
    weights = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a_train.T @ targets)
    predicted = (a_test @ weights).argmax(axis=1)
    return float((predicted == y_test).mean())
