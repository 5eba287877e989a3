"""ProFL: the effective-movement metric, the freezing rule, block surgery, memory, and whole runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from emulator.algorithms import create_algorithm
from emulator.algorithms.base import STOP, ClientTask
from emulator.algorithms.profl import ProFL, ProFLInfo
from emulator.algorithms.profl_blocks import split_model
from emulator.algorithms.profl_metric import FreezeRule, effective_movement
from emulator.batches import BatchMaker
from emulator.comm import SingleComm
from emulator.config import Config, load_config
from emulator.devices.memory import MemoryCache
from emulator.errors import ConfigError, UserError
from emulator.flat import FlatModel
from emulator.models import create_model
from emulator.records import CLIENT_ROUND_DTYPE, STATUS_OK, STATUS_OOM
from emulator.runner import build_model, load_data, run

# ---- the metric ---------------------------------------------------------------------------------------


def _walk(deltas: list[np.ndarray]) -> list[np.ndarray]:
    out = [np.zeros_like(deltas[0])]
    for d in deltas:
        out.append(out[-1] + d)
    return out


def test_constant_direction_gives_em_one() -> None:
    d = np.random.default_rng(0).standard_normal(50)
    snaps = _walk([d * (1 + 0.1 * k) for k in range(5)])  # same direction, varying step size
    assert effective_movement(snaps) == pytest.approx(1.0)
    assert effective_movement(snaps, offsets=[0, 20]) == pytest.approx(1.0)


@pytest.mark.parametrize("window", [4, 5, 6])
def test_alternating_moves_give_em_near_zero(window: int) -> None:
    d = np.random.default_rng(1).standard_normal(50)
    snaps = _walk([d if k % 2 == 0 else -d for k in range(window)])
    em = effective_movement(snaps)
    # An even window cancels exactly; an odd one leaves one step out of W.
    assert em == pytest.approx(0.0 if window % 2 == 0 else 1.0 / window, abs=1e-12)


def test_random_walk_sits_near_one_over_sqrt_window() -> None:
    """Documents the floor of an undirected walk (why tau = 0.15 needs oscillation, not noise)."""
    rng = np.random.default_rng(2)
    snaps = _walk([rng.standard_normal(200_000) for _ in range(5)])
    assert effective_movement(snaps) == pytest.approx(1 / np.sqrt(5), rel=0.02)


def test_layer_mean_averages_per_tensor_ratios() -> None:
    a = np.ones(10)
    b = np.ones(30)
    deltas = [np.concatenate([a, b if k % 2 == 0 else -b]) for k in range(4)]
    snaps = _walk(deltas)
    assert effective_movement(snaps, offsets=[0, 10]) == pytest.approx(0.5)  # tensor 1: 1, tensor 2: 0
    assert effective_movement(snaps) == pytest.approx(40 / 160)  # one vector: |4·10 + 0| / (4·40)
    assert effective_movement([np.zeros(3), np.zeros(3)]) == 0.0  # nothing moved: converged


# ---- the freezing rule ----------------------------------------------------------------------------------


def _rule(**kw: int | float) -> FreezeRule:
    args = {"window": 2, "threshold": 0.15, "patience": 2, "min_rounds": 1, "max_rounds": 50, **kw}
    rule = FreezeRule(**args)  # type: ignore[arg-type]
    rule.start(np.zeros(4, np.float32))
    return rule


def test_rule_freezes_after_patience_consecutive_low_checks() -> None:
    d = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    rule = _rule()
    # Alternating: no check at update 1, EM = 0 at updates 2 and 3 -> freeze at round 3.
    assert [rule.observe(s) for s in (d, 0 * d, d)] == [False, False, True]
    assert rule.em == pytest.approx(0.0) and rule.below == 2


def test_a_high_check_resets_the_count() -> None:
    d = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    rule = _rule()
    decisions, below = [], []
    for s in (d, 0 * d, 3 * d, 0 * d, 3 * d):
        decisions.append(rule.observe(s))
        below.append(rule.below)
    # EM: -, 0 (low), |3d - d| / (|d| + |3d|) = 0.5 (high: reset), 0 (low), 0 (low) -> freeze.
    assert below == [0, 1, 0, 1, 2]
    assert decisions == [False, False, False, False, True]


def test_min_rounds_holds_back_and_max_rounds_forces_a_freeze() -> None:
    d = np.ones(4, np.float32)
    late = _rule(min_rounds=6)
    alternating = [d, 0 * d] * 4
    assert next(i + 1 for i, s in enumerate(alternating) if late.observe(s)) == 6
    steady = _rule(max_rounds=7)
    assert next(i + 1 for i in range(20) if steady.observe(d * (i + 1))) == 7
    assert steady.em == pytest.approx(1.0) and steady.below == 0


def test_rounds_without_update_neither_count_nor_reset() -> None:
    d = np.ones(4, np.float32)
    rule = _rule()
    assert [rule.observe(s) for s in (d, None, 0 * d)] == [False, False, False]
    assert rule.updates == 2 and rule.rounds == 3 and rule.below == 1
    assert rule.observe(None) is False and rule.below == 1  # a silent round keeps the count
    assert rule.observe(d) is True  # second consecutive low check


# ---- blocks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "blocks"), [("tiny_cnn", 2), ("test_resnet", 4), ("test_convnext", 4),
                                              ("test_efficientnet", 4), ("test_vit", 4), ("mlp", 1)])
def test_blocks_and_head_partition_the_model_and_compute_it(name: str, blocks: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=3, image_size=32)
    x = torch.randn(3, 3, 32, 32)
    split = split_model(model, name, num_blocks=4, sample=x[:2])
    assert len(split.blocks) == blocks
    ids = [{id(p) for p in m.parameters()} for m in [*split.blocks, split.head]]
    assert sum(len(s) for s in ids) == len(set().union(*ids)) == len(list(model.parameters()))
    model.eval()
    with torch.no_grad():
        h = x
        for b in split.blocks:
            h = b(h)
        torch.testing.assert_close(split.head(h), model(x))


def test_num_blocks_merges_the_front_stages() -> None:
    model = create_model("test_resnet", num_classes=5, in_chans=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    every = split_model(model, "test_resnet", num_blocks=0, sample=x)
    two = split_model(model, "test_resnet", num_blocks=2, sample=x)
    assert len(every.blocks) == 5 and len(two.blocks) == 2
    assert two.shapes[-1] == every.shapes[-1] and two.shapes[0] == every.shapes[3]


def test_a_model_without_cut_points_is_a_one_line_error() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(UserError, match="ProFL cannot cut it into blocks"):
        split_model(model, "custom", num_blocks=4, sample=torch.zeros(2, 3, 2, 2))


def test_config_errors_name_key_value_and_range() -> None:
    with pytest.raises(ConfigError, match=r"^profl\.max_rounds_per_block = 3: must be >= profl\.min_rounds_per"):
        load_config(None, ["profl.min_rounds_per_block=4", "profl.max_rounds_per_block=3"])
    with pytest.raises(ConfigError, match=r"^profl\.metric = 'l2': allowed: block, layer_mean$"):
        load_config(None, ["profl.metric=l2"])
    with pytest.raises(ConfigError, match=r"^profl\.threshold = 1\.5: allowed range \(0\.0, 1\.0\]$"):
        load_config(None, ["profl.threshold=1.5"])


# ---- memory ---------------------------------------------------------------------------------------------


def _algorithms(*overrides: str) -> tuple[ProFL, object, BatchMaker]:
    cfg = load_config(None, ["data.dataset=synthetic", "data.num_samples=200", "data.num_classes=4",
                             "data.image_size=32", "model.name=test_resnet", "train.batch_size=16",
                             "train.momentum=0.9", *overrides])
    data = load_data(cfg)
    batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std)

    def make(name: str) -> object:
        model = build_model(cfg, data)
        return create_algorithm(name, cfg=cfg, model=model, flat=FlatModel(model), batches=batches,
                                num_classes=data.num_classes)

    profl = make("profl")
    assert isinstance(profl, ProFL)
    return profl, make("fedavg"), batches


def test_frozen_blocks_keep_no_gradients_or_optimizer_state_and_cost_less() -> None:
    profl, fedavg, _ = _algorithms()
    full = fedavg.estimate_work(num_samples=np.array([16])).peak_bytes[0]  # type: ignore[attr-defined]
    peaks = []
    for step in profl.steps:
        net = profl.net(step)
        trainable = sum(p.numel() for p in [*net.active.parameters(), *net.out.parameters()])
        frozen = sum(p.numel() for p in net.prefix.parameters())
        m = MemoryCache(net, sample_shape=(3, 32, 32), num_classes=4, optimizer_factor=1).training(16)
        # Gradients and momentum exist for the active block + output module only: 4 bytes per parameter each.
        assert m.grads_bytes == 4 * trainable and m.optimizer_bytes == 4 * trainable
        assert m.params_bytes == 4 * (trainable + frozen)
        if step[1] > 0:
            assert frozen > 0
        peaks.append(profl._cost(step, 16).state_bytes + profl._cost(step, 16).activation_bytes)
    assert max(peaks) < 0.8 * full  # measured: every step is well below full training (~ -38% here)
    work = profl.estimate_work(num_samples=np.array([4, 16, 40]))
    assert work.peak_bytes[0] < work.peak_bytes[1] == work.peak_bytes[2] == peaks[0]


def test_client_update_leaves_frozen_prefix_untouched() -> None:
    profl, _, _ = _algorithms("profl.shrinking=none")
    grow2 = ("grow", 2)
    profl.step_index = profl.steps.index(grow2)
    info = ProFLInfo(stage="grow", block=2, catch_from=0, catch_to=2)
    profl._info = info
    before = profl.state.copy()
    task = ClientTask(round=0, client=0, indices=np.arange(40), rng=np.random.default_rng(0), torch_seed=1)
    result = profl.client_update(global_params=profl.broadcast_state(), task=task, info=info)
    net = profl.net(grow2)
    assert all(p.grad is None for p in net.prefix.parameters())
    assert all(p.grad is not None for p in net.active.parameters())
    prefix = slice(0, profl._parts[2].start)
    # Running statistics and weights of the frozen blocks did not move in the model itself.
    model_now = np.concatenate([profl._get(i) for i in range(2)])
    np.testing.assert_array_equal(model_now, before[prefix])
    assert result.params.size == profl.trainable_size(2) and result.steps == 3
    assert not np.array_equal(result.params[: profl._parts[2].size], before[profl._slice(2)])


# ---- whole runs -----------------------------------------------------------------------------------------

RUN = [
    "algorithm=profl", "model.name=test_convnext", "data.dataset=synthetic", "data.num_samples=600",
    "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=12", "data.partition.name=iid",
    "clients_per_round=4", "train.batch_size=16", "runtime.threads=1", "runtime.progress=none",
    "devices.availability=false", "profl.num_blocks=3", "profl.shrink_rounds=1", "profl.window=2",
    "profl.min_rounds_per_block=2", "profl.max_rounds_per_block=3", "rounds=40",
]


def _twin(cfg: Config) -> ProFL:
    """A ProFL instance with the run's layout (to read its state slices)."""
    data = load_data(cfg)
    model = build_model(cfg, data)
    batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std)
    return ProFL(cfg=cfg, model=model, flat=FlatModel(model), batches=batches, num_classes=data.num_classes)


