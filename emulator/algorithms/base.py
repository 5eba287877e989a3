"""The algorithm interface: what a client does in a round and how the server combines it.

Hooks take keyword-only arguments (pfl-research's Aggregator/Callback style) so new
arguments can be added without breaking registered algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.devices.flops import FlopCache
from emulator.devices.memory import MemoryCache, optimizer_state_factor
from emulator.errors import UserError
from emulator.evaluation import evaluate
from emulator.flat import FlatModel
from emulator.roles.plan import assign_lpt

STOP = "stop"  # begin_round's answer when the algorithm has finished before cfg.rounds


def local_sgd(
    net: nn.Module, params: Any, *, task: ClientTask, batches: BatchMaker, train: Any
) -> tuple[int, float]:
    """A client's local SGD epochs over its shard: (steps, mean training loss).

    Batches follow the client's own permutation (``task.rng``) and dropout its own seed, so the
    result does not depend on the rank that runs it.
    """
    torch.manual_seed(task.torch_seed)  # dropout, drop-path: keyed by (round, client)
    opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    steps = 0
    loss_sum = torch.zeros((), dtype=torch.float64)
    for _ in range(train.local_epochs):
        order = task.rng.permutation(task.indices)
        for start in range(0, len(order), train.batch_size):
            x, y = batches(order[start : start + train.batch_size])
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()  # no .item(): avoids a sync per step on GPUs
            steps += 1
    return steps, float(loss_sum) / max(steps, 1)


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round, with its own random streams."""

    round: int
    client: int
    indices: np.ndarray  # the client's shard: indices into the shared training arrays
    rng: np.random.Generator
    torch_seed: int


@dataclass(frozen=True)
class WorkEstimate:
    """Per client: FLOPs of its local work this round, the peak memory it needs, and what it moves.

    ``bytes_down`` / ``bytes_up`` default to the algorithm's ``payload_bytes()`` each way.
    """

    flops: np.ndarray
    peak_bytes: np.ndarray
    bytes_down: np.ndarray | None = None
    bytes_up: np.ndarray | None = None


@dataclass
class ClientResult:
    params: np.ndarray  # what ``accumulate`` adds up: the client's new flat state (FedAvg) or its statistics
    weight: float  # aggregation weight, e.g. its sample count
    steps: int
    train_loss: float
    status: int
    extra: np.ndarray | None = None  # a small per-client float32 vector for rank 0 (e.g. block scores)


