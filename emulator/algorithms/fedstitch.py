"""FedStitch (arXiv 2409.07202), as reconstructed in DESIGN.md §5: build a model by stitching pool blocks.

One FL round per stitching step, then one round for the head:

- step k, client: its prefix features H (the stitched prefix run on its data; kept across steps when its
  memory allows: then only the newly appended block is run), and for every candidate block it can hold:
  a stitching layer fitted locally in closed form (ridge least squares from H to the candidate's own-model
  input), the candidate's globally pooled features, their score (linear CKA vs one-hot labels by default)
  and nearest-class-mean accuracy (the quality proxy). Up: the score and proxy vectors (``extra``) and
  sufficient statistics (X^T X, X^T T per candidate; F^T F, F^T Y of the prefix) summed by ``Reduce``.
  No backward pass anywhere.
- step k, server: client weights from the weighting policy (data-size weights = the "without RL"
  ablation), aggregated scores S_c = sum_i w_i s_ic / sum_i w_i, append argmax with its stitching layer
  fitted from the summed statistics, reward = gain of the data-weighted proxy; the search-space optimizer
  drops source models ranked in the bottom ``drop_fraction`` (never below ``min_models``) and blocks no
  client can hold. Stop at ``depth`` blocks, when no candidate is left, or after ``patience`` steps without
  proxy gain (back to the best prefix).
- head round: clients send F^T F and F^T Y of the final prefix's pooled features; the server solves the
  ridge head (or class means). The final reward is the test accuracy.

Inferred choices (all options in ``[stitch]``): the local closed-form stitch fit used to score a candidate,
the proxy (local nearest-class-mean accuracy), the model ranking used by the optimizer (a model's best
candidate score in the step), and re-downloading blocks each step unless ``blocks_on_device``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emulator.algorithms.base import STOP, Algorithm, ClientResult, ClientTask, WorkEstimate
from emulator.algorithms.registry import register_algorithm
from emulator.algorithms.stitch_scores import SCORES, label_entropy, ncm_accuracy, pooled
from emulator.algorithms.stitch_weighting import (
    ClientWeighting,
    DataSizeWeighting,
    StepObservation,
    aggregate_scores,
    client_meta,
)
from emulator.batches import BatchMaker
from emulator.errors import UserError
from emulator.records import (
    RL_STEP_DTYPE,
    STATUS_OK,
    STATUS_OOM,
    STITCH_CANDIDATE_DTYPE,
    STITCH_CLIENT_DTYPE,
    STITCH_SCORE_DTYPE,
    STITCH_STEP_DTYPE,
)
from pools.errors import PoolError

STEP, HEAD = "step", "head"


@dataclass(frozen=True)
class StitchRound:
    """The plan's ``info``: what every rank needs to do (and size) this round's work."""

    kind: str  # STEP or HEAD
    step: int
    prefix: tuple[str, ...]  # chosen blocks so far
    candidates: tuple[str, ...]  # blocks to score (empty in the head round)


@dataclass
class _Slot:
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def view(self, buf: np.ndarray) -> np.ndarray:
        return buf[self.offset : self.offset + self.size].reshape(self.shape)


@dataclass
class _Layout:
    """Where each sufficient statistic lives in the round's float64 accumulator."""

    xtx: dict[tuple[int, int], _Slot] = field(default_factory=dict)  # per (down, up) resampling of H
    xty: dict[str, _Slot] = field(default_factory=dict)  # per candidate needing a stitch
    tt: dict[str, _Slot] = field(default_factory=dict)  # sum of squares of its target
    tsum: dict[str, _Slot] = field(default_factory=dict)  # column sums of its target
    ftf: _Slot | None = None  # prefix features: [d + 1, d + 1] with a ones column
    fty: _Slot | None = None  # [d + 1, num_classes]: class sums, and counts in the last row
    size: int = 1  # at least one slot: an empty buffer is never reduced


@dataclass(frozen=True)
class _Profile:
    """A block's memory: weights, and the largest input + output of any of its layers, per sample."""

    param_bytes: int
    transient_bytes: int