def test_profl_run_shrinks_grows_freezes_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states: list[tuple[ProFLInfo, np.ndarray, float]] = []
    original = ProFL.conclude_round

    def spy(self: ProFL, **kw: Any) -> None:
        original(self, **kw)
        states.append((self._info, self.state.copy(), float(kw["summed"][-1])))

    monkeypatch.setattr(ProFL, "conclude_round", spy)
    cfg = load_config(None, [*RUN, f"output.trace={tmp_path / 'profl.h5'}"])
    summary = run(cfg, SingleComm())
    assert summary is not None
    with h5py.File(summary.trace_path, "r") as f:
        table = f["/profl/rounds"][:]
        records = f["/client_rounds/table"][:]
    n = len(summary.rounds)
    assert n < 40 and len(table) == n == len(states)  # STOP once the last block froze
    stages = [(s.decode(), int(b)) for s, b in zip(table["stage"], table["block"], strict=True)]
    order = [k for i, k in enumerate(stages) if i == 0 or stages[i - 1] != k]
    assert order == [("shrink", 2), ("shrink", 1), ("shrink", 0), ("grow", 0), ("grow", 1), ("grow", 2)]
    grow = table[table["stage"] == b"grow"]
    # window 2, patience 2: the earliest EM freeze is at round 3, and max_rounds_per_block = 3.
    assert np.bincount(grow["block"]).tolist() == [3, 3, 3]
    assert grow["frozen"].tolist() == [0, 0, 1] * 3 and np.isfinite(grow["em"][grow["block_round"] >= 2]).all()
    assert summary.rounds["test_accuracy"][-1] > 0.4, summary.rounds["test_accuracy"]  # chance: 0.25

    twin = _twin(cfg)
    for i, (info, state, weight) in enumerate(states):
        active = twin._slice(info.block)
        if weight > 0 and i > 0:  # the active block moved
            assert not np.array_equal(states[i - 1][1][active], state[active])
        if info.stage == "grow" and table["frozen"][i]:  # and once frozen, it never changes again
            for _, later, _ in states[i + 1 :]:
                np.testing.assert_array_equal(later[active], state[active])
    # Only the active block + output module go up; the frozen prefix comes down with them.
    ok = records["status"] == STATUS_OK
    rows = table[records["round"][ok]]
    assert np.array_equal(records["bytes_up"][ok], rows["bytes_up"])
    assert np.array_equal(records["bytes_down"][ok], rows["bytes_down"])
    floats = np.array([twin.trainable_size(int(b)) for b in rows["block"]])
    prefix = np.array([twin._parts[int(b)].start for b in rows["block"]])
    assert (rows["bytes_up"] == 4 * floats).all() and (rows["bytes_down"] == 4 * (floats + prefix)).all()
    # Every client holds >= batch_size samples, so its peak is the step's measured peak.
    assert np.array_equal(records["peak_memory_bytes"], table["peak_train_bytes"][records["round"]])
    assert len(set(table["peak_train_bytes"].tolist())) > 1  # and it differs from step to step