class Algorithm:
    """Base class of registered algorithms; one instance per rank, reused across rounds.

    A round, as the runner drives it (DESIGN.md §3):

    - rank 0: ``begin_round`` (None = the algorithm is done: the run ends early) gives a small
      picklable ``info`` that travels in the plan; ``estimate_work`` costs each client;
      ``broadcast_state`` is the float32 buffer every rank receives by ``Bcast``;
    - every worker: ``client_update`` per client, ``accumulate`` into a float64 buffer of
      ``accumulator_size(info)`` (one ``Reduce``); ``ClientResult.extra`` vectors are gathered
      to rank 0 when ``uses_extras``;
    - rank 0: ``conclude_round`` with the reduced sum and the gathered rows and extras, then
      ``evaluate``; ``trace_layout`` names the algorithm's own trace tables, which it appends
      to through the ``trace`` handed to ``attach_trace``.

    The defaults are FedAvg's: the state is the flat model, the accumulator Σ w·params | Σ w.
    """

    uses_extras = False

    def __init__(
        self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker, num_classes: int
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.flat = flat
        self.batches = batches
        self.num_classes = num_classes
        self._flops: FlopCache | None = None
        self._memory: MemoryCache | None = None
        self.global_params = flat.get()  # the server's model state (identical on every rank at start)
        self.trace: Any = None
        self.cohort: np.ndarray | None = None  # rank 0: the round's sampled clients, set before estimate_work

    # ---- rank 0 -------------------------------------------------------------------------------------
    def begin_round(self, *, round: int) -> Any:
        """Control data for this round, sent to every rank in the plan; ``STOP`` ends the run."""
        return None

    def broadcast_state(self) -> np.ndarray:
        """The float32 buffer every rank gets at the start of the round."""
        return self.global_params

    def eligible(self, *, round: int, num_samples: np.ndarray, budget_bytes: np.ndarray) -> np.ndarray | None:
        """Which clients (with data) this round's cohort may be sampled from, as a boolean mask.

        Called after ``begin_round``; None = all of them (the default). The mask must depend only
        on the server's state, so the cohort stays the same for any number of ranks.
        """
        return None

    def assign(self, *, clients: np.ndarray, costs: np.ndarray, workers: list[int]) -> np.ndarray:
        """The rank that runs each client (default: longest-processing-time on ``costs``)."""
        return assign_lpt(costs, workers)

    def conclude_round(
        self, *, round: int, summed: np.ndarray, records: np.ndarray, extras: list[np.ndarray]
    ) -> None:
        """Update the server state from the reduced accumulator; ``extras`` follows ``records``' rows."""
        self.global_params = self.aggregate(
            global_params=self.global_params, update_sum=summed[:-1], weight_sum=float(summed[-1])
        )

    def evaluate(self, *, test_batches: BatchMaker, batch_size: int) -> tuple[float, float]:
        """(accuracy, loss) of the current global model on the held-out set."""
        self.flat.set(self.global_params)
        return evaluate(self.model, test_batches, batch_size)

    def wants_evaluation(self) -> bool:
        """Evaluate this round whatever ``eval_every`` says (e.g. a final model was just built)."""
        return False

    def trace_layout(self) -> dict[str, np.dtype]:
        """Extendable trace datasets this algorithm appends to ("group/name" -> row dtype)."""
        return {}

    def attach_trace(self, trace: Any) -> None:
        self.trace = trace

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rank 0's state after a concluded round, for a checkpoint (``emulator/checkpoint.py``).

        Arrays go into a safetensors file, the dict into JSON (plain str/int/float/bool/None, lists and
        dicts of them; no pickle). Together they must let a fresh instance built from the same config
        continue exactly as this one would: ``load_state_dict(*state_dict())`` then the next
        ``begin_round``. Worker-side caches that are rebuilt on a miss need not be saved.
        Default (FedAvg-like): the global flat state.
        """
        return {"global_params": self.global_params}, {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (on rank 0, before the first resumed round)."""
        self.global_params = np.ascontiguousarray(arrays["global_params"], dtype=np.float32)

    def use_weighting(self, weighting: Any) -> None:
        """A client-weighting policy (FedStitch only)."""
        raise UserError(f"algorithm = {self.cfg.algorithm!r} takes no client-weighting policy (fedstitch does)")

    # ---- every rank ---------------------------------------------------------------------------------
    def accumulator_size(self, info: Any) -> int:
        return self.flat.size + 1

    def accumulate(self, acc: np.ndarray, result: ClientResult, scratch: np.ndarray) -> None:
        """Add one ok client's result into the rank's float64 accumulator."""
        np.multiply(result.params, result.weight, out=scratch[: result.params.size])
        acc[:-1] += scratch[: result.params.size]
        acc[-1] += result.weight

    def payload_bytes(self) -> int:
        """Bytes each way per client and round (the flat float32 state)."""
        return self.flat.nbytes

    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        """What each client's local work costs, asked before the round ("does it fit?").

        ``budget_bytes``: each client's memory budget, for algorithms whose work adapts to it.
        """
        raise NotImplementedError

    def estimate_training(self, *, num_samples: np.ndarray, epochs: int, batch_size: int) -> WorkEstimate:
        """Local SGD over the client's samples, from one counted and measured step at ``batch_size``.

        FLOPs and saved activations both scale linearly with the batch (true of convolutions,
        matmuls, normalisation and elementwise ops), so one step at the configured batch size gives
        every client's FLOPs and the peak of its largest batch, min(batch_size, its samples).
        ``tests/test_work_estimate.py`` checks the scaling against direct measurements.
        """
        if self._flops is None:
            sample_shape = tuple(self.batches.x.shape[1:])
            device = next(self.model.parameters()).device
            self._flops = FlopCache(self.model, sample_shape=sample_shape, num_classes=self.num_classes)
            self._memory = MemoryCache(
                self.model, sample_shape=sample_shape, num_classes=self.num_classes, device=device,
                optimizer_factor=optimizer_state_factor("sgd", self.cfg.train.momentum),
            )
        assert self._memory is not None
        update = self._flops.update_flops(batch_size)  # per step, whatever the batch
        per_sample = (self._flops.training_step(batch_size) - update) / batch_size
        step = self._memory.training(batch_size)
        n = np.asarray(num_samples, dtype=np.int64)
        steps = -(-n // batch_size)
        largest_batch = np.minimum(n, batch_size)
        state = step.total_bytes - step.activations_bytes
        peak = state + (step.activations_bytes * largest_batch) // batch_size
        return WorkEstimate(flops=epochs * (n * per_sample + steps * update), peak_bytes=peak)

    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        """One client's local work; ``global_params`` is this round's broadcast state."""
        raise NotImplementedError

    def aggregate(self, *, global_params: np.ndarray, update_sum: np.ndarray, weight_sum: float) -> np.ndarray:
        """New global state from Σ weight·params (float64) and Σ weight over ok clients."""
        if weight_sum <= 0:
            return global_params  # nobody finished: keep the model
        return (update_sum / weight_sum).astype(np.float32)
