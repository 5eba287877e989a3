"""RaFFM: salient parameter prioritisation, subnetworks, budget fit, per-entry aggregation, whole runs."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

from emulator import seeding
from emulator.algorithms import create_algorithm
from emulator.algorithms.base import ClientTask
from emulator.algorithms.raffm import RaFFM, SubnetResult, choose
from emulator.algorithms.raffm_subnet import (
    Subnetwork,
    full_spec,
    salient_parameter_prioritization,
    uniform_spec,
    vit_layout,
)
from emulator.batches import BatchMaker
from emulator.comm import SingleComm
from emulator.config import Config, load_config
from emulator.errors import UserError
from emulator.flat import FlatModel
from emulator.records import STATUS_OK, STATUS_OOM
from emulator.runner import build_model, load_data, make_shards, run


def small_cfg(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [
        "algorithm=raffm", "model.name=test_vit", "data.dataset=synthetic", "data.num_samples=300",
        "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=6", "data.partition.name=iid",
        "clients_per_round=3", "rounds=2", "train.batch_size=16", "runtime.progress=none", "runtime.threads=1",
        "devices.availability=false", "raffm.head_ratios=[0.5,1.0]", "raffm.mlp_ratios=[0.25,0.5,1.0]",
        f"output.trace={tmp_path / 'run.h5'}", *extra,
    ])


def build(cfg: Config) -> tuple[RaFFM, object, object]:
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


def vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=10).eval()


# -- salient parameter prioritisation -----------------------------------------------------------------------


def test_spp_permutes_weights_but_keeps_the_function() -> None:
    model = vit()
    permuted = copy.deepcopy(model)
    salient_parameter_prioritization(permuted)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=0, atol=1e-5)
    layout = vit_layout(model)
    width, hd = layout.heads * layout.head_dim, layout.head_dim
    for block, before in zip(permuted.blocks, model.blocks, strict=True):
        assert not torch.equal(block.attn.qkv.weight, before.attn.qkv.weight)
        w = block.attn.qkv.weight
        for h in range(layout.heads):
            q = torch.arange(h * hd, (h + 1) * hd)
            score = (w[q].abs().sum(1) + w[q + width].abs().sum(1)) / 2
            assert torch.all(score[:-1] >= score[1:])  # most salient Q/K dims first, per head
            # Q and K rows moved together: the head's Q/K row sets are the originals'.
            assert sorted(w[q].abs().sum(1).tolist()) == sorted(before.attn.qkv.weight[q].abs().sum(1).tolist())
        mlp = block.mlp.fc1.weight.abs().sum(1) + block.mlp.fc2.weight.abs().sum(0)
        assert torch.all(mlp[:-1] >= mlp[1:])


def test_subnetwork_maps_into_the_full_flat_state() -> None:
    model = vit()
    layout = vit_layout(model)
    full = FlatModel(model).get()
    whole = Subnetwork(model, layout, full_spec(layout))
    whole.load(full)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(whole.module.eval()(x), model(x), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.sort(whole.index), np.arange(full.size))

    small = Subnetwork(model, layout, uniform_spec(layout, 0.5, 0.25))
    small.load(full)
    assert len(np.unique(small.index)) == small.size < 0.6 * full.size
    np.testing.assert_array_equal(small.flat.get(), full[small.index])
    sub = small.module.blocks[1]
    ref = model.blocks[1]
    keep = torch.cat([torch.arange(h * 32, h * 32 + 16) for h in range(2)])  # 2 heads of 32 dims -> 16 each
    rows = torch.cat([keep, keep + 64, keep + 128])
    torch.testing.assert_close(sub.attn.qkv.weight, ref.attn.qkv.weight[rows])
    torch.testing.assert_close(sub.attn.proj.weight, ref.attn.proj.weight[:, keep])
    torch.testing.assert_close(sub.mlp.fc1.weight, ref.mlp.fc1.weight[:48])
    torch.testing.assert_close(sub.mlp.fc2.weight, ref.mlp.fc2.weight[:, :48])


def test_spp_makes_small_subnetworks_closer_to_the_full_model() -> None:
    """The point of SPP: leading slices keep more of the function than an arbitrary order does."""
    model = vit(3)
    layout = vit_layout(model)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        target = model(x)

    def error(m: torch.nn.Module) -> float:
        sub = Subnetwork(m, layout, uniform_spec(layout, 0.5, 0.5))
        sub.load(FlatModel(m).get())
        with torch.no_grad():
            return float((sub.module.eval()(x) - target).pow(2).mean())

    ranked = copy.deepcopy(model)
    salient_parameter_prioritization(ranked)
    assert error(ranked) < error(model)


def test_non_vit_models_are_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"algorithm = 'raffm' needs a timm Vision Transformer"):
        build(small_cfg(tmp_path, "model.name=tiny_cnn"))


# -- budget fit ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[RaFFM, object]:
    """One algorithm whose ladder is measured once for the module (each size: a real step)."""
    torch.set_num_threads(1)
    alg, shards, _ = build(small_cfg(tmp_path_factory.mktemp("raffm")))
    alg.ladder()
    return alg, shards


def test_each_client_trains_the_largest_subnetwork_that_fits(measured: tuple[RaFFM, object]) -> None:
    alg, shards = measured
    ladder = alg.ladder()
    assert len(ladder) == 6 and ladder[-1].size == alg.flat.size  # 2 head ratios x 3 mlp ratios, full last
    peaks = [int(c.peak(np.array([50]), 16)[0]) for c in ladder]
    assert peaks[0] < peaks[-1]
    mid = sorted(peaks)[3]
    n = np.array([50, 50, 50, 50])
    budget = np.array([0, peaks[-1], mid, peaks[0] - 1])  # no limit, the full model, in between, nothing fits
    work = alg.estimate_work(num_samples=n, budget_bytes=budget)
    assert work.peak_bytes[0] == work.peak_bytes[1] == peaks[-1]
    fitting = [c for c, p in zip(ladder, peaks, strict=True) if p <= mid]
    best = max(fitting, key=lambda c: c.size)
    assert work.peak_bytes[2] <= mid and work.bytes_up[2] == 4 * best.size
    assert all(c.size <= best.size for c in fitting)
    assert work.peak_bytes[3] == peaks[0] > budget[3]  # oom: the smallest subnetwork's memory
    assert work.bytes_down[1] == 4 * alg.flat.size and work.bytes_down[2] < work.bytes_down[1]
    assert work.flops[2] < work.flops[1]
    # A worker picks what rank 0 costed, from the same numbers.
    info = alg.begin_round(round=0)
    spec = alg.client_spec(task_for(alg.cfg, shards, 0, 0), info, int(mid))
    assert spec == choose(info.ladder, len(shards.shard(0)), int(mid), 16).spec


def test_memory_is_measured_per_subnetwork_once(measured: tuple[RaFFM, object]) -> None:
    alg, _ = measured
    ladder = alg.ladder()
    assert [c.size for c in ladder] == sorted(c.size for c in ladder)
    small, big = ladder[0], ladder[-1]
    assert small.state_bytes < big.state_bytes and small.activation_bytes < big.activation_bytes
    assert small.per_sample_flops < big.per_sample_flops
    assert alg.cost(big.spec) is big  # cached


# -- aggregation --------------------------------------------------------------------------------------------


def aggregate(alg: RaFFM, results: list[tuple[object, float, float]]) -> np.ndarray:
    acc = np.zeros(alg.accumulator_size(None))
    for spec, value, weight in results:
        sub = alg.subnetwork(spec)
        result = SubnetResult(params=np.full(sub.size, value, np.float32), weight=weight, steps=1, train_loss=0.0,
                              status=STATUS_OK, index=sub.index)
        alg.accumulate(acc, result, np.empty_like(acc))
    alg.conclude_round(round=0, summed=acc, records=np.zeros(0), extras=[])
    return alg.global_params


def test_each_entry_is_averaged_over_the_clients_that_trained_it(tmp_path: Path) -> None:
    alg, _, _ = build(small_cfg(tmp_path))
    small, big = uniform_spec(alg.layout, 0.5, 0.25), full_spec(alg.layout)
    small_idx = alg.subnetwork(small).index
    only_big = np.setdiff1d(np.arange(alg.flat.size), small_idx)
    new = aggregate(alg, [(small, 1.0, 30.0), (big, 4.0, 10.0)])
    np.testing.assert_allclose(new[small_idx], (30 * 1 + 10 * 4) / 40, rtol=1e-6)
    np.testing.assert_allclose(new[only_big], 4.0, rtol=1e-6)

    old = alg.global_params.copy()
    new = aggregate(alg, [(small, 2.0, 5.0), (small, 3.0, 15.0)])
    np.testing.assert_array_equal(new[only_big], old[only_big])  # nobody trained them: kept
    np.testing.assert_allclose(new[small_idx], 2.75, rtol=1e-6)


def test_faithful_average_divides_by_every_clients_weight(tmp_path: Path) -> None:
    alg, _, _ = build(small_cfg(tmp_path, "raffm.faithful_to_code=true"))
    small, big = uniform_spec(alg.layout, 0.5, 0.25), full_spec(alg.layout)
    small_idx = alg.subnetwork(small).index
    only_big = np.setdiff1d(np.arange(alg.flat.size), small_idx)
    new = aggregate(alg, [(small, 1.0, 30.0), (big, 4.0, 10.0)])
    np.testing.assert_allclose(new[small_idx], (30 * 1 + 10 * 4) / 40, rtol=1e-6)
    np.testing.assert_allclose(new[only_big], 10 * 4 / 40, rtol=1e-6)  # the small client counts as a zero


# -- whole runs ---------------------------------------------------------------------------------------------


def test_run_fits_subnetworks_to_budgets_and_traces_them(tmp_path: Path) -> None:
    # Budgets scaled down (memory_fraction) so the Small mix's Raspberry Pis cannot hold the full test_vit.
    cfg = small_cfg(tmp_path, "devices.mix=small", "devices.memory_fraction=0.001", "rounds=3",
                    "data.partition.num_clients=10", "clients_per_round=5")
    summary = run(cfg, SingleComm())
    assert summary is not None
    with h5py.File(summary.trace_path, "r") as f:
        clients = f["raffm/clients"][:]
        records = f["client_rounds/table"][:]
        evals = f["raffm/eval"][:]
    assert len(clients) == len(records) == 15
    np.testing.assert_array_equal(clients["client"], records["client"])
    ok = records["status"] == STATUS_OK
    assert (records["peak_memory_bytes"][ok] <= records["memory_budget_bytes"][ok]).all()
    assert (records["bytes_up"][ok] == 4 * clients["params"][ok]).all()
    sizes = set(np.round(clients["size_ratio"][ok], 4).tolist())
    assert len(sizes) >= 2 and 1.0 in sizes  # big devices train the full model, small ones a subnetwork
    no_fit = np.isnan(clients["size_ratio"])
    assert (records["status"][no_fit] == STATUS_OOM).all()
    # The last round tests every ladder size; the full size is the global model's own accuracy.
    assert len(evals) == 6 and (evals["round"] == 2).all()
    assert evals["size_ratio"][-1] == pytest.approx(1.0)
    assert evals["test_accuracy"][-1] == pytest.approx(summary.rounds["test_accuracy"][-1])
    assert np.all(np.diff(evals["params"]) > 0)


def test_authors_code_mode_draws_random_sizes_and_gives_the_first_client_the_full_model(tmp_path: Path) -> None:
    cfg = small_cfg(tmp_path, "raffm.faithful_to_code=true", "rounds=2")
    summary = run(cfg, SingleComm())
    assert summary is not None
    with h5py.File(summary.trace_path, "r") as f:
        clients = f["raffm/clients"][:]
    for r in (0, 1):
        rows = clients[clients["round"] == r]
        assert rows["size_ratio"][0] == pytest.approx(1.0)  # the cohort's first client
        assert (rows["size_ratio"][1:] < 1.0).any()
    # Draws are keyed by (seed, round, client): the same on any rank.
    alg, _, _ = build(cfg)
    assert alg._drawn_spec(1, 4) == alg._drawn_spec(1, 4)
    assert alg._drawn_spec(1, 4) != alg._drawn_spec(2, 4) or alg._drawn_spec(1, 4) != alg._drawn_spec(1, 5)


def test_subnetwork_training_learns(tmp_path: Path) -> None:
    cfg = small_cfg(tmp_path, "rounds=4", "train.lr=0.003", "train.local_epochs=2", "data.num_samples=600")
    summary = run(cfg, SingleComm())
    assert summary is not None
    assert summary.rounds["test_accuracy"][-1] > 0.4  # 4 classes: chance is 0.25


# -- checkpoint / resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("faithful", [False, True])
def test_resume_from_state_dict_continues_exactly(tmp_path: Path, faithful: bool) -> None:
    from tests.test_fedpeft import drive_rounds, roundtrip

    cfg = small_cfg(tmp_path, "rounds=4", f"raffm.faithful_to_code={str(faithful).lower()}")
    whole, shards, _ = build(cfg)
    budgets = None
    if not faithful:  # budgets between the ladder's peaks: the cohort trains subnetworks of several sizes
        peaks = sorted(int(c.peak(np.array([16]), 16)[0]) for c in whole.ladder())
        budgets = np.array([peaks[i % len(peaks)] for i in range(shards.num_clients)], np.int64)
    reference = drive_rounds(whole, cfg, shards, range(4), budgets)
    first, _, _ = build(cfg)
    drive_rounds(first, cfg, shards, range(2), budgets)
    fresh, _, _ = build(cfg)
    fresh.load_state_dict(*roundtrip(*first.state_dict()))
    tail = drive_rounds(fresh, cfg, shards, range(2, 4), budgets)
    for got, want in zip(tail, reference[2:], strict=True):
        np.testing.assert_array_equal(got, want)
    assert fresh._round == whole._round == 3
    assert not np.array_equal(reference[1], reference[3])


def test_resume_with_another_model_is_a_one_line_error(tmp_path: Path) -> None:
    alg, _, _ = build(small_cfg(tmp_path))
    with pytest.raises(UserError, match=r"raffm checkpoint: \d+ weights saved"):
        alg.load_state_dict({"global_params": np.zeros(7, np.float32)}, {"round": 0})


# -- the paper suite's configs ------------------------------------------------------------------------------


def test_suite_configs_share_one_population_and_dataset() -> None:
    """fedemu reproduce and benchmarks/algorithms.py compare runs of these files: same data, same devices."""
    from tests.conftest import REPO

    suite = REPO / "examples" / "paper-suite"
    cfgs = {name: load_config(suite / f"{name}-small.toml") for name in ("fedavg", "fedpeft", "raffm", "profl")}
    assert {c.algorithm for c in cfgs.values()} == set(cfgs)
    for cfg in cfgs.values():
        assert cfg.data == cfgs["fedavg"].data and cfg.seed == cfgs["fedavg"].seed
        assert cfg.devices.mix == "small" and cfg.clients_per_round == cfgs["fedavg"].clients_per_round
    # The methods' budgets are one population; fedavg-small.toml gets them with --set (its twins).
    assert {cfgs[n].devices for n in ("fedpeft", "raffm", "profl")} == {cfgs["profl"].devices}


def test_raffm_small_example_puts_the_memory_wall_inside_the_ladder() -> None:
    """The premise written in examples/paper-suite/raffm-small.toml's header, measured."""
    from emulator.devices import configured_catalogue
    from tests.conftest import REPO

    cfg = load_config(REPO / "examples" / "paper-suite" / "raffm-small.toml", ["data.num_samples=200"])
    alg, _, _ = build(cfg)
    b = cfg.train.batch_size
    peaks = [int(c.peak(np.array([b]), b)[0]) for c in alg.ladder()]
    memory = {d.name: d.memory_bytes * cfg.devices.memory_fraction for d in configured_catalogue(cfg).devices}
    assert alg.ladder()[-1].size == alg.flat.size
    # Full training fits only the Pi 5s; the smallest subnetwork fits every device of the mix.
    assert peaks[0] < min(memory["rpi4"], memory["xps15"]) < peaks[-1] < memory["rpi5"]