def test_budget_between_profl_steps_and_full_training_only_fedavg_ooms(tmp_path: Path) -> None:
    profl, fedavg, _ = _algorithms("model.name=test_convnext")
    full = int(fedavg.estimate_work(num_samples=np.array([16])).peak_bytes[0])  # type: ignore[attr-defined]
    step_max = max(profl._cost(s, 16).state_bytes + profl._cost(s, 16).activation_bytes for s in profl.steps)
    budget = (step_max + full) // 2
    fraction = budget / (3.2 * 2**30)  # homogeneous Raspberry Pi 4s (3.2 GiB)
    common = [*RUN, "devices.mix=homogeneous:rpi4", f"devices.memory_fraction={fraction}", "rounds=6"]
    status = {}
    for algo in ("profl", "fedavg"):
        cfg = load_config(None, [*common, f"algorithm={algo}", f"output.trace={tmp_path / algo}.h5"])
        summary = run(cfg, SingleComm())
        assert summary is not None
        with h5py.File(summary.trace_path, "r") as f:
            rec = f["/client_rounds/table"][:]
        status[algo] = rec["status"]
        assert (rec["memory_budget_bytes"] == int(3.2 * 2**30 * fraction)).all()
    assert (status["profl"] == STATUS_OK).all()
    assert (status["fedavg"] == STATUS_OOM).all()