@register_algorithm("fedstitch")
class FedStitch(Algorithm):
    uses_extras = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from pools import Pool

        opts = self.cfg.stitch
        path = Path(self.cfg.pool.path)
        if not (path / "manifest.json").is_file():
            raise UserError(
                f"pool.path = {str(path)!r}: no pool there; build it with `fedemu pools pretrain CONFIG` "
                "(or `make pool` for the quickstart's)"
            )
        try:
            self.pool = Pool.load(path)
        except PoolError as err:
            raise UserError(str(err)) from None
        self.opts = opts
        self.size = self.pool.input_size
        self.infos = {info.name: info for info in self.pool}
        self._profiles: dict[str, _Profile] = {}
        self._stitch_protos: dict[tuple[str, str], nn.Module] = {}
        # Rank-side copy of what a client's device keeps across steps: wall time only (the emulated
        # cost follows the server's per-client record, whichever rank runs the client).
        self._features: OrderedDict[int, tuple[tuple[str, ...], torch.Tensor]] = OrderedDict()
        self._feature_bytes = 0
        self._joint_cache: tuple[tuple[str, ...], bytes, list[nn.Module]] | None = None
        # ---- server state (rank 0; harmless elsewhere)
        self.weighting: ClientWeighting = DataSizeWeighting()
        self._weighting_given = False
        self.prefix: list[str] = []
        self.joints: list[nn.Module] = []  # fitted stitching layers: joints[i] sits before prefix[i + 1]
        self.models = list(self.pool.models())
        self.blocks = [info.name for info in self.pool]
        self.step = 0
        self.phase = STEP
        self.proxy = 1.0 / self.num_classes  # before any block: chance
        self.best = (self.proxy, 0)  # (proxy, prefix length)
        self.no_gain = 0
        self.cached_depth: dict[int, int] = {}  # client -> prefix length its device holds features for
        self.max_budget = 0
        self.head: np.ndarray | None = None
        self._info: StitchRound | None = None
        self._eval: tuple[int, list[nn.Module], np.ndarray] | None = None  # prefix length, joints, head
        self._final_reward: float | None = None
        self._head_sums: np.ndarray | None = None  # head statistics summed over the head rounds
        self._head_done = 0
        self._head_round = -1
        if self.cfg.rounds < 2:
            raise UserError(f"rounds = {self.cfg.rounds}: fedstitch needs at least 2 (a stitching step and the head)")

    # ================================================================== shared helpers
    def use_weighting(self, weighting: ClientWeighting) -> None:
        self.weighting = weighting
        self._weighting_given = True

    # ================================================================== checkpoints (rank 0)
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The server's stitching state after a concluded round, and the weighting policy's (if it has any).

        Saved: the prefix and its fitted stitching layers (flat, as broadcast), the head and the summed head
        statistics, phase / step / proxy / best / patience counters, the pruned pool (models, blocks), what
        each client's device holds (cost accounting) and the largest budget seen (the optimizer's block
        pruning). Not saved: ``_info`` and ``_eval``, which the next round sets before they are read, and
        the per-rank caches (block profiles, stitch prototypes, held features), rebuilt on a miss with the
        same numbers (held features only save wall time: the emulated cost follows ``cached_depth``).
        """
        arrays: dict[str, np.ndarray] = {"joints": _flatten(self.joints)}
        if self.head is not None:
            arrays["head"] = np.asarray(self.head, dtype=np.float64)
        if self._head_sums is not None:
            arrays["head_sums"] = np.asarray(self._head_sums, dtype=np.float64)
        meta: dict[str, Any] = {
            "prefix": list(self.prefix), "models": list(self.models), "blocks": list(self.blocks),
            "step": self.step, "phase": self.phase, "proxy": self.proxy, "best": [self.best[0], self.best[1]],
            "no_gain": self.no_gain, "cached_depth": {str(c): d for c, d in self.cached_depth.items()},
            "max_budget": self.max_budget, "final_reward": self._final_reward, "head_done": self._head_done,
            "head_round": self._head_round, "weighting": None,
        }
        saver = getattr(self.weighting, "state_dict", None)
        if callable(saver):
            w_arrays, w_meta = saver()
            arrays.update({f"weighting/{k}": np.asarray(v) for k, v in w_arrays.items()})
            meta["weighting"] = {"name": str(getattr(self.weighting, "name", "")), **w_meta}
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        unknown = [b for b in [*meta["prefix"], *meta["blocks"]] if b not in self.infos]
        if unknown:
            raise UserError(f"the checkpoint's stitched blocks {unknown[:3]} are not in pool.path = "
                            f"{self.cfg.pool.path!r}: resume with the pool the run was started with")
        self.prefix = list(meta["prefix"])
        self.models = list(meta["models"])
        self.blocks = list(meta["blocks"])
        self.joints = [self._stitch(a, b) for a, b in itertools.pairwise(self.prefix)]
        _unflatten(self.joints, np.asarray(arrays["joints"], dtype=np.float32))
        self.head = np.array(arrays["head"], dtype=np.float64) if "head" in arrays else None
        self._head_sums = np.array(arrays["head_sums"], dtype=np.float64) if "head_sums" in arrays else None
        self.step, self.phase, self.proxy = int(meta["step"]), str(meta["phase"]), float(meta["proxy"])
        self.best = (float(meta["best"][0]), int(meta["best"][1]))
        self.no_gain = int(meta["no_gain"])
        self.cached_depth = {int(c): int(d) for c, d in meta["cached_depth"].items()}
        self.max_budget = int(meta["max_budget"])
        final = meta["final_reward"]
        self._final_reward = None if final is None else float(final)
        self._head_done, self._head_round = int(meta["head_done"]), int(meta["head_round"])
        self._info, self._eval = None, None
        saved = meta.get("weighting")
        loader = getattr(self.weighting, "load_state_dict", None)
        if saved is None:
            if callable(loader):
                raise UserError("the checkpoint holds no client-weighting state but this run's weighting "
                                f"({getattr(self.weighting, 'name', '?')}) has one: resume with the run's own config")
            return
        name = str(getattr(self.weighting, "name", ""))
        if not callable(loader) or saved.get("name") != name:
            raise UserError(f"the checkpoint's client weighting is {saved.get('name')!r}, this run's is {name!r}: "
                            "resume with the run's own config (stitch.weighting, stitch.policy)")
        loader({k[len("weighting/"):]: v for k, v in arrays.items() if k.startswith("weighting/")},
               {k: v for k, v in saved.items() if k != "name"})

    def _profile(self, name: str) -> _Profile:
        prof = self._profiles.get(name)
        if prof is None:
            info = self.infos[name]
            block = self.pool.block(name)
            shape = (1, *info.input.shape(self.size))
            peak = 0

            def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                nonlocal peak
                size = sum(t.numel() * t.element_size() for t in (*inputs, output) if isinstance(t, torch.Tensor))
                peak = max(peak, size)

            handles = [m.register_forward_hook(hook) for m in block.modules() if not list(m.children())]
            try:
                with torch.no_grad():
                    block(torch.zeros(shape))
            finally:
                for h in handles:
                    h.remove()
            prof = _Profile(param_bytes=4 * info.params, transient_bytes=peak)
            self._profiles[name] = prof
        return prof

    def _teacher(self, name: str) -> list[str]:
        """The blocks before ``name`` in its own model: what produces its expected input."""
        info = self.infos[name]
        return [f"{info.model}.{j}" for j in range(info.index)]

    def _stitch(self, a: str, b: str) -> nn.Module:
        """A fresh stitching layer from block a to block b (identity when their signatures match)."""
        from pools import make_stitch

        key = (a, b)
        proto = self._stitch_protos.get(key)
        if proto is None:
            with torch.random.fork_rng(devices=[]):  # its random init is overwritten; keep the RNG untouched
                proto = make_stitch(self.infos[a], self.infos[b], self.size)
            self._stitch_protos[key] = proto
        return copy.deepcopy(proto).eval()

    def _out_bytes(self, name: str) -> int:
        return self.infos[name].activation_bytes

    def _work_bytes(self, prefix: tuple[str, ...], candidate: str | None) -> int:
        """Peak memory of one candidate's scoring (or the prefix alone), without held features."""
        names = set(prefix)
        if candidate is not None:
            names |= {candidate, *self._teacher(candidate)}
        profiles = [self._profile(n) for n in names]
        params = sum(p.param_bytes for p in profiles)
        transient = max((p.transient_bytes for p in profiles), default=0)
        fit = 0
        if candidate is not None and prefix:
            a, b = self.infos[prefix[-1]], self.infos[candidate]
            fit = 8 * (a.output.channels + 1) * (a.output.channels + 1 + b.input.channels)
        return params + self.opts.batch_size * transient + fit

    def _held_bytes(self, prefix: tuple[str, ...], n: int) -> int:
        return n * self._out_bytes(prefix[-1]) if prefix else 0

    def _fits(self, info: StitchRound, n: int, budget: int) -> tuple[bool, list[bool]]:
        """(does the client keep its prefix features, which candidates fit) — same answer on every rank."""
        works = [self._work_bytes(info.prefix, c) for c in info.candidates] or [self._work_bytes(info.prefix, None)]
        held = self._held_bytes(info.prefix, n)
        cache = bool(self.opts.cache and info.prefix and held + min(works) <= budget)
        base = held if cache else 0
        if not info.candidates:
            return cache, []
        return cache, [base + w <= budget for w in works]

    def _layout(self, info: StitchRound) -> _Layout:
        lay = _Layout()
        offset = 0

        def slot(shape: tuple[int, ...]) -> _Slot:
            nonlocal offset
            s = _Slot(offset, shape)
            offset += s.size
            return s

        if info.kind == STEP and info.prefix:
            c_in = self.infos[info.prefix[-1]].output.channels
            for cand in info.candidates:
                stitch = self._stitch(info.prefix[-1], cand)
                if isinstance(stitch, nn.Identity):
                    continue
                key = (stitch.down, stitch.up)
                if key not in lay.xtx:
                    lay.xtx[key] = slot((c_in + 1, c_in + 1))
                c_out = self.infos[cand].input.channels
                lay.xty[cand] = slot((c_in + 1, c_out))
                lay.tt[cand] = slot((1,))
                lay.tsum[cand] = slot((c_out,))
        if info.prefix:
            d = self.infos[info.prefix[-1]].output.channels
            lay.ftf = slot((d + 1, d + 1))
            lay.fty = slot((d + 1, self.num_classes))
        lay.size = max(offset, 1)
        return lay

    def _images(self, idx: np.ndarray, model: str, source: np.ndarray | None = None) -> torch.Tensor:
        """The samples as the first block of ``model`` expects them: channels, size and normalisation."""
        images = self.batches.x if source is None else source
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).float().div_(255.0)
        chans = self.pool.in_chans
        if x.shape[1] != chans:
            if x.shape[1] != 1:
                raise UserError(f"data has {x.shape[1]} channels; pool.path's blocks take {chans}")
            x = x.expand(-1, chans, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean, std = self.pool.normalization(model)
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x - m) / s

    def _joints_for(self, prefix: tuple[str, ...], state: np.ndarray) -> list[nn.Module]:
        """The prefix's fitted stitching layers, rebuilt from the broadcast state (cached per state)."""
        key = state.tobytes()
        if self._joint_cache is not None and self._joint_cache[0] == prefix and self._joint_cache[1] == key:
            return self._joint_cache[2]
        joints = [self._stitch(a, b) for a, b in itertools.pairwise(prefix)]
        _unflatten(joints, state)
        self._joint_cache = (prefix, key, joints)
        return joints

    def _run_chain(self, names: tuple[str, ...], joints: list[nn.Module], idx: np.ndarray,
                   start: int = 0, start_features: torch.Tensor | None = None,
                   source: np.ndarray | None = None) -> torch.Tensor:
        """Features after ``names`` for the samples ``idx``, in batches; from block ``start`` on given its input."""
        out = []
        bs = self.opts.batch_size
        with torch.inference_mode():
            for s in range(0, len(idx), bs):
                h = (self._images(idx[s : s + bs], self.infos[names[0]].model, source) if start == 0
                     else start_features[s : s + bs])
                for j in range(start, len(names)):
                    if j > 0:
                        h = joints[j - 1](h)
                    h = self.pool.block(names[j])(h)
                out.append(h)
        return torch.cat(out)

    def _prefix_features(self, client: int, prefix: tuple[str, ...], joints: list[nn.Module], idx: np.ndarray,
                         keep: bool) -> torch.Tensor:
        held = self._features.get(client)
        if held is not None and held[0] == prefix[: len(held[0])]:
            depth, feats = len(held[0]), held[1]
            h = feats if depth == len(prefix) else self._run_chain(prefix, joints, idx, depth, feats)
        else:
            h = self._run_chain(prefix, joints, idx)
        self._drop(client)
        if keep:
            size = h.numel() * h.element_size()
            cap = self.opts.cache_mib << 20
            while self._features and self._feature_bytes + size > cap:
                self._drop(next(iter(self._features)))
            if size <= cap:
                self._features[client] = (prefix, h)
                self._feature_bytes += size
        return h

    def _drop(self, client: int) -> None:
        held = self._features.pop(client, None)
        if held is not None:
            self._feature_bytes -= held[1].numel() * held[1].element_size()

    # ================================================================== rank 0: planning
    def begin_round(self, *, round: int) -> Any:
        if self.phase == "done":
            return STOP
        if self.phase == STEP and self.prefix and round >= self.cfg.rounds - self.opts.head_rounds:
            self.phase = HEAD  # keep the rounds the head needs
        if self.phase == STEP:
            cands = self._candidates()
            if not cands:
                if not self.prefix:
                    raise UserError(f"pool.path = {self.cfg.pool.path!r}: no block takes the image")
                self.phase = HEAD
        if self.phase == HEAD:
            self._info = StitchRound(HEAD, self.step, tuple(self.prefix), ())
        else:
            self._info = StitchRound(STEP, self.step, tuple(self.prefix), tuple(cands))
        return self._info

    def _candidates(self) -> list[str]:
        from pools import can_join

        models = set(self.models)
        left = [b for b in self.blocks if self.infos[b].model in models and b not in self.prefix]
        if not self.prefix:
            return [b for b in left if self.infos[b].is_first]
        last = self.infos[self.prefix[-1]]
        if self.opts.order == "position":  # the stitched model keeps the source models' depth order
            left = [b for b in left if self.infos[b].index == len(self.prefix)]
        return [b for b in left if can_join(last, self.infos[b], self.size)]

    def broadcast_state(self) -> np.ndarray:
        return _flatten(self.joints)

    def payload_bytes(self) -> int:
        return 4 * _flatten(self.joints).size

    def assign(self, *, clients: np.ndarray, costs: np.ndarray, workers: list[int]) -> np.ndarray:
        # Sticky: a client lands on the same rank every round, where its features may still be held.
        return np.asarray([workers[int(c) % len(workers)] for c in clients], dtype=np.int32)

    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        info = self._info
        assert info is not None, "begin_round first"
        n = np.asarray(num_samples, dtype=np.int64)
        budgets = np.full(len(n), np.iinfo(np.int64).max, np.int64) if budget_bytes is None else budget_bytes
        if len(budgets):
            self.max_budget = max(self.max_budget, int(np.max(budgets)))
        flops = np.zeros(len(n))
        peak = np.zeros(len(n), dtype=np.int64)
        down = np.zeros(len(n), dtype=np.int64)
        up = np.zeros(len(n), dtype=np.int64)
        lay = self._layout(info)
        state_bytes = self.payload_bytes()
        prefix_flops = [self._block_flops(info.prefix, j) for j in range(len(info.prefix))]
        works = [self._work_bytes(info.prefix, c) for c in info.candidates]
        cand_flops = [self._candidate_flops(info.prefix, c) for c in info.candidates]
        prefix_work = self._work_bytes(info.prefix, None)
        for i, (ni, budget) in enumerate(zip(n.tolist(), budgets.tolist(), strict=True)):
            cache, fits = self._fits(info, ni, budget)
            held = self._held_bytes(info.prefix, ni) if cache else 0
            chosen = [k for k, ok in enumerate(fits) if ok]
            # Prefix passes: once from where its held features stop, or per use when nothing is held.
            client = int(self.cohort[i]) if self.cohort is not None else -1
            have = self.cached_depth.get(client, 0) if cache else 0
            have = have if have <= len(info.prefix) else 0
            passes = 1 if cache else (1 + 2 * len(chosen) if info.kind == STEP else 1)
            flops[i] = ni * (sum(prefix_flops[have:]) if cache else passes * sum(prefix_flops))
            flops[i] += ni * sum(cand_flops[k] for k in chosen)
            if info.kind == HEAD or not info.candidates:
                peak[i] = held + prefix_work
            elif chosen:
                peak[i] = held + max(works[k] for k in chosen)
            else:
                peak[i] = held + min(works)  # cannot hold even the smallest candidate: oom
            blocks = set(info.prefix[have:] if cache else info.prefix)
            for k in chosen:
                blocks |= {info.candidates[k], *self._teacher(info.candidates[k])}
            down[i] = state_bytes + (0 if self.opts.blocks_on_device else sum(4 * self.infos[b].params for b in blocks))
            up[i] = 4 * (2 * len(info.candidates) + 2) + 4 * lay.size
        return WorkEstimate(flops=flops, peak_bytes=peak, bytes_down=down, bytes_up=up)

    def _block_flops(self, prefix: tuple[str, ...], j: int) -> float:
        from pools import join_cost

        f = float(self.infos[prefix[j]].flops)
        if j > 0:
            f += join_cost(self.infos[prefix[j - 1]], self.infos[prefix[j]], self.size).flops
        return f

    def _candidate_flops(self, prefix: tuple[str, ...], cand: str) -> float:
        from pools import join_cost

        f = float(self.infos[cand].flops) + sum(self.infos[t].flops for t in self._teacher(cand))
        if prefix:
            f += 2 * join_cost(self.infos[prefix[-1]], self.infos[cand], self.size).flops  # fit pass + use
        return f

    # ================================================================== every rank: a client's work
    def accumulator_size(self, info: Any) -> int:
        return self._layout(info).size

    def accumulate(self, acc: np.ndarray, result: ClientResult, scratch: np.ndarray) -> None:
        acc += result.params

    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        assert isinstance(info, StitchRound)
        idx = np.sort(task.indices)  # sample order is irrelevant: no SGD
        y = self.batches.y[idx].astype(np.int64)
        n = len(idx)
        budget = budget_bytes if budget_bytes > 0 else np.iinfo(np.int64).max
        cache, fits = self._fits(info, n, budget)
        lay = self._layout(info)
        stats = np.zeros(lay.size, dtype=np.float64)
        joints = self._joints_for(info.prefix, global_params)
        h = None
        if info.prefix:
            h = self._prefix_features(task.client, info.prefix, joints, idx, keep=cache)
            last = self.infos[info.prefix[-1]]
            f = pooled(h, last.output.prefix_tokens if last.output.kind == "tokens" else 0).double().numpy()
            _add_gram(lay.ftf.view(stats), lay.fty.view(stats), f, y, self.num_classes)
            prefix_proxy = ncm_accuracy(f, y)
        else:
            prefix_proxy = 1.0 / self.num_classes
        k = len(info.candidates)
        scores = np.full(k, np.nan, dtype=np.float32)
        proxies = np.full(k, np.nan, dtype=np.float32)
        done_geometry: set[tuple[int, int]] = set()
        score_fn = SCORES[self.opts.score]
        for j, cand in enumerate(info.candidates):
            if not fits[j]:
                continue
            feats = self._score_features(info, cand, idx, h, stats, lay, done_geometry)
            scores[j] = score_fn(feats, y, self.num_classes, self.opts.ridge)
            proxies[j] = ncm_accuracy(feats, y)
        if info.kind == STEP and info.candidates and not any(fits):
            return ClientResult(params=stats, weight=0.0, steps=0, train_loss=math.nan, status=STATUS_OOM)
        extra = np.concatenate([scores, proxies, [prefix_proxy, label_entropy(y, self.num_classes)]])
        return ClientResult(params=stats, weight=float(n), steps=int(sum(fits)), train_loss=math.nan,
                            status=STATUS_OK, extra=extra.astype(np.float32))

    def _score_features(self, info: StitchRound, cand: str, idx: np.ndarray, h: torch.Tensor | None,
                        stats: np.ndarray, lay: _Layout, done_geometry: set[tuple[int, int]]) -> np.ndarray:
        """The candidate's pooled features on the client's samples (fitting its stitch locally first)."""
        from pools import fit_rows, set_linear, solve_linear

        block = self.pool.block(cand)
        binfo = self.infos[cand]
        bs = self.opts.batch_size
        prefix_tokens = binfo.output.prefix_tokens if binfo.output.kind == "tokens" else 0
        out = []
        with torch.inference_mode():
            if h is None:  # step 0: the candidate takes the image
                for s in range(0, len(idx), bs):
                    out.append(pooled(block(self._images(idx[s : s + bs], binfo.model)), prefix_tokens))
                return torch.cat(out).double().numpy()
            stitch = self._stitch(info.prefix[-1], cand)
            if not isinstance(stitch, nn.Identity):
                teacher = [self.pool.block(t) for t in self._teacher(cand)]
                key = (stitch.down, stitch.up)
                c_in = self.infos[info.prefix[-1]].output.channels
                xtx = np.zeros((c_in + 1, c_in + 1))
                xty = np.zeros((c_in + 1, binfo.input.channels))
                tt = 0.0
                tsum = np.zeros(binfo.input.channels)
                for s in range(0, len(idx), bs):
                    t = self._images(idx[s : s + bs], binfo.model)
                    for tb in teacher:
                        t = tb(t)
                    xr, tr = fit_rows(stitch, h[s : s + bs], t)
                    xr, tr = xr.double().numpy(), tr.double().numpy()
                    xtx += xr.T @ xr
                    xty += xr.T @ tr
                    tt += float((tr * tr).sum())
                    tsum += tr.sum(axis=0)
                if key not in done_geometry:  # the same rows for every candidate with this resampling
                    lay.xtx[key].view(stats)[...] += xtx
                    done_geometry.add(key)
                lay.xty[cand].view(stats)[...] += xty
                lay.tt[cand].view(stats)[...] += tt
                lay.tsum[cand].view(stats)[...] += tsum
                set_linear(stitch, solve_linear(xtx, xty, self.opts.ridge))
            for s in range(0, len(idx), bs):
                out.append(pooled(block(stitch(h[s : s + bs])), prefix_tokens))
        return torch.cat(out).double().numpy()

    # ================================================================== rank 0: concluding a round
    def conclude_round(
        self, *, round: int, summed: np.ndarray, records: np.ndarray, extras: list[np.ndarray]
    ) -> None:
        info = self._info
        assert info is not None
        lay = self._layout(info)
        ok = np.flatnonzero(records["status"] == STATUS_OK)
        if info.kind == HEAD:
            self._head_sums = summed.copy() if self._head_sums is None else self._head_sums + summed
            self._fit_head(lay, self._head_sums)
            self._head_done += 1
            if self._head_done >= self.opts.head_rounds or round == self.cfg.rounds - 1:
                self.phase = "done"
                self._head_round = round
            self._write_head_row(round, info, len(ok))
            return
        k = len(info.candidates)
        if info.prefix:
            self._eval_head_from(lay, summed)
        rows = [extras[i] for i in ok if len(extras[i]) == 2 * k + 2]
        used = np.asarray([i for i in ok if len(extras[i]) == 2 * k + 2], dtype=np.int64)
        if not rows:
            self.trace_event(round, "no client scored any candidate; stitching stops")
            self.phase = HEAD if self.prefix else "done"
            return
        mat = np.stack(rows)
        scores, proxies = mat[:, :k], mat[:, k : 2 * k]
        prefix_proxy, entropy = mat[:, 2 * k], mat[:, 2 * k + 1]
        n = records["num_samples"][used].astype(np.int64)
        clients = records["client"][used].astype(np.int64)
        obs = StepObservation(
            round=round, step=info.step, max_steps=self.opts.depth, scores=scores.astype(np.float32),
            proxies=proxies.astype(np.float32), num_samples=n,
            meta=client_meta(scores=scores, num_samples=n, label_entropy=entropy, prefix_proxy=prefix_proxy),
            clients=clients, candidates=info.candidates,
        )
        raw = np.asarray(self.weighting.weights(obs), dtype=np.float64)
        if raw.shape != (len(n),) or not np.all(np.isfinite(raw)) or raw.min() < 0:
            raise ValueError(f"client weighting returned {raw!r}; need {len(n)} finite weights >= 0")
        w = raw / raw.sum() if raw.sum() > 0 else n / n.sum()
        agg = aggregate_scores(scores, w)
        data_agg = aggregate_scores(scores, n.astype(np.float64))
        cand_proxy = aggregate_scores(proxies, n.astype(np.float64))
        num_scored = np.isfinite(scores).sum(axis=0)
        proxy_before = float(np.dot(prefix_proxy, n) / n.sum()) if info.prefix else self.proxy
        if not np.isfinite(agg).any():
            agg = np.where(np.isfinite(cand_proxy), cand_proxy, -np.inf)  # e.g. every client holds one class
        chosen = int(np.nanargmax(np.where(np.isfinite(agg), agg, -np.inf)))
        gain = float(cand_proxy[chosen] - proxy_before)
        models_before, blocks_before = len(self.models), self._space_size()
        kind = "step"
        identity, residual = True, math.nan
        if info.prefix and gain <= self.opts.min_gain:
            self.no_gain += 1
        else:
            self.no_gain = 0
        if info.prefix and self.no_gain >= self.opts.patience:
            kind = "stop"
            best_len = self.best[1]
            if best_len < len(self.prefix):  # back to the best prefix seen
                self.prefix = self.prefix[:best_len]
                self.joints = self.joints[: max(best_len - 1, 0)]
            self.phase = HEAD
        else:
            identity, residual = self._append(info, info.candidates[chosen], lay, summed)
            self.proxy = float(cand_proxy[chosen])
            if self.proxy > self.best[0] or not info.prefix:
                self.best = (self.proxy, len(self.prefix))
            self._optimise(info, agg, num_scored)
            self.step += 1
            if len(self.prefix) >= self.opts.depth or not self._candidates():
                self.phase = HEAD
        self.weighting.reward(gain, done=False)
        for c in clients.tolist():  # what each answering client's device now holds (cost accounting)
            self.cached_depth[c] = len(info.prefix)
        self._write_step(round, info, kind, chosen, agg, data_agg, cand_proxy, num_scored, obs, raw, w,
                         models_before, blocks_before, identity, residual, proxy_before, gain)

    def _append(self, info: StitchRound, cand: str, lay: _Layout, summed: np.ndarray) -> tuple[bool, float]:
        from pools import fit_residual, set_linear, solve_linear

        if not info.prefix:
            self.prefix.append(cand)
            return True, math.nan
        stitch = self._stitch(info.prefix[-1], cand)
        residual = math.nan
        if not isinstance(stitch, nn.Identity):
            xtx = lay.xtx[(stitch.down, stitch.up)].view(summed)
            xty = lay.xty[cand].view(summed)
            weights = solve_linear(xtx, xty, self.opts.ridge)
            set_linear(stitch, weights)
            residual = fit_residual(xtx, xty, float(lay.tt[cand].view(summed)[0]), lay.tsum[cand].view(summed),
                                    weights)
        self.joints.append(stitch)
        self.prefix.append(cand)
        return isinstance(stitch, nn.Identity), residual

    def _space_size(self) -> int:
        return sum(1 for b in self.blocks if self.infos[b].model in self.models and b not in self.prefix)

    def _optimise(self, info: StitchRound, agg: np.ndarray, num_scored: np.ndarray) -> None:
        """Search-space optimizer: drop the weakest source models and blocks nobody can hold."""
        if not self.opts.search_space:
            return
        best: dict[str, float] = {}
        for name, s in zip(info.candidates, agg, strict=True):
            m = self.infos[name].model
            if np.isfinite(s):
                best[m] = max(best.get(m, -np.inf), float(s))
        ranked = sorted(best, key=lambda m: (best[m], m))  # worst first; ties by name
        drop = min(int(len(self.models) * self.opts.drop_fraction), len(self.models) - self.opts.min_models)
        keep_models = {self.infos[b].model for b in self.prefix}  # a used model's blocks stay usable
        for m in ranked[: max(drop, 0)]:
            if m not in keep_models and m in self.models and len(self.models) > self.opts.min_models:
                self.models.remove(m)
        # Blocks that no client seen so far could hold, even alone.
        if self.max_budget > 0:
            self.blocks = [b for b in self.blocks if self._work_bytes((), b) <= self.max_budget or b in self.prefix]

    def _fit_head(self, lay: _Layout, summed: np.ndarray) -> None:
        from pools import solve_linear

        assert lay.ftf is not None and lay.fty is not None
        ftf, fty = lay.ftf.view(summed), lay.fty.view(summed)
        if self.opts.head == "ridge":
            self.head = solve_linear(ftf, fty, self.opts.ridge)
        else:
            self.head = _ncm_head(fty)
        self._eval = (len(self.prefix), list(self.joints), self.head)

    def _eval_head_from(self, lay: _Layout, summed: np.ndarray) -> None:
        """This step's statistics give a head for the prefix as it was: its test accuracy is the round's."""
        from pools import solve_linear

        assert lay.ftf is not None and lay.fty is not None
        ftf, fty = lay.ftf.view(summed), lay.fty.view(summed)
        if fty[-1].sum() <= 0:
            self._eval = None
            return
        head = solve_linear(ftf, fty, self.opts.ridge) if self.opts.head == "ridge" else _ncm_head(fty)
        self._eval = (len(self.prefix), list(self.joints), head)

    def wants_evaluation(self) -> bool:
        return self.phase == "done" and self._final_reward is None  # the head was just fitted

    def evaluate(self, *, test_batches: BatchMaker, batch_size: int) -> tuple[float, float]:
        if self._eval is None:
            return math.nan, math.nan
        length, joints, head = self._eval
        names = tuple(self.prefix[:length])
        last = self.infos[names[-1]]
        tokens = last.output.prefix_tokens if last.output.kind == "tokens" else 0
        w = torch.from_numpy(head)
        correct, loss_sum, total = 0, 0.0, 0
        for idx in test_batches.slices(batch_size):
            f = pooled(self._run_chain(names, joints, idx, source=test_batches.x), tokens).double()
            logits = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1) @ w
            y = torch.from_numpy(test_batches.y[idx].astype(np.int64))
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            total += len(idx)
        acc = correct / max(total, 1)
        if self.phase == "done" and self._final_reward is None:
            self._final_reward = acc  # the episode's last reward: the stitched model's test accuracy
            self.weighting.reward(acc, done=True)
            self._write_rl(self._head_round, -1, acc, True, 0, 0)
        return acc, loss_sum / max(total, 1)

    # ================================================================== trace
    def trace_layout(self) -> dict[str, np.dtype]:
        return {
            "stitch/steps": STITCH_STEP_DTYPE,
            "stitch/candidates": STITCH_CANDIDATE_DTYPE,
            "stitch/scores": STITCH_SCORE_DTYPE,
            "stitch/clients": STITCH_CLIENT_DTYPE,
            "rl/steps": RL_STEP_DTYPE,
        }

    def attach_trace(self, trace: Any) -> None:
        super().attach_trace(trace)
        if self.cfg.stitch.weighting == "rl" and not self._weighting_given:
            trace.event("weighting", "stitch.weighting = 'rl' but no policy was supplied (run() without the CLI): "
                        "using data-size weights", level="warning")

    def trace_event(self, round: int, message: str) -> None:
        if self.trace is not None:
            self.trace.event("stitch", message, level="warning", round=round)

    def _write_step(self, round: int, info: StitchRound, kind: str, chosen: int, agg: np.ndarray,
                    data_agg: np.ndarray, proxy: np.ndarray, num_scored: np.ndarray, obs: StepObservation,
                    raw: np.ndarray, w: np.ndarray, models_before: int, blocks_before: int, identity: bool,
                    residual: float, proxy_before: float, gain: float) -> None:
        if self.trace is None:
            return
        row = np.zeros(1, dtype=STITCH_STEP_DTYPE)
        row["round"], row["step"], row["kind"] = round, info.step, kind.encode()
        row["num_candidates"], row["num_clients"] = len(info.candidates), len(obs.num_samples)
        appended = kind == "step"
        row["chosen"] = chosen if appended else -1
        row["chosen_block"] = info.candidates[chosen].encode() if appended else b""
        row["models_before"], row["models_after"] = models_before, len(self.models)
        row["blocks_before"], row["blocks_after"] = blocks_before, self._space_size()
        row["stitch_identity"], row["stitch_residual"] = identity, residual
        row["proxy_before"], row["proxy_after"] = proxy_before, proxy[chosen]
        row["reward"], row["depth"] = gain, len(self.prefix)
        self.trace.append("stitch/steps", row)
        cands = np.zeros(len(info.candidates), dtype=STITCH_CANDIDATE_DTYPE)
        cands["round"] = round
        cands["index"] = np.arange(len(info.candidates))
        cands["block"] = [c.encode() for c in info.candidates]
        cands["model"] = [self.infos[c].model.encode() for c in info.candidates]
        cands["score"], cands["data_score"], cands["proxy"] = agg, data_agg, proxy
        cands["num_scored"] = num_scored
        cands["kept"] = [self.infos[c].model in self.models and c in self.blocks for c in info.candidates]
        self.trace.append("stitch/candidates", cands)
        m, k = obs.scores.shape
        sc = np.zeros(m * k, dtype=STITCH_SCORE_DTYPE)
        sc["round"] = round
        sc["client"] = np.repeat(obs.clients, k)
        sc["index"] = np.tile(np.arange(k), m)
        sc["score"], sc["proxy"] = obs.scores.reshape(-1), obs.proxies.reshape(-1)
        self.trace.append("stitch/scores", sc)
        cl = np.zeros(m, dtype=STITCH_CLIENT_DTYPE)
        cl["round"], cl["client"], cl["num_samples"] = round, obs.clients, obs.num_samples
        cl["action"], cl["weight"] = raw, w
        cl["data_weight"] = obs.num_samples / obs.num_samples.sum()
        for j, name in enumerate(("log_samples", "label_entropy", "scored_fraction", "prefix_proxy",
                                  "score_agreement")):
            cl[name] = obs.meta[:, j]
        self.trace.append("stitch/clients", cl)
        self._write_rl(round, info.step, gain, False, m, k)

    def _write_head_row(self, round: int, info: StitchRound, num_clients: int) -> None:
        if self.trace is None:
            return
        row = np.zeros(1, dtype=STITCH_STEP_DTYPE)
        row["round"], row["step"], row["kind"] = round, -1, b"head"
        row["num_clients"], row["chosen"], row["depth"] = num_clients, -1, len(self.prefix)
        row["models_before"] = row["models_after"] = len(self.models)
        row["blocks_before"] = row["blocks_after"] = self._space_size()
        row["stitch_residual"] = row["proxy_before"] = row["proxy_after"] = row["reward"] = math.nan
        self.trace.append("stitch/steps", row)

    def _write_rl(self, round: int, step: int, reward: float, done: bool, m: int, k: int) -> None:
        if self.trace is None:
            return
        row = np.zeros(1, dtype=RL_STEP_DTYPE)
        row["round"], row["step"], row["reward"], row["done"] = round, step, reward, done
        row["policy"] = str(getattr(self.weighting, "name", type(self.weighting).__name__))[:16].encode()
        row["num_clients"], row["num_candidates"] = m, k
        self.trace.append("rl/steps", row)


