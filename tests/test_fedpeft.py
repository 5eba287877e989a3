"""FedPEFT: what trains and travels, adapters, prompts, DP-SGD, whole runs through the single-process Comm."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from emulator import seeding
from emulator.algorithms import create_algorithm
from emulator.algorithms.base import ClientTask
from emulator.algorithms.fedpeft import FedPEFT
from emulator.algorithms.peft_dp import (
    accountant_noise_multiplier,
    code_noise_multiplier,
    per_sample_gradients,
    private_gradients,
)
from emulator.algorithms.peft_modules import prepare
from emulator.batches import BatchMaker
from emulator.cli import main
from emulator.comm import SingleComm
from emulator.config import Config, load_config
from emulator.errors import UserError
from emulator.flat import FlatModel
from emulator.records import CLIENT_ROUND_DTYPE
from emulator.roles.plan import sample_cohort
from emulator.runner import build_model, load_data, make_shards, run

MIB = 2**20


def small_cfg(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [
        "algorithm=fedpeft", "model.name=test_vit", "data.dataset=synthetic", "data.num_samples=300",
        "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=6", "data.partition.name=iid",
        "clients_per_round=3", "rounds=2", "train.batch_size=16", "runtime.progress=none", "runtime.threads=1",
        "devices.availability=false", f"output.trace={tmp_path / 'run.h5'}", *extra,
    ])


def build(cfg: Config) -> tuple[FedPEFT, np.ndarray, object]:
    """The algorithm as the runner builds it on a rank, plus the client shards."""
    data = load_data(cfg)
    model = build_model(cfg, data)
    batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std)
    alg = create_algorithm(cfg.algorithm, cfg=cfg, model=model, flat=FlatModel(model), batches=batches,
                           num_classes=data.num_classes)
    return alg, make_shards(cfg, data.y_train), data


def task_for(cfg: Config, shards: object, round_: int, client: int) -> ClientTask:
    return ClientTask(
        round=round_, client=client, indices=shards.shard(client),
        rng=seeding.rng(cfg.seed, seeding.STREAM_CLIENT, round_, client),
        torch_seed=seeding.torch_seed(cfg.seed, seeding.STREAM_CLIENT, round_, client),
    )


def one_round(alg: FedPEFT, cfg: Config, shards: object, clients: list[int]) -> None:
    state = alg.broadcast_state().copy()
    acc = np.zeros(alg.accumulator_size(None))
    scratch = np.empty_like(acc)
    for c in clients:
        result = alg.client_update(global_params=state, task=task_for(cfg, shards, 0, c), info=None)
        alg.accumulate(acc, result, scratch)
    alg.conclude_round(round=0, summed=acc, records=np.zeros(0), extras=[])


# -- bytes --------------------------------------------------------------------------------------------------


def vit_b16_meta() -> nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", num_classes=100)


def test_vit_b16_bytes_per_round_match_the_paper_in_mib() -> None:
    """ViT-B/16, 100 classes: the paper's ~328 MB (full) and ~0.68 MB (bias) are MiB of float32."""
    full = prepare(vit_b16_meta(), "full")
    assert full.elements == 85_875_556
    assert full.payload_bytes == 343_502_224  # 343.5 MB decimal
    assert full.payload_bytes / MIB == pytest.approx(327.59, abs=0.01)

    bias = prepare(vit_b16_meta(), "bias")
    # 12 blocks x (qkv 2304 + proj 768 + fc1 3072 + fc2 768 + 2 LayerNorms 2x768) + patch 768 + norm 768
    # + the head 768x100 + 100.
    assert bias.elements == 12 * (2304 + 768 + 3072 + 768 + 2 * 768) + 768 + 768 + 76_900 == 179_812
    assert bias.payload_bytes / MIB == pytest.approx(0.686, abs=0.001)
    assert all(n.endswith("bias") or n.startswith("head.") for n in bias.names)

    head = prepare(vit_b16_meta(), "head")
    assert head.elements == 76_900
    adapter = prepare(vit_b16_meta(), "adapter")  # d=768 -> 96 -> 768 after every MLP
    assert adapter.elements == 12 * (768 * 96 + 96 + 96 * 768 + 768) + 76_900 == 1_856_740
    shared = prepare(vit_b16_meta(), "adapter", shared_adapter=True)  # the authors' code: one adapter
    assert shared.elements == (768 * 96 + 96 + 96 * 768 + 768) + 76_900
    prompt = prepare(vit_b16_meta(), "prompt", prompt_tokens=10)
    assert prompt.elements == 12 * 10 * 768 + 76_900