def test_a_rank_idle_for_rounds_catches_up_on_frozen_blocks() -> None:
    """Two worker instances, one idle across a freeze, give the same model as one worker doing everything."""
    overrides = ["model.name=tiny_cnn", "profl.shrink_rounds=1", "profl.window=1", "profl.patience=1",
                 "profl.min_rounds_per_block=2", "profl.max_rounds_per_block=2"]

    def drive(schedule: list[int]) -> tuple[np.ndarray, list[int]]:
        server = _algorithms(*overrides)[0]
        workers = {rank: _algorithms(*overrides)[0] for rank in set(schedule)}
        sizes = []
        for r in range(100):
            info = server.begin_round(round=r)
            if isinstance(info, str) and info == STOP:
                break
            server.assign(clients=np.array([r]), costs=np.ones(1), workers=sorted(workers))
            rank = schedule[r % len(schedule)]
            task = ClientTask(round=r, client=r, indices=np.arange(8 * (r % 3 + 1)),
                              rng=np.random.default_rng(r), torch_seed=r)
            state = server.broadcast_state().copy()
            sizes.append(state.size - server.trainable_size(info.block))
            result = workers[rank].client_update(global_params=state, task=task, info=info)
            acc = np.zeros(server.accumulator_size(info))
            workers[rank].accumulate(acc, result, np.empty_like(acc))
            rec = np.zeros(1, dtype=CLIENT_ROUND_DTYPE)
            rec["rank"] = rank
            server.conclude_round(round=r, summed=acc, records=rec, extras=[])
        return server.state, sizes

    one, sizes = drive([1])
    # shrink 1, shrink 0, grow 0 (2 rounds), grow 1 (2 rounds): block 0's final values travel once.
    assert len(sizes) == 6 and [s > 0 for s in sizes] == [False] * 4 + [True, False]
    # Rank 1 trains block 0 in rounds 0-2, rank 2 finishes it in round 3; rank 1 needs the final values.
    mixed, sizes = drive([1, 1, 1, 2, 1, 1])
    assert [s > 0 for s in sizes] == [False] * 4 + [True, True]  # resent until rank 2 has run again
    np.testing.assert_array_equal(mixed, one)