def _add_gram(ftf: np.ndarray, fty: np.ndarray, f: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    a = np.hstack([f, np.ones((len(f), 1))])
    ftf += a.T @ a
    fty += a.T @ np.eye(num_classes)[y]


def _ncm_head(fty: np.ndarray) -> np.ndarray:
    """Nearest class mean as a linear head: score_c = mu_c . f - |mu_c|^2 / 2 (classes never seen: -inf-ish)."""
    counts = fty[-1]
    means = fty[:-1] / np.maximum(counts, 1.0)
    head = np.vstack([means, -0.5 * (means * means).sum(axis=0, keepdims=True)])
    head[-1, counts <= 0] = -1e30
    return head


def _flatten(modules: list[nn.Module]) -> np.ndarray:
    parts = [t.detach().reshape(-1).float().numpy() for m in modules for t in m.state_dict().values()
             if t.is_floating_point()]
    return np.concatenate([*parts, np.zeros(1, np.float32)]).astype(np.float32)  # >= 1 element to broadcast


def _unflatten(modules: list[nn.Module], flat: np.ndarray) -> None:
    offset = 0
    with torch.no_grad():
        for m in modules:
            for t in m.state_dict(keep_vars=True).values():
                if t.is_floating_point():
                    n = t.numel()
                    t.copy_(torch.from_numpy(flat[offset : offset + n]).view_as(t))
                    offset += n
    if offset + 1 != flat.size:
        raise ValueError(f"stitch state has {flat.size - 1} values, the prefix needs {offset}")