def test_only_the_trainable_tensors_travel_and_change(tmp_path: Path) -> None:
    cfg = small_cfg(tmp_path, "fedpeft.variant=bias")
    alg, shards, _ = build(cfg)
    before = {k: v.detach().clone() for k, v in alg.model.state_dict().items()}
    trainable = set(alg.setup.names)
    assert alg.broadcast_state().size == alg.state.size == sum(before[n].numel() for n in trainable)
    assert alg.accumulator_size(None) == alg.state.size + 1
    assert alg.payload_bytes() == 4 * alg.state.size
    assert alg.state.size < 0.05 * alg.flat.size  # biases + head of a ViT: a few percent
    one_round(alg, cfg, shards, [0, 1])
    alg.state.set(alg.global_params)
    after = alg.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    assert "head.weight" in changed and "blocks.0.attn.qkv.bias" in changed
    assert not any(k.endswith("weight") and not k.startswith("head.") for k in changed)


def test_adapter_starts_as_the_backbone_and_then_trains(tmp_path: Path) -> None:
    cfg = small_cfg(tmp_path, "fedpeft.variant=adapter")
    data = load_data(cfg)
    plain = build_model(cfg, data).eval()
    alg, shards, _ = build(cfg)  # same seed: the same backbone, plus adapters
    alg.model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), alg.model(x))  # zero up-projection: exactly the backbone's function
    ups = [n for n in alg.setup.names if n.endswith("up.weight")]
    assert len(ups) == len(alg.model.blocks)  # one adapter per block
    one_round(alg, cfg, shards, [0])
    alg.state.set(alg.global_params)
    assert all(alg.model.get_parameter(n).abs().sum() > 0 for n in ups)  # the adapters learn
    with torch.no_grad():
        assert not torch.allclose(plain(x), alg.model.eval()(x))


def test_faithful_adapter_is_one_shared_module(tmp_path: Path) -> None:
    alg, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=adapter", "fedpeft.faithful_to_code=true"))
    assert [n for n in alg.setup.names if "adapter" in n] == [
        "peft_adapter.down.weight", "peft_adapter.down.bias", "peft_adapter.up.weight", "peft_adapter.up.bias",
    ]


