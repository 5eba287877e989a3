"""FedPEFT (Sun et al., arXiv 2210.01708): federated fine-tuning of a frozen pre-trained backbone.

Clients train only a small subset (``fedpeft.variant``: biases, adapters or deep prompts, each with the
new head; or the baselines head-only, full fine-tune, training from scratch) and only that subset travels:
the broadcast state, the accumulator and the payload are the trainable tensors, averaged sample-weighted.
Optional sample-level DP-SGD (``fedpeft.dp``, see :mod:`emulator.algorithms.peft_dp`).
docs/algorithms-fedpeft-raffm.md lists every inferred choice and what ``faithful_to_code`` changes.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emulator import seeding
from emulator.algorithms.base import Algorithm, ClientResult, ClientTask, WorkEstimate
from emulator.algorithms.peft_dp import (
    accountant_noise_multiplier,
    check_accountant,
    code_noise_multiplier,
    private_gradients,
)
from emulator.algorithms.peft_modules import (
    PEFT_VARIANTS,
    freeze_statistics,
    prepare,
    reinitialise,
)
from emulator.algorithms.registry import register_algorithm
from emulator.batches import BatchMaker
from emulator.config import Config
from emulator.errors import UserError
from emulator.evaluation import evaluate
from emulator.flat import FlatModel, TensorVector
from emulator.records import STATUS_OK

ROUNDS_DTYPE = np.dtype([
    ("round", "<i4"),
    ("variant", "S8"),
    ("trainable_elements", "<i8"),  # elements of the state that travels (trainable tensors)
    ("payload_bytes", "<i8"),  # 4 x trainable_elements, each way per client
    ("bytes_down", "<i8"),  # summed over the cohort (as in /rounds)
    ("bytes_up", "<i8"),
    ("num_ok", "<i4"),
    ("noise_multiplier", "<f4"),  # mean over ok clients; NaN without DP
])

# Client slot of STREAM_MODEL_INIT for the PEFT modules' init (slot 0 is the model's own init).
_PEFT_INIT_SLOT = 1


@register_algorithm("fedpeft")
class FedPEFT(Algorithm):
    def __init__(
        self, *, cfg: Config, model: nn.Module, flat: FlatModel, batches: BatchMaker, num_classes: int
    ) -> None:
        super().__init__(cfg=cfg, model=model, flat=flat, batches=batches, num_classes=num_classes)
        p = cfg.fedpeft
        if p.dp and not p.faithful_to_code:
            check_accountant()  # one clear line at set-up, not a traceback in round 0
        device = next(model.parameters()).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        # Same seed on every rank: adapters and prompts start identical everywhere.
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seeding.torch_seed(cfg.seed, seeding.STREAM_MODEL_INIT, 0, _PEFT_INIT_SLOT))
            if p.variant == "scratch":
                reinitialise(model)
            self.setup = prepare(
                model, p.variant, adapter_reduction=p.adapter_reduction, prompt_tokens=p.prompt_tokens,
                prompt_dropout=p.prompt_dropout, shared_adapter=p.faithful_to_code,
            )
        tensors: list[torch.Tensor] = list(self.setup.params)
        if p.variant not in PEFT_VARIANTS:
            # Whole-model baselines average float buffers too, as FedAvg does.
            tensors += [b for b in model.buffers() if b.is_floating_point()]
        self.state = TensorVector(tensors)
        self.global_params = self.state.get()
        self._participations = max(1, math.ceil(cfg.rounds * cfg.clients_per_round / cfg.data.partition.num_clients))
        self.dp_warning = ""  # set when a resumed run plans more participations than its noise covers

    # ---- sizes ------------------------------------------------------------------------------------------
    def payload_bytes(self) -> int:
        return self.state.nbytes

    def accumulator_size(self, info: Any) -> int:
        return self.state.size + 1

    # ---- DP ---------------------------------------------------------------------------------------------
    def noise_multiplier(self, num_samples: int) -> float:
        """The client's DP noise multiplier (0 without DP); depends on its sample count only."""
        p, train = self.cfg.fedpeft, self.cfg.train
        if not p.dp:
            return 0.0
        if p.faithful_to_code:
            return code_noise_multiplier(p.epsilon, p.delta)
        n = max(1, int(num_samples))
        steps = train.local_epochs * -(-n // train.batch_size) * self._participations
        return accountant_noise_multiplier(p.epsilon, p.delta, train.batch_size / n, steps, p.accountant)

    # ---- rank 0 -----------------------------------------------------------------------------------------
    def estimate_work(self, *, num_samples: np.ndarray, budget_bytes: np.ndarray | None = None) -> WorkEstimate:
        train = self.cfg.train
        work = self.estimate_training(num_samples=num_samples, epochs=train.local_epochs, batch_size=train.batch_size)
        peak = work.peak_bytes
        p = self.cfg.fedpeft
        if p.dp and not p.faithful_to_code:
            # Per-sample gradients of the trainable tensors live together for the largest batch.
            largest = np.minimum(np.asarray(num_samples, dtype=np.int64), train.batch_size)
            peak = peak + largest * 4 * self.setup.elements
        return WorkEstimate(flops=work.flops, peak_bytes=peak)

    def conclude_round(
        self, *, round: int, summed: np.ndarray, records: np.ndarray, extras: list[np.ndarray]
    ) -> None:
        super().conclude_round(round=round, summed=summed, records=records, extras=extras)
        if self.trace is None:
            return
        ok = records["status"] == STATUS_OK
        sigmas = [self.noise_multiplier(int(n)) for n in records["num_samples"][ok]]
        row = np.zeros(1, dtype=ROUNDS_DTYPE)
        row["round"] = round
        row["variant"] = self.setup.variant.encode()
        row["trainable_elements"] = self.state.size
        row["payload_bytes"] = self.payload_bytes()
        row["bytes_down"] = int(records["bytes_down"].sum())
        row["bytes_up"] = int(records["bytes_up"].sum())
        row["num_ok"] = int(ok.sum())
        row["noise_multiplier"] = float(np.mean(sigmas)) if self.cfg.fedpeft.dp and sigmas else math.nan
        self.trace.append("fedpeft/rounds", row)

    def evaluate(self, *, test_batches: BatchMaker, batch_size: int) -> tuple[float, float]:
        self.state.set(self.global_params)
        return evaluate(self.model, test_batches, batch_size)

    def trace_layout(self) -> dict[str, np.dtype]:
        return {"fedpeft/rounds": ROUNDS_DTYPE}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The trainable tensors (the whole server state: the backbone is rebuilt from the config) and the
        DP accounting basis.

        ``dp_participations`` is saved because the noise multiplier depends on it and it is derived from
        ``rounds``, which a resumed run may change: a resumed run keeps the noise of the run it continues.
        """
        meta = {
            "variant": self.setup.variant, "trainable_elements": int(self.state.size),
            "dp_participations": int(self._participations),
        }
        return {"trainable": self.global_params.copy()}, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if meta.get("variant") != self.setup.variant or int(meta.get("trainable_elements", -1)) != self.state.size:
            raise UserError(
                f"fedpeft checkpoint: saved variant {meta.get('variant')!r} with {meta.get('trainable_elements')} "
                f"trainable elements, this run has {self.setup.variant!r} with {self.state.size}; resume with the "
                "config the run was started with"
            )
        self.global_params = np.ascontiguousarray(arrays["trainable"], dtype=np.float32).copy()
        planned, self._participations = self._participations, int(meta["dp_participations"])
        p = self.cfg.fedpeft
        if p.dp and not p.faithful_to_code and planned > self._participations:
            # More rounds than the noise was calibrated for: say so, in the trace and on stderr.
            self.dp_warning = (
                f"fedpeft.dp: rounds = {self.cfg.rounds} plans {planned} participations per client, but the "
                f"resumed run keeps the noise calibrated for {self._participations}: clients that take part "
                f"more often spend more than epsilon = {p.epsilon:g}; start a new run for the guarantee"
            )
            print(f"fedemu: warning: {self.dp_warning}", file=sys.stderr, flush=True)

    def attach_trace(self, trace: Any) -> None:
        super().attach_trace(trace)
        if self.dp_warning:
            trace.event("dp", self.dp_warning, level="warning")

    # ---- every rank -------------------------------------------------------------------------------------
    def client_update(
        self, *, global_params: np.ndarray, task: ClientTask, info: Any = None, budget_bytes: int = 0
    ) -> ClientResult:
        train, p = self.cfg.train, self.cfg.fedpeft
        self.state.set(global_params)
        self.model.train()
        if self.setup.variant in PEFT_VARIANTS:
            freeze_statistics(self.model)
        torch.manual_seed(task.torch_seed)  # dropout, prompt dropout, DP noise: keyed by (round, client)
        params = self.setup.params
        opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
        sigma = self.noise_multiplier(len(task.indices))
        per_sample = p.dp and not p.faithful_to_code
        steps = 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(train.local_epochs):
            order = task.rng.permutation(task.indices)
            for start in range(0, len(order), train.batch_size):
                x, y = self.batches(order[start : start + train.batch_size])
                opt.zero_grad(set_to_none=True)
                if per_sample:
                    grads, _, loss = private_gradients(self.model, self.setup.names, x, y, clip=p.clip, sigma=sigma)
                    for param, g in zip(params, grads, strict=True):
                        param.grad = g
                else:
                    loss = F.cross_entropy(self.model(x), y)
                    loss.backward()
                    if sigma > 0:  # the authors' code: noise on the batch gradient, nothing clipped
                        for param in params:
                            param.grad.add_(torch.randn_like(param.grad), alpha=sigma * p.clip / len(y))
                opt.step()
                loss_sum += loss.detach()
                steps += 1
        return ClientResult(
            params=self.state.get(),
            weight=float(len(task.indices)),
            steps=steps,
            train_loss=float(loss_sum) / max(steps, 1),
            status=STATUS_OK,
        )