def test_profl_small_example_puts_the_memory_wall_between_profl_and_fedavg() -> None:
    """The premise written in examples/paper-suite/profl-small.toml's header, measured."""
    from emulator.devices import configured_catalogue
    from tests.conftest import REPO

    cfg = load_config(REPO / "examples" / "paper-suite" / "profl-small.toml", ["data.num_samples=200"])
    assert cfg.algorithm == "profl" and cfg.devices.mix == "small"
    data = load_data(cfg)
    batches = BatchMaker(data.x_train, data.y_train, data.mean, data.std)
    algos = {}
    for name in ("profl", "fedavg"):
        model = build_model(cfg, data)
        algos[name] = create_algorithm(name, cfg=cfg, model=model, flat=FlatModel(model), batches=batches,
                                       num_classes=data.num_classes)
    b = cfg.train.batch_size
    full = int(algos["fedavg"].estimate_work(num_samples=np.array([b])).peak_bytes[0])
    profl = algos["profl"]
    assert isinstance(profl, ProFL) and profl.num_blocks == 4
    step_max = max(profl._cost(s, b).state_bytes + profl._cost(s, b).activation_bytes for s in profl.steps)
    memory = {d.name: d.memory_bytes * cfg.devices.memory_fraction for d in configured_catalogue(cfg).devices}
    assert step_max < min(memory["rpi4"], memory["xps15"]) < full < memory["rpi5"]
    assert step_max < 0.5 * full  # the measured reduction is about -57%


# ---- checkpoint / resume --------------------------------------------------------------------------------

RESUME = ["model.name=tiny_cnn", "profl.shrink_rounds=1", "profl.window=2", "profl.patience=1",
          "profl.min_rounds_per_block=2", "profl.max_rounds_per_block=4", "profl.threshold=0.9",
          "train.lr=0.2"]  # threshold: the EM rule freezes both blocks, before max_rounds


def _drive(server: ProFL, worker: ProFL, rounds: range, log: list[tuple[Any, ...]]) -> bool:
    """Rounds with rank 0 serving and a separate worker rank (1) training; False once ProFL stopped."""
    for r in rounds:
        info = server.begin_round(round=r)
        if isinstance(info, str) and info == STOP:
            return False
        server.assign(clients=np.array([r, r + 1]), costs=np.ones(2), workers=[1])
        state = server.broadcast_state().copy()
        acc = np.zeros(server.accumulator_size(info))
        for c in (r, r + 1):
            task = ClientTask(round=r, client=c, indices=np.arange(8 * (c % 3 + 2)),
                              rng=np.random.default_rng([r, c]), torch_seed=1000 * r + c)
            worker.accumulate(acc, worker.client_update(global_params=state, task=task, info=info),
                              np.empty_like(acc))
        rec = np.zeros(2, dtype=CLIENT_ROUND_DTYPE)
        rec["rank"] = 1
        server.conclude_round(round=r, summed=acc, records=rec, extras=[])
        rule = server._rule
        log.append((info, state.size, server.state.copy(), None if rule is None else (rule.rounds, rule.below)))
    return True