def test_deep_prompts_are_inserted_replaced_and_stripped(tmp_path: Path) -> None:
    alg, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=prompt", "fedpeft.prompt_tokens=3"))
    model = alg.model.eval()
    seen: dict[str, int] = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("block0", a[0].shape[1]))
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("block2", a[0].shape[1]))
    model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0].shape[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    tokens = 1 + (32 // 16) ** 2  # class token + 2x2 patches
    assert seen == {"block0": tokens + 3, "block2": tokens + 3, "norm": tokens}
    assert alg.state.size == len(model.blocks) * 3 * model.embed_dim + sum(
        p.numel() for p in model.get_classifier().parameters()
    )
    # Layer 2's own prompts reach it: changing them changes the output.
    with torch.no_grad():
        y0 = model(torch.ones(1, 3, 32, 32))
        # Not a constant shift: LayerNorm would remove it.
        model.peft_prompt.tokens[2].add_(torch.randn_like(model.peft_prompt.tokens[2]))
        assert not torch.allclose(y0, model(torch.ones(1, 3, 32, 32)))


# -- DP -----------------------------------------------------------------------------------------------------


def linear_model() -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    return model, [n for n, _ in model.named_parameters()]


def test_per_sample_gradients_match_one_backward_per_sample() -> None:
    model, names = linear_model()
    x, y = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    grads, norms, _ = per_sample_gradients(model, names, x, y)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        direct = [p.grad for p in model.parameters()]
        for n, g in zip(names, direct, strict=True):
            torch.testing.assert_close(grads[n][i], g, rtol=1e-5, atol=1e-6)
        assert norms[i] == pytest.approx(float(torch.cat([g.flatten() for g in direct]).norm()), rel=1e-5)


def test_dp_bounds_a_huge_gradient_sample_by_the_clip_norm() -> None:
    model, names = linear_model()
    x, y = torch.randn(8, 3, 2, 2) * 0.1, torch.randint(3, (8,))
    x[0] *= 1e5  # one outlier: its gradient is enormous
    clip = 0.5
    _, norms, _ = per_sample_gradients(model, names, x, y)
    assert norms[0] > 1000 * clip

    def summed(xb: torch.Tensor, yb: torch.Tensor, c: float) -> torch.Tensor:
        grads, _, _ = private_gradients(model, names, xb, yb, clip=c, sigma=0.0)
        return torch.cat([g.flatten() for g in grads]) * len(yb)  # back from the mean to the sum

    contribution = summed(x, y, clip) - summed(x[1:], y[1:], clip)
    assert float(contribution.norm()) <= clip * (1 + 1e-4)
    unclipped = summed(x, y, 1e9) - summed(x[1:], y[1:], 1e9)
    assert float(unclipped.norm()) > 1000 * clip  # without clipping it dominates: the bound is the clip's doing


def test_dp_noise_has_the_multiplier_times_clip_over_batch_std() -> None:
    model, names = linear_model()
    x, y = torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)
    torch.manual_seed(1)
    noisy = torch.cat([
        torch.cat([g.flatten() for g in private_gradients(model, names, x, y, clip=2.0, sigma=3.0)[0]])
        for _ in range(200)
    ])
    clean = torch.cat([g.flatten() for g in private_gradients(model, names, x, y, clip=2.0, sigma=0.0)[0]])
    noise = noisy.view(200, -1) - clean
    assert float(noise.std()) == pytest.approx(3.0 * 2.0 / 4, rel=0.05)


def test_noise_multipliers() -> None:
    assert code_noise_multiplier(5.0, 1e-3) == pytest.approx(1.5107, abs=1e-3)  # the authors' code
    pytest.importorskip("opacus")
    rdp = accountant_noise_multiplier(5.0, 1e-3, 16 / 50, 20, "rdp")
    assert 0.3 < rdp < 3.0
    assert accountant_noise_multiplier(1.0, 1e-3, 16 / 50, 20, "rdp") > rdp  # a tighter epsilon: more noise
    assert accountant_noise_multiplier(5.0, 1e-3, 16 / 50, 200, "rdp") > rdp  # more steps: more noise


def test_dp_without_opacus_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus... -> ImportError
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants.utils", None)
    accountant_noise_multiplier.cache_clear()
    args = ["run", "--set", "algorithm=fedpeft", "--set", "fedpeft.dp=true", "--set", "model.name=test_vit",
            "--set", "data.dataset=synthetic", "--set", "data.num_samples=100", "--set", "data.image_size=32",
            "--set", "data.partition.num_clients=4", "--set", "clients_per_round=2", "--set", "rounds=1",
            "--set", "runtime.progress=none", "--set", f"output.trace={tmp_path / 'dp.h5'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fedpeft.dp = true needs opacus" in err[0] and "fedemu[dp]" in err[0]
    with pytest.raises(UserError):
        accountant_noise_multiplier(5.0, 1e-3, 0.5, 4, "rdp")
    monkeypatch.undo()
    accountant_noise_multiplier.cache_clear()
    # The authors'-code mode has a closed form: it needs no opacus.
    monkeypatch.setitem(sys.modules, "opacus", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants.utils", None)
    build(small_cfg(tmp_path, "fedpeft.dp=true", "fedpeft.faithful_to_code=true"))


def test_dp_client_update_is_reproducible_and_noisy(tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    cfg = small_cfg(tmp_path, "fedpeft.dp=true", "fedpeft.epsilon=2", "train.local_epochs=1")
    alg, shards, _ = build(cfg)
    state = alg.broadcast_state().copy()
    first = alg.client_update(global_params=state, task=task_for(cfg, shards, 0, 1)).params
    again = alg.client_update(global_params=state, task=task_for(cfg, shards, 0, 1)).params
    np.testing.assert_array_equal(first, again)  # keyed by (seed, round, client)
    assert alg.noise_multiplier(len(shards.shard(1))) > 0.5
    plain, _, _ = build(small_cfg(tmp_path, "train.local_epochs=1"))
    clean = plain.client_update(global_params=state, task=task_for(cfg, shards, 0, 1)).params
    assert not np.allclose(first, clean, atol=1e-4)


# -- whole runs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bias", "prompt"])
def test_runs_and_traces_bytes_per_round(tmp_path: Path, variant: str) -> None:
    cfg = small_cfg(tmp_path, f"fedpeft.variant={variant}")
    summary = run(cfg, SingleComm())
    assert summary is not None
    with h5py.File(summary.trace_path, "r") as f:
        rows = f["fedpeft/rounds"][:]
        records = f["client_rounds/table"][:]
    assert len(rows) == 2 and rows["variant"].tolist() == [variant.encode()] * 2
    payload = int(rows["payload_bytes"][0])
    assert payload == 4 * int(rows["trainable_elements"][0])
    ok = records["status"] == 0
    assert ok.sum() == 6
    assert (records["bytes_up"][ok] == payload).all() and (records["bytes_down"] == payload).all()
    assert rows["bytes_up"].sum() == summary.rounds["bytes_up"].sum() == 6 * payload
    assert np.isnan(rows["noise_multiplier"]).all()
    assert np.isfinite(summary.rounds["test_accuracy"]).all()


def test_full_fine_tuning_learns_and_moves_more_bytes_than_bias(tmp_path: Path) -> None:
    full = run(small_cfg(tmp_path, "fedpeft.variant=full", "rounds=4", "train.lr=0.003", "train.local_epochs=2",
                         "data.num_samples=600", f"output.trace={tmp_path / 'full.h5'}"), SingleComm())
    bias = run(small_cfg(tmp_path, "fedpeft.variant=bias", "rounds=1", f"output.trace={tmp_path / 'bias.h5'}"),
               SingleComm())
    assert full is not None and bias is not None
    assert full.rounds["test_accuracy"][-1] > 0.4  # 4 classes: chance is 0.25
    per_client = full.rounds["bytes_up"][0] / full.rounds["num_ok"][0]
    assert per_client > 20 * bias.rounds["bytes_up"][0] / bias.rounds["num_ok"][0]


def test_scratch_reinitialises_the_backbone(tmp_path: Path) -> None:
    plain, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=full"))
    scratch, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=scratch"))
    again, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=scratch"))
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(plain.model.get_parameter(w), scratch.model.get_parameter(w))
    assert torch.equal(scratch.model.get_parameter(w), again.model.get_parameter(w))  # seeded: same on every rank


def test_adapter_and_prompt_need_a_transformer(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"fedpeft.variant = 'adapter' needs a transformer"):
        build(small_cfg(tmp_path, "fedpeft.variant=adapter", "model.name=tiny_cnn"))
    bias, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=bias", "model.name=tiny_cnn"))
    model = copy.deepcopy(bias.model)
    assert set(bias.setup.names) == {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"9.weight"}


# -- checkpoint / resume ------------------------------------------------------------------------------------


def drive_rounds(
    alg: object, cfg: Config, shards: object, rounds: range, budgets: np.ndarray | None = None
) -> list[np.ndarray]:
    """Rounds as the Server and a one-rank ClientGroup run them (cohort, costing, clients, aggregation);
    returns the global state after each round. ``budgets``: memory budget per registered client."""
    states = []
    eligible = np.flatnonzero(shards.sizes > 0)
    for r in rounds:
        info = alg.begin_round(round=r)
        cohort = sample_cohort(cfg.seed, r, eligible, cfg.clients_per_round)
        alg.cohort = cohort
        budget = np.zeros(len(cohort), np.int64) if budgets is None else budgets[cohort]
        work = alg.estimate_work(num_samples=shards.sizes[cohort], budget_bytes=budget)
        state = alg.broadcast_state().copy()
        acc = np.zeros(alg.accumulator_size(info))
        scratch = np.empty_like(acc)
        records = np.zeros(len(cohort), dtype=CLIENT_ROUND_DTYPE)
        records["round"], records["client"], records["num_samples"] = r, cohort, shards.sizes[cohort]
        records["memory_budget_bytes"], records["peak_memory_bytes"] = budget, work.peak_bytes
        for i, c in enumerate(cohort.tolist()):
            result = alg.client_update(global_params=state, task=task_for(cfg, shards, r, c), info=info,
                                       budget_bytes=int(budget[i]))
            alg.accumulate(acc, result, scratch)
        alg.conclude_round(round=r, summed=acc, records=records, extras=[np.zeros(0, np.float32)] * len(cohort))
        states.append(alg.broadcast_state().copy())
    return states


def roundtrip(arrays: dict[str, np.ndarray], meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    """What a checkpoint keeps: arrays through safetensors, the rest through strict JSON (no NaN, no pickle)."""
    from safetensors.numpy import load, save

    return load(save({k: np.ascontiguousarray(v) for k, v in arrays.items()})), json.loads(
        json.dumps(meta, allow_nan=False)
    )


@pytest.mark.parametrize("variant", ["adapter", "full"])
def test_resume_from_state_dict_continues_exactly(
    tmp_path: Path, variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("opacus")
    cfg = small_cfg(tmp_path, f"fedpeft.variant={variant}", "fedpeft.dp=true", "rounds=4")
    whole, shards, _ = build(cfg)
    reference = drive_rounds(whole, cfg, shards, range(4))
    first, _, _ = build(cfg)
    head = drive_rounds(first, cfg, shards, range(2))
    np.testing.assert_array_equal(head[-1], reference[1])
    saved = roundtrip(*first.state_dict())
    # A resumed run may extend ``rounds``: it keeps the noise multiplier of the run it continues.
    longer = small_cfg(tmp_path, f"fedpeft.variant={variant}", "fedpeft.dp=true", "rounds=40")
    fresh, _, _ = build(longer)
    n = len(shards.shard(0))
    assert fresh.noise_multiplier(n) > first.noise_multiplier(n)  # more rounds, more noise ...
    fresh.load_state_dict(*saved)
    assert fresh.noise_multiplier(n) == first.noise_multiplier(n)  # ... unless resumed
    # ... and then it says that epsilon no longer holds, on stderr and in the trace's events.
    assert "spend more than epsilon = 5" in capsys.readouterr().err
    events: list[tuple[str, str, str]] = []
    fresh.attach_trace(SimpleNamespace(event=lambda kind, msg, level: events.append((kind, level, msg))))
    assert events and events[0][:2] == ("dp", "warning") and "calibrated for" in events[0][2]
    fresh.trace = None  # the rounds below write no trace
    same, _, _ = build(cfg)  # resuming with the rounds the noise was set for: no warning
    same.load_state_dict(*saved)
    assert same.dp_warning == "" and "epsilon" not in capsys.readouterr().err
    tail = drive_rounds(fresh, cfg, shards, range(2, 4))
    for got, want in zip(tail, reference[2:], strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(reference[1], reference[3])  # it trained on after the resume


def test_resume_with_another_variant_is_a_one_line_error(tmp_path: Path) -> None:
    bias, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=bias"))
    head, _, _ = build(small_cfg(tmp_path, "fedpeft.variant=head"))
    with pytest.raises(UserError, match=r"fedpeft checkpoint: saved variant 'bias'"):
        head.load_state_dict(*bias.state_dict())
