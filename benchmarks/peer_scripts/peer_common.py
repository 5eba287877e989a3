"""What every peer script shares: the exported workload, the model, batches, evaluation.

Runs inside a peer's own venv (torch + numpy only, no fedemu): ``benchmarks/peers.py``
exports the workload (data, shards, cohorts, initial weights) to one ``.npz`` so every
framework trains the same clients on the same data from the same initial model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Workload:
    x_train: torch.Tensor  # uint8 NCHW, normalised per batch (as fedemu and the bare loop do)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    shards: np.ndarray  # (clients, samples) int64 indices
    cohorts: np.ndarray  # (rounds, clients_per_round) client ids
    init: dict[str, torch.Tensor]
    lr: float
    batch_size: int
    local_epochs: int
    eval_batch_size: int
    threads: int
    seed: int
    num_classes: int
    in_chans: int
    width: int


def load(path: str) -> Workload:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    c = int(z["x_train"].shape[1])
    scale = torch.tensor([1 / (255 * s) for s in meta["std"]]).view(1, c, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(meta["mean"], meta["std"], strict=True)]).view(1, c, 1, 1)

    init = {k[len("init/"):]: torch.from_numpy(z[k]) for k in z.files if k.startswith("init/")}
    return Workload(
        x_train=torch.from_numpy(z["x_train"]), y_train=torch.from_numpy(z["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(z["x_test"]), y_test=torch.from_numpy(z["y_test"].astype(np.int64)),
        scale=scale, shift=shift,
        shards=z["shards"], cohorts=z["cohorts"], init=init, lr=meta["lr"], batch_size=meta["batch_size"],
        local_epochs=meta["local_epochs"], eval_batch_size=meta["eval_batch_size"], threads=meta["threads"],
        seed=meta["seed"], num_classes=meta["num_classes"], in_chans=c, width=meta["width"],
    )


def batch(w: Workload, idx: torch.Tensor | np.ndarray, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``idx`` as a normalised float batch and their labels."""
    x, y = (w.x_test, w.y_test) if test else (w.x_train, w.y_train)
    idx = torch.as_tensor(idx)
    return x[idx].float().mul_(w.scale).add_(w.shift), y[idx]


def tiny_cnn(num_classes: int, in_chans: int, width: int = 16) -> nn.Sequential:
    """fedemu's ``tiny_cnn`` layer for layer (same state-dict keys), so one initial state fits all."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.GroupNorm(4, width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, num_classes),
    )


def accuracy(model: nn.Module, w: Workload) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(w.y_test), w.eval_batch_size):
            x, y = batch(w, torch.arange(s, min(s + w.eval_batch_size, len(w.y_test))), test=True)
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(w.y_test)


def peak_rss_mib() -> float:
    """This process's own peak (Linux reports KiB); the parent also samples the whole process tree."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, start: float, accs: list[float], **extra: object) -> None:
    out = {"peer": name, "run_s": time.perf_counter() - start, "accuracy": accs,
           "self_peak_rss_mib": peak_rss_mib(), **extra}
    print("PEER_RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()


def train_client(model: nn.Module, w: Workload, client: int, seed: int) -> int:
    """Local SGD epochs over one client's shard (what fedemu's FedAvg client does); returns samples."""
    model.train()
    idx = torch.from_numpy(w.shards[client])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=w.lr)
    for _ in range(w.local_epochs):
        order = idx[torch.randperm(len(idx), generator=gen)]
        for s in range(0, len(order), w.batch_size):
            x, y = batch(w, order[s : s + w.batch_size])
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return len(idx)
