"""ProFL (Wu et al., arXiv 2404.13349): progressive block-wise training that fits low-memory clients.

The model is cut into blocks along its architecture (:mod:`emulator.algorithms.profl_blocks`). Training is a
sequence of *steps*; each step trains one block plus its output module, with the blocks before it frozen:

1. shrinking stage (``profl.shrinking = "paper"``), blocks T..1 (back to front), ``profl.shrink_rounds`` each:
   block t + its output module on top of the blocks before it, frozen at their initial weights. It gives every
   block and output module its starting weights (for pre-trained models: adapted to the task).
2. growing stage, blocks 1..T (front to back): block t + its output module on top of the trained, frozen
   blocks 1..t-1. The block freezes by the effective-movement rule (:mod:`emulator.algorithms.profl_metric`).
   The last block's output module is the model's own head, so the final network is exactly the model.

When the last block freezes, ``begin_round`` answers ``STOP``. Clients hold only the step's network (the frozen
prefix, run under ``no_grad`` in eval mode, + active block + output module); ``estimate_work`` measures its
training memory, and the device planner marks the clients that cannot hold it ``oom`` (they are sampled but
excluded, as in FedAvg; over-commitment fills the cohort from the clients that fit).

What travels: the MPI broadcast carries the active block + output module, preceded by the final values of
blocks frozen since some worker rank last ran a client (ranks keep the frozen prefix, so each final block goes
over MPI about once); the accumulator is the active block + output module. Emulated traffic per client: up =
active block + output module; down = that plus the frozen prefix (``profl.download_prefix``: a virtual client
keeps nothing between rounds). Details and the inferred choices: docs/algorithms-profl.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from emulator import seeding
from emulator.algorithms.base import STOP, Algorithm, ClientResult, ClientTask, WorkEstimate, local_sgd
from emulator.algorithms.profl_blocks import PrefixNet, StepNet, output_module, output_width, split_model
from emulator.algorithms.profl_metric import FreezeRule
from emulator.algorithms.registry import register_algorithm
from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.devices.flops import FlopCache
from emulator.devices.memory import MemoryCache, measure_inference_memory, optimizer_state_factor, sample_batch
from emulator.errors import UserError
from emulator.evaluation import evaluate
from emulator.flat import FlatModel
from emulator.records import STATUS_OK

# Own random stream for the output modules' initial weights (same on every rank, apart from the run's streams).
STREAM_PROFL_OUTPUTS = 0x50F1

SHRINK, GROW = "shrink", "grow"

PROFL_ROUND_DTYPE = np.dtype([
    ("round", "<i4"),
    ("stage", "S6"),  # b"shrink" | b"grow"
    ("block", "<i2"),  # the active block, 0 = the first (input side)
    ("num_blocks", "<i2"),
    ("block_round", "<i4"),  # rounds of this step so far, this one included
    ("em", "<f8"),  # effective movement after this round; NaN until W updates were seen
    ("below", "<i2"),  # consecutive checks with em < threshold
    ("frozen", "u1"),  # 1: the step ended with this round (growing: the block is now frozen)
    ("trainable_params", "<i8"),  # active block + output module parameters
    ("frozen_params", "<i8"),  # parameters of the frozen prefix the clients run forward
    ("peak_train_bytes", "<i8"),  # measured training peak of the step at train.batch_size
    ("bytes_down", "<i8"),  # per client
    ("bytes_up", "<i8"),  # per client
    ("weight", "<f8"),  # samples aggregated this round (0: nobody finished, the block did not move)
])


@dataclass(frozen=True)
class ProFLInfo:
    """The round's control data (pickled in the plan)."""

    stage: str
    block: int
    catch_from: int  # the broadcast starts with the final values of blocks [catch_from, catch_to)
    catch_to: int


