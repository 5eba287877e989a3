"""RaFFM (Yu et al., arXiv 2310.00247): resource-aware federated foundation models.

Every round rank 0 applies salient parameter prioritisation to the global ViT (function-preserving), so
leading slices of every weight hold its most salient units. Each client trains the largest subnetwork of
the elastic ladder (``raffm.head_ratios`` x ``raffm.mlp_ratios``, uniform over blocks) whose *measured*
training memory fits its budget; clients no subnetwork fits are ``oom``. Only the subnetwork travels
(4 bytes x its parameters each way) and its FLOPs are counted on the subnetwork itself. The server averages
each entry over the clients that trained it (HeteroFL-style); entries nobody trained keep their value.

``faithful_to_code`` follows the authors' code (yusx-swapp/RaFFM) instead: per-layer random widths seeded
by (round, client) regardless of memory (so a client may be ``oom``), the cohort's first client trains the
full model, and every entry is divided by the weight of all clients (entries a client did not train count
as zeros). docs/algorithms-fedpeft-raffm.md lists every inferred choice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from emulator import seeding
from emulator.algorithms.base import Algorithm, ClientResult, ClientTask, WorkEstimate, local_sgd
from emulator.algorithms.raffm_subnet import (
    SubnetSpec,
    Subnetwork,
    full_spec,
    random_spec,
    salient_parameter_prioritization,
    spec_ratios,
    uniform_spec,
    vit_layout,
)
from emulator.algorithms.registry import register_algorithm
from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.devices.flops import FlopCache
from emulator.devices.memory import MemoryCache, optimizer_state_factor
from emulator.errors import UserError
from emulator.evaluation import evaluate
from emulator.flat import FlatModel
from emulator.records import STATUS_OK
from emulator.roles.plan import sample_cohort

# A random stream of its own for the authors'-code size draws (seeding's STREAM_* ids are 0-5).
STREAM_RAFFM = 101
SUBNET_CACHE = 4  # built subnetworks kept per rank (a ViT-B copy is ~340 MB)

CLIENTS_DTYPE = np.dtype([
    ("round", "<i4"),
    ("client", "<i4"),
    ("status", "u1"),  # records.STATUS_*
    ("head_ratio", "<f4"),  # kept fraction of each head's Q/K/V dims (mean over blocks); NaN: none fits
    ("mlp_ratio", "<f4"),  # kept fraction of the MLP hidden units (mean over blocks)
    ("size_ratio", "<f4"),  # subnetwork parameters / full model parameters
    ("params", "<i8"),  # subnetwork parameters (elements of its flat state); 0 when none fits
    ("peak_bytes", "<i8"),  # measured training peak of the subnetwork for this client's batch
    ("budget_bytes", "<i8"),
])

EVAL_DTYPE = np.dtype([
    ("round", "<i4"),
    ("head_ratio", "<f4"),
    ("mlp_ratio", "<f4"),
    ("size_ratio", "<f4"),
    ("params", "<i8"),
    ("test_accuracy", "<f4"),
    ("test_loss", "<f4"),
])


@dataclass(frozen=True)
class SpecCost:
    """One subnetwork's measured training cost at the configured batch size."""

    spec: SubnetSpec
    size: int  # flat elements
    state_bytes: int  # params + grads + optimizer state + buffers
    activation_bytes: int  # saved activations of one step at the batch size
    per_sample_flops: float
    update_flops: float

    def peak(self, num_samples: np.ndarray, batch_size: int) -> np.ndarray:
        largest = np.minimum(np.asarray(num_samples, dtype=np.int64), batch_size)
        return self.state_bytes + (self.activation_bytes * largest) // batch_size

    def flops(self, num_samples: np.ndarray, epochs: int, batch_size: int) -> np.ndarray:
        n = np.asarray(num_samples, dtype=np.int64)
        return epochs * (n * self.per_sample_flops + (-(-n // batch_size)) * self.update_flops)


@dataclass(frozen=True)
class RoundInfo:
    """Sent in the plan: the ladder's costs (so workers pick exactly what rank 0 costed), or the draws."""

    ladder: tuple[SpecCost, ...] = ()
    assigned: dict[int, SubnetSpec] = field(default_factory=dict)  # faithful_to_code: client -> spec


@dataclass
class SubnetResult(ClientResult):
    index: np.ndarray | None = None  # where ``params`` sit in the full flat state


def choose(ladder: tuple[SpecCost, ...], num_samples: int, budget_bytes: int, batch_size: int) -> SpecCost | None:
    """The largest ladder entry whose training peak fits the budget (budget <= 0: no limit); None if none."""
    best = None
    for cost in ladder:
        fits = budget_bytes <= 0 or int(cost.peak(np.array([num_samples]), batch_size)[0]) <= budget_bytes
        if fits and (best is None or cost.size > best.size):
            best = cost
    return best


@register_algorithm("raffm")
class RaFFM(Algorithm):
    def __init__(
        self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker, num_classes: int
    ) -> None:
        super().__init__(cfg=cfg, model=model, flat=flat, batches=batches, num_classes=num_classes)
        r = cfg.raffm
        self.layout = vit_layout(model)
        self.full = full_spec(self.layout)
        # The ladder: uniform widths, smallest first; equal specs (rounding) appear once.
        specs: dict[SubnetSpec, tuple[float, float]] = {}
        for hr in r.head_ratios:
            for mr in r.mlp_ratios:
                specs.setdefault(uniform_spec(self.layout, hr, mr), (hr, mr))
        self.ladder_specs = list(specs)
        self.ladder_ratios = specs
        self._subnets: OrderedDict[SubnetSpec, Subnetwork] = OrderedDict()
        self._costs: dict[SubnetSpec, SpecCost] = {}
        self._ladder: tuple[SpecCost, ...] | None = None
        self._info: RoundInfo | None = None
        self._cohort: np.ndarray | None = None
        self._client_sizes: np.ndarray | None = None
        self._round = -1

    # ---- subnetworks ------------------------------------------------------------------------------------
    def subnetwork(self, spec: SubnetSpec) -> Subnetwork:
        """The built subnetwork for ``spec`` (kept in a small per-rank cache)."""
        sub = self._subnets.get(spec)
        if sub is None:
            sub = Subnetwork(self.model, self.layout, spec)
            self._subnets[spec] = sub
            while len(self._subnets) > SUBNET_CACHE:
                self._subnets.popitem(last=False)
        else:
            self._subnets.move_to_end(spec)
        return sub

    def cost(self, spec: SubnetSpec) -> SpecCost:
        """Measured memory and counted FLOPs of training ``spec`` at the batch size (cached per spec)."""
        hit = self._costs.get(spec)
        if hit is None:
            train = self.cfg.train
            sub = self.subnetwork(spec)
            shape = tuple(self.batches.x.shape[1:])
            device = next(sub.module.parameters()).device
            memory = MemoryCache(
                sub.module, sample_shape=shape, num_classes=self.num_classes, device=device,
                optimizer_factor=optimizer_state_factor("sgd", train.momentum),
            ).training(train.batch_size)
            flops = FlopCache(sub.module, sample_shape=shape, num_classes=self.num_classes)
            update = flops.update_flops(train.batch_size)
            hit = SpecCost(
                spec=spec, size=sub.size,
                state_bytes=memory.total_bytes - memory.activations_bytes,
                activation_bytes=memory.activations_bytes,
                per_sample_flops=(flops.training_step(train.batch_size) - update) / train.batch_size,
                update_flops=float(update),
            )
            self._costs[spec] = hit
        return hit

    def ladder(self) -> tuple[SpecCost, ...]:
        if self._ladder is None:
            self._ladder = tuple(sorted((self.cost(s) for s in self.ladder_specs), key=lambda c: c.size))
        return self._ladder

    def evaluate_subnetwork(
        self, spec: SubnetSpec, *, test_batches: BatchMaker, batch_size: int
    ) -> tuple[float, float]:
        """(accuracy, loss) of the global model's ``spec`` subnetwork (post-training deployment at any size)."""
        sub = self.subnetwork(spec)
        sub.load(self.global_params)
        return evaluate(sub.module, test_batches, batch_size)

    # ---- rank 0 -----------------------------------------------------------------------------------------
    def begin_round(self, *, round: int) -> Any:
        if self.cfg.raffm.spp:
            self.flat.set(self.global_params)
            salient_parameter_prioritization(self.model)
            self.global_params = self.flat.get()
        if self.cfg.raffm.faithful_to_code:
            self._cohort = self._expected_cohort(round)
            assigned = {int(c): self._drawn_spec(round, int(c)) for c in self._cohort[1:]}
            if len(self._cohort):
                assigned[int(self._cohort[0])] = self.full  # the authors' first client trains the full model
            self._info = RoundInfo(assigned=assigned)
        else:
            self._info = RoundInfo(ladder=self.ladder())
        return self._info

    def _drawn_spec(self, round_: int, client: int) -> SubnetSpec:
        r = self.cfg.raffm
        rng = seeding.rng(self.cfg.seed, STREAM_RAFFM, round_, client)
        return random_spec(self.layout, r.head_ratios, r.mlp_ratios, rng)

    def _expected_cohort(self, round_: int) -> np.ndarray:
        """The cohort the server samples this round (the authors' mode needs client ids before costing).

        ``estimate_work`` receives sample counts only; the cohort is recomputed exactly as the server draws
        it, and ``estimate_work`` checks that the counts match.
        """
        if self._client_sizes is None:
            from emulator.runner import make_shards  # lazy: the runner imports the algorithms

            self._client_sizes = make_shards(self.cfg, self.batches.y).sizes
        eligible = np.flatnonzero(self._client_sizes > 0)
        keep = min(self.cfg.clients_per_round, len(eligible))
        k = min(math.ceil(keep * self.cfg.overcommit), len(eligible))
        return sample_cohort(self.cfg.seed, round_, eligible, k)

    def _cohort_specs(self, num_samples: np.ndarray, budget: np.ndarray) -> list[SpecCost | None]:
        train = self.cfg.train
        if self.cfg.raffm.faithful_to_code:
            cohort, info = self._cohort, self._info
            assert cohort is not None and info is not None and self._client_sizes is not None
            if len(cohort) != len(num_samples) or not np.array_equal(self._client_sizes[cohort], num_samples):
                raise RuntimeError("raffm.faithful_to_code: the server's cohort differs from the one recomputed")
            return [self.cost(info.assigned[int(c)]) for c in cohort]
        ladder = self.ladder()
        return [choose(ladder, int(n), int(b), train.batch_size) for n, b in zip(num_samples, budget, strict=True)]

    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        train = self.cfg.train
        n = np.asarray(num_samples, dtype=np.int64)
        budget = np.zeros(len(n), np.int64) if budget_bytes is None else np.asarray(budget_bytes, np.int64)
        chosen = self._cohort_specs(n, budget)
        smallest = self.ladder()[0]
        flops = np.zeros(len(n))
        peak = np.zeros(len(n), np.int64)
        nbytes = np.zeros(len(n), np.int64)
        for i, cost in enumerate(chosen):
            c = smallest if cost is None else cost  # none fits: the smallest one's peak marks it oom
            flops[i] = c.flops(n[i : i + 1], train.local_epochs, train.batch_size)[0]
            peak[i] = c.peak(n[i : i + 1], train.batch_size)[0]
            nbytes[i] = 4 * c.size
        return WorkEstimate(flops=flops, peak_bytes=peak, bytes_down=nbytes, bytes_up=nbytes.copy())

    def conclude_round(
        self, *, round: int, summed: np.ndarray, records: np.ndarray, extras: list[np.ndarray]
    ) -> None:
        self._round = round
        size = self.flat.size
        sums, counts, total = summed[:size], summed[size : 2 * size], float(summed[-1])
        if self.cfg.raffm.faithful_to_code:
            if total > 0:  # the authors' average: untrained entries count as zeros
                self.global_params = (sums / total).astype(np.float32)
        else:
            covered = counts > 0
            new = self.global_params.copy()
            new[covered] = (sums[covered] / counts[covered]).astype(np.float32)
            self.global_params = new
        if self.trace is not None:
            self.trace.append("raffm/clients", self._client_rows(round, records))

    def _client_rows(self, round_: int, records: np.ndarray) -> np.ndarray:
        budget = records["memory_budget_bytes"].astype(np.int64)
        chosen = self._cohort_specs(records["num_samples"].astype(np.int64), budget)
        rows = np.zeros(len(records), dtype=CLIENTS_DTYPE)
        full = self.flat.size
        rows["round"] = round_
        rows["client"] = records["client"]
        rows["status"] = records["status"]
        rows["peak_bytes"] = records["peak_memory_bytes"]
        rows["budget_bytes"] = budget
        for i, cost in enumerate(chosen):
            if cost is None:
                rows[i]["head_ratio"] = rows[i]["mlp_ratio"] = rows[i]["size_ratio"] = math.nan
                continue
            head, mlp = spec_ratios(self.layout, cost.spec)
            rows[i]["head_ratio"], rows[i]["mlp_ratio"] = head, mlp
            rows[i]["size_ratio"] = cost.size / full
            rows[i]["params"] = cost.size
        return rows

    def evaluate(self, *, test_batches: BatchMaker, batch_size: int) -> tuple[float, float]:
        result = super().evaluate(test_batches=test_batches, batch_size=batch_size)
        last = self._round + 1 == self.cfg.rounds
        if last and self.cfg.raffm.eval_sizes and self.trace is not None:
            self.trace.append("raffm/eval", self.evaluate_sizes(test_batches=test_batches, batch_size=batch_size))
        return result

    def evaluate_sizes(self, *, test_batches: BatchMaker, batch_size: int) -> np.ndarray:
        """Test accuracy of every ladder size of the current global model (``EVAL_DTYPE`` rows)."""
        rows = np.zeros(len(self.ladder_specs), dtype=EVAL_DTYPE)
        order = sorted(self.ladder_specs, key=lambda s: self.subnetwork(s).size)
        for i, spec in enumerate(order):
            acc, loss = self.evaluate_subnetwork(spec, test_batches=test_batches, batch_size=batch_size)
            hr, mr = self.ladder_ratios[spec]
            size = self.subnetwork(spec).size
            rows[i] = (self._round, hr, mr, size / self.flat.size, size, acc, loss)
        return rows

    def trace_layout(self) -> dict[str, np.dtype]:
        return {"raffm/clients": CLIENTS_DTYPE, "raffm/eval": EVAL_DTYPE}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The global full weights, as the last SPP left them ordered.

        SPP is a pure function of those weights (re-applied in the next ``begin_round``), subnetworks are
        leading slices of them and their costs are re-measured on demand, so nothing else is state.
        """
        return {"global_params": self.global_params.copy()}, {"round": int(self._round)}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        params = np.ascontiguousarray(arrays["global_params"], dtype=np.float32)
        if params.shape != (self.flat.size,):
            raise UserError(f"raffm checkpoint: {params.size} weights saved, this model has {self.flat.size}; "
                            "resume with the config the run was started with")
        self.global_params = params.copy()
        self._round = int(meta.get("round", -1))

    # ---- every rank -------------------------------------------------------------------------------------
    def accumulator_size(self, info: Any) -> int:
        return 2 * self.flat.size + 1  # Σ w·params | Σ w per entry | Σ w over clients

    def accumulate(self, acc: np.ndarray, result: ClientResult, scratch: np.ndarray) -> None:
        assert isinstance(result, SubnetResult) and result.index is not None
        size = self.flat.size
        idx = result.index  # distinct positions: plain fancy-index adds are exact
        acc[idx] += result.weight * result.params.astype(np.float64)
        acc[size + idx] += result.weight
        acc[-1] += result.weight

    def client_spec(self, task: ClientTask, info: RoundInfo | None, budget_bytes: int) -> SubnetSpec:
        """The subnetwork this client trains: what rank 0 costed for it."""
        if info is None:
            return self.full
        if info.assigned:
            return info.assigned[task.client]
        cost = choose(info.ladder, len(task.indices), budget_bytes, self.cfg.train.batch_size)
        # Only clients that fit are ever run; with no budget (unit tests) the largest entry is used.
        return (cost or info.ladder[0]).spec

    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        sub = self.subnetwork(self.client_spec(task, info, budget_bytes))
        sub.load(global_params)
        model = sub.module
        model.train()
        steps, loss = local_sgd(model, model.parameters(), task=task, batches=self.batches, train=self.cfg.train)
        return SubnetResult(
            params=sub.flat.get(),
            weight=float(len(task.indices)),
            steps=steps,
            train_loss=loss,
            status=STATUS_OK,
            index=sub.index,
        )