@pytest.mark.parametrize("k", [1, 3, 5, 6])  # 5, 6: mid-way through growing block 1
def test_resume_from_state_dict_continues_exactly(k: int) -> None:
    """Server and worker both fresh after round k-1 (as after a job restart) give the uninterrupted run."""
    from tests.test_fedpeft import roundtrip

    reference: list[tuple[Any, ...]] = []
    assert not _drive(_algorithms(*RESUME)[0], _algorithms(*RESUME)[0], range(100), reference)
    stages = [(i.stage, i.block) for i, *_ in reference]
    assert stages[:3] == [("shrink", 1), ("shrink", 0), ("grow", 0)] and stages[-1] == ("grow", 1)

    log: list[tuple[Any, ...]] = []
    server = _algorithms(*RESUME)[0]
    _drive(server, _algorithms(*RESUME)[0], range(k), log)
    fresh = _algorithms(*RESUME)[0]
    fresh.load_state_dict(*roundtrip(*server.state_dict()))
    assert not _drive(fresh, _algorithms(*RESUME)[0], range(k, 100), log)
    assert len(log) == len(reference)
    for (info, _, state, rule), (info0, _, state0, rule0) in zip(log, reference, strict=True):
        assert (info.stage, info.block, rule) == (info0.stage, info0.block, rule0)
        np.testing.assert_array_equal(state, state0)
    # The first resumed round resends the frozen prefix the fresh worker lacks (only block 1's growing step
    # has one: block 0, frozen).
    info = log[k][0]
    prefix = fresh._parts[0].size if (info.stage, info.block) == ("grow", 1) else 0
    assert log[k][1] == fresh.trainable_size(info.block) + prefix


def test_resume_with_another_block_layout_is_a_one_line_error() -> None:
    saved = _algorithms(*RESUME)[0].state_dict()
    other = _algorithms("model.name=test_resnet")[0]
    with pytest.raises(UserError, match="profl checkpoint: its blocks and steps differ"):
        other.load_state_dict(*saved)


def test_each_step_samples_only_clients_whose_memory_holds_it(tmp_path: Path) -> None:
    """Pi 4s cannot hold the largest step, Pi 5s can: with fitting_clients the cohort has no oom."""
    profl, _, _ = _algorithms("model.name=test_convnext")
    peaks = [profl._cost(s, 16).state_bytes + profl._cost(s, 16).activation_bytes for s in profl.steps]
    big, small = max(peaks), min(peaks)
    assert small < big
    fraction = (small + big) / 2 / (3.2 * 2**30)  # a Pi 4 (3.2 GiB) holds the smallest step, not the largest
    assert big <= 7.2 * 2**30 * fraction  # a Pi 5 (7.2 GiB) holds every step
    common = [*RUN, "devices.mix=rpi4:0.5,rpi5:0.5", f"devices.memory_fraction={fraction}", "rounds=9",
              "devices.availability=false"]
    out = {}
    for fitting in (True, False):
        cfg = load_config(None, [*common, f"profl.fitting_clients={str(fitting).lower()}",
                                 f"output.trace={tmp_path / str(fitting)}.h5"])
        summary = run(cfg, SingleComm())
        assert summary is not None
        with h5py.File(summary.trace_path, "r") as f:
            out[fitting] = (f["/client_rounds/table"][:], f["/profl/rounds"][:])
    rec, table = out[True]
    assert not (rec["status"] == STATUS_OOM).any()
    assert (rec["peak_memory_bytes"] <= rec["memory_budget_bytes"]).all()
    big_rounds = table["round"][table["peak_train_bytes"] > int(3.2 * 2**30 * fraction)]
    assert len(big_rounds)  # some step really is too big for a Pi 4 ...
    assert (rec["peak_memory_bytes"][np.isin(rec["round"], big_rounds)] > 0).all()
    rec_all, _ = out[False]
    assert (rec_all["status"] == STATUS_OOM).any()  # ... and sampling everyone makes Pi 4s oom there