@dataclass
class _Part:
    """One block, the head or one output module: its floating state tensors and their slice of the state."""

    tensors: list[torch.Tensor]
    is_param: list[bool]
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def param_offsets(self) -> tuple[np.ndarray, list[int]]:
        """(indices of parameter elements within the part, start of each parameter tensor among them)."""
        index, offsets, pos, seen = [], [], 0, 0
        for t, is_param in zip(self.tensors, self.is_param, strict=True):
            n = t.numel()
            if is_param:
                index.append(np.arange(pos, pos + n))
                offsets.append(seen)
                seen += n
            pos += n
        return (np.concatenate(index) if index else np.zeros(0, np.int64)), offsets


@dataclass
class _Cost:
    per_sample_flops: float
    update_flops: int
    state_bytes: int
    activation_bytes: int  # at the reference batch: max(saved for backward, frozen prefix's forward peak)


@register_algorithm("profl")
class ProFL(Algorithm):
    def __init__(
        self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker, num_classes: int
    ) -> None:
        super().__init__(cfg=cfg, model=model, flat=flat, batches=batches, num_classes=num_classes)
        p = cfg.profl
        self.sample_shape = tuple(batches.x.shape[1:])
        self.device = next(model.parameters()).device
        sample, _ = sample_batch(self.sample_shape, num_classes, 2, device=self.device)
        split = split_model(model, cfg.model.name, num_blocks=p.num_blocks, sample=sample)
        self.blocks, self.head, self.shapes = split.blocks, split.head, split.shapes
        self.num_blocks = len(self.blocks)
        width = output_width(self.shapes, p.output_width)
        with torch.random.fork_rng(devices=[]):  # identical on every rank; the run's streams are untouched
            torch.manual_seed(seeding.torch_seed(cfg.seed, STREAM_PROFL_OUTPUTS))
            self.outputs = nn.ModuleList(
                [output_module(self.shapes[t], num_classes, width) for t in range(self.num_blocks - 1)]
            ).to(self.device)
        # State layout: blocks 0..T-1, the head, output modules 0..T-2 (each part contiguous).
        modules: list[nn.Module] = [*self.blocks, self.head, *self.outputs]
        self._parts = self._layout(modules)
        if sum(part.size for part in self._parts[: self.num_blocks + 1]) != flat.size:
            raise RuntimeError("ProFL's blocks and head do not cover the model's state exactly")
        self.state = np.concatenate([self._get(i) for i in range(len(self._parts))])
        order = range(self.num_blocks - 1, -1, -1)
        self.steps = ([(SHRINK, t) for t in order] if p.shrinking == "paper" else []) + [
            (GROW, t) for t in range(self.num_blocks)
        ]
        self._nets: dict[tuple[str, int], StepNet] = {}
        self._costs: dict[tuple[tuple[str, int], int], _Cost] = {}
        # Rank 0's progress.
        self.step_index = 0
        self._rule: FreezeRule | None = None
        self._info: ProFLInfo | None = None
        self._workers: list[int] | None = None
        self._known: dict[int, int] = {}  # worker rank -> blocks [0, n) whose final values it holds
        self._eval_step = self.steps[0]
        self._round_peak = 0

    # ---- layout -------------------------------------------------------------------------------------
    @staticmethod
    def _layout(modules: list[nn.Module]) -> list[_Part]:
        parts, seen, pos = [], set(), 0
        for module in modules:
            tensors, is_param = [], []
            for t in module.state_dict(keep_vars=True).values():
                if t.is_floating_point() and id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
                    is_param.append(isinstance(t, nn.Parameter))
            size = sum(t.numel() for t in tensors)
            parts.append(_Part(tensors, is_param, pos, pos + size))
            pos += size
        return parts

    def _out_part(self, block: int) -> int:
        return self.num_blocks if block == self.num_blocks - 1 else self.num_blocks + 1 + block

    def _out_module(self, block: int) -> nn.Module:
        return self.head if block == self.num_blocks - 1 else self.outputs[block]

    def _get(self, part: int) -> np.ndarray:
        out = np.empty(self._parts[part].size, dtype=np.float32)
        target, pos = torch.from_numpy(out), 0
        with torch.no_grad():
            for t in self._parts[part].tensors:
                target[pos : pos + t.numel()].copy_(t.detach().reshape(-1))
                pos += t.numel()
        return out

    def _set(self, part: int) -> None:
        """Copy the part's slice of ``self.state`` into its tensors."""
        p = self._parts[part]
        source, pos = torch.from_numpy(self.state[p.start : p.stop]), 0
        with torch.no_grad():
            for t in p.tensors:
                t.copy_(source[pos : pos + t.numel()].view_as(t))
                pos += t.numel()

    def _slice(self, part: int) -> slice:
        return slice(self._parts[part].start, self._parts[part].stop)

    # ---- the step's network -------------------------------------------------------------------------
    def net(self, step: tuple[str, int]) -> StepNet:
        """The network of ``step`` with only its active block and output module trainable."""
        t = step[1]
        net = self._nets.get(step)
        if net is None:
            net = StepNet(self.blocks[:t], self.blocks[t], self._out_module(t))
            self._nets[step] = net
        for module in (*self.blocks, self.head, self.outputs):
            module.requires_grad_(False)
        net.active.requires_grad_(True)
        net.out.requires_grad_(True)
        return net

    def _load(self, step: tuple[str, int]) -> None:
        t = step[1]
        for part in [*range(t + 1), self._out_part(t)]:
            self._set(part)

    def trainable_size(self, block: int) -> int:
        return self._parts[block].size + self._parts[self._out_part(block)].size

    def _count_params(self, parts: list[int]) -> int:
        return sum(t.numel() for i in parts for t, is_p in zip(self._parts[i].tensors, self._parts[i].is_param,
                                                                strict=True) if is_p)

    # ---- rank 0 -------------------------------------------------------------------------------------
    @property
    def step(self) -> tuple[str, int]:
        return self.steps[min(self.step_index, len(self.steps) - 1)]

    def begin_round(self, *, round: int) -> Any:
        if self.step_index >= len(self.steps):
            return STOP
        stage, t = self.step
        if self._rule is None:
            self._rule = self._new_rule(stage, t)
        final = t if stage == GROW else 0  # blocks before t hold their final values only when growing
        workers = self._workers
        have = min(self._known.get(w, 0) for w in workers) if workers else 0
        start = min(have, final)
        self._info = ProFLInfo(stage=stage, block=t, catch_from=start, catch_to=final)
        return self._info

    def _new_rule(self, stage: str, block: int) -> FreezeRule:
        p = self.cfg.profl
        index, offsets = self._parts[block].param_offsets()
        self._em_index = index
        if stage == SHRINK:  # a fixed number of rounds; EM is still computed for the trace
            lo = hi = p.shrink_rounds
        else:
            lo, hi = p.min_rounds_per_block, p.max_rounds_per_block
        rule = FreezeRule(window=p.window, threshold=p.threshold, patience=p.patience, min_rounds=lo,
                          max_rounds=hi, offsets=offsets if p.metric == "layer_mean" else None)
        rule.start(self.state[self._slice(block)][index])
        return rule

    def broadcast_state(self) -> np.ndarray:
        info = self._info
        assert info is not None, "begin_round comes first"
        t = info.block
        catch = slice(self._parts[info.catch_from].start, self._parts[info.catch_to - 1].stop) \
            if info.catch_to > info.catch_from else slice(0, 0)
        return np.concatenate(
            [self.state[catch], self.state[self._slice(t)], self.state[self._slice(self._out_part(t))]]
        )

    def assign(self, *, clients: np.ndarray, costs: np.ndarray, workers: list[int]) -> np.ndarray:
        self._workers = list(workers)  # who may need the frozen blocks next round
        return super().assign(clients=clients, costs=costs, workers=workers)

    def payload_bytes(self) -> int:
        return 4 * self.trainable_size(self.step[1])

    def _cost(self, step: tuple[str, int], batch_size: int) -> _Cost:
        hit = self._costs.get((step, batch_size))
        if hit is None:
            net = self.net(step)
            flops = FlopCache(net, sample_shape=self.sample_shape, num_classes=self.num_classes)
            memory = MemoryCache(
                net, sample_shape=self.sample_shape, num_classes=self.num_classes, device=self.device,
                optimizer_factor=optimizer_state_factor("sgd", self.cfg.train.momentum),
            )
            update = flops.update_flops(batch_size)
            per_sample = (flops.training_step(batch_size) - update) / batch_size
            train = memory.training(batch_size)
            acts = train.activations_bytes
            if step[1] > 0:  # the frozen prefix's forward pass: its live tensors, freed before the step trains
                x, _ = sample_batch(self.sample_shape, self.num_classes, batch_size, device=self.device)
                acts = max(acts, measure_inference_memory(PrefixNet(self.blocks[: step[1]]), x).activations_bytes)
            hit = _Cost(per_sample, update, train.total_bytes - train.activations_bytes, acts)
            self._costs[(step, batch_size)] = hit
        return hit

    def eligible(self, *, round: int, num_samples: np.ndarray, budget_bytes: np.ndarray) -> np.ndarray | None:
        """Each step samples only the clients whose memory holds its training (the paper's selection)."""
        if not self.cfg.profl.fitting_clients:
            return None
        return self.estimate_work(num_samples=num_samples, budget_bytes=budget_bytes).peak_bytes <= budget_bytes

    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        train = self.cfg.train
        step, b = self.step, train.batch_size
        cost = self._cost(step, b)
        n = np.asarray(num_samples, dtype=np.int64)
        steps = -(-n // b)
        peak = cost.state_bytes + (cost.activation_bytes * np.minimum(n, b)) // b
        self._round_peak = cost.state_bytes + cost.activation_bytes
        up = 4 * self.trainable_size(step[1])
        down = up + (4 * self._parts[step[1]].start if self.cfg.profl.download_prefix else 0)
        return WorkEstimate(
            flops=train.local_epochs * (n * cost.per_sample_flops + steps * cost.update_flops),
            peak_bytes=peak, bytes_down=np.full(len(n), down, np.int64), bytes_up=np.full(len(n), up, np.int64),
        )

    def conclude_round(
        self, *, round: int, summed: np.ndarray, records: np.ndarray, extras: list[np.ndarray]
    ) -> None:
        info, rule = self._info, self._rule
        assert info is not None and rule is not None
        t = info.block
        weight = float(summed[-1])
        block, out = self._slice(t), self._slice(self._out_part(t))
        if weight > 0:
            new = (summed[:-1] / weight).astype(np.float32)
            self.state[block] = new[: block.stop - block.start]
            self.state[out] = new[block.stop - block.start :]
        ranks = records["rank"][records["rank"] >= 0]
        for r in np.unique(ranks).tolist():  # these ranks applied the catch-up before training
            self._known[r] = max(self._known.get(r, 0), info.catch_to)
        frozen = rule.observe(self.state[block][self._em_index] if weight > 0 else None)
        self._eval_step = (info.stage, t)
        self._trace_row(round, info, rule, frozen, weight)
        if frozen:
            self.step_index += 1
            self._rule = None

    def _trace_row(self, round_: int, info: ProFLInfo, rule: FreezeRule, frozen: bool, weight: float) -> None:
        if self.trace is None:
            return
        t = info.block
        row = np.zeros(1, dtype=PROFL_ROUND_DTYPE)
        row["round"] = round_
        row["stage"] = info.stage.encode()
        row["block"] = t
        row["num_blocks"] = self.num_blocks
        row["block_round"] = rule.rounds
        row["em"] = rule.em
        row["below"] = rule.below
        row["frozen"] = int(frozen)
        row["trainable_params"] = self._count_params([t, self._out_part(t)])
        row["frozen_params"] = self._count_params(list(range(t)))
        row["peak_train_bytes"] = self._round_peak
        up = 4 * self.trainable_size(t)
        row["bytes_up"] = up
        row["bytes_down"] = up + (4 * self._parts[t].start if self.cfg.profl.download_prefix else 0)
        row["weight"] = weight
        self.trace.append("profl/rounds", row)

    def evaluate(self, *, test_batches: BatchMaker, batch_size: int) -> tuple[float, float]:
        """The network of the step just trained (after the last step: the whole model)."""
        step = self._eval_step
        net = self.net(step)
        self._load(step)
        return evaluate(net, test_batches, batch_size)

    def trace_layout(self) -> dict[str, np.dtype]:
        return {"profl/rounds": PROFL_ROUND_DTYPE}

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Rank 0's progress: every block, head and output module, the step, and the freezing rule's window.

        Which worker ranks hold which frozen blocks (``_known``) is not saved: after a resume the workers are
        fresh, so the first round resends the whole frozen prefix (``load_state_dict`` forgets it).
        """
        arrays: dict[str, np.ndarray] = {"state": self.state.copy()}
        meta: dict[str, Any] = {
            "steps": [[stage, int(t)] for stage, t in self.steps], "step_index": int(self.step_index),
            "eval_step": [self._eval_step[0], int(self._eval_step[1])], "round_peak": int(self._round_peak),
            "rule": None,
        }
        rule = self._rule
        if rule is not None:  # mid-step: the window of snapshots and the counters
            arrays["rule_snapshots"] = np.stack(list(rule._snapshots)).astype(np.float32)
            meta["rule"] = {"rounds": rule.rounds, "updates": rule.updates, "below": rule.below,
                            "em": None if math.isnan(rule.em) else float(rule.em)}
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        steps = [(str(stage), int(t)) for stage, t in meta["steps"]]
        state = np.ascontiguousarray(arrays["state"], dtype=np.float32)
        if steps != self.steps or state.shape != self.state.shape:
            raise UserError("profl checkpoint: its blocks and steps differ from this config's; resume with the "
                            "config the run was started with")
        self.state[:] = state
        self.step_index = int(meta["step_index"])
        self._eval_step = (str(meta["eval_step"][0]), int(meta["eval_step"][1]))
        self._round_peak = int(meta["round_peak"])
        self._info = None
        self._known = {}  # fresh workers hold only the initial weights: resend every frozen block
        self._workers = None
        self._rule = None
        saved = meta.get("rule")
        if saved is not None:
            rule = self._new_rule(*self.step)
            rule._snapshots.clear()
            for snap in np.asarray(arrays["rule_snapshots"], dtype=np.float32):
                rule._snapshots.append(snap.copy())
            rule.rounds, rule.updates, rule.below = int(saved["rounds"]), int(saved["updates"]), int(saved["below"])
            rule.em = math.nan if saved["em"] is None else float(saved["em"])
            self._rule = rule

    # ---- every rank ---------------------------------------------------------------------------------
    def accumulator_size(self, info: Any) -> int:
        return self.trainable_size(info.block) + 1

    def _receive(self, buffer: np.ndarray, info: ProFLInfo) -> None:
        """Write the broadcast (catch-up blocks, active block, output module) into this rank's state."""
        pos = 0
        targets = []
        if info.catch_to > info.catch_from:
            targets.append(slice(self._parts[info.catch_from].start, self._parts[info.catch_to - 1].stop))
        targets += [self._slice(info.block), self._slice(self._out_part(info.block))]
        for target in targets:
            n = target.stop - target.start
            self.state[target] = buffer[pos : pos + n]
            pos += n
        if pos != buffer.size:
            raise ValueError(f"ProFL broadcast has {buffer.size} values, the round's layout needs {pos}")

    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        self._receive(global_params, info)
        step = (info.stage, info.block)
        net = self.net(step)
        self._load(step)
        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        steps, loss = local_sgd(net, trainable, task=task, batches=self.batches, train=self.cfg.train)
        params = np.concatenate([self._get(info.block), self._get(self._out_part(info.block))])
        return ClientResult(
            params=params, weight=float(len(task.indices)), steps=steps, train_loss=loss, status=STATUS_OK,
        )


__all__ = ["PROFL_ROUND_DTYPE", "ProFL", "ProFLInfo"]
