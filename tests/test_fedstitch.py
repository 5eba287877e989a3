"""FedStitch: closed-form stitching, scores, a whole run on one process, its trace, ablations and errors."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from emulator.algorithms.stitch_scores import label_entropy, linear_cka, ncm_accuracy, probe_accuracy
from emulator.algorithms.stitch_weighting import DataSizeWeighting, StepObservation, aggregate_scores
from emulator.comm import SingleComm
from emulator.config import load_config
from emulator.errors import UserError
from emulator.runner import run
from pools import Pool, build_pool, fit_residual, fit_rows, make_stitch, set_linear, solve_linear
from tests.conftest import REPO

MODELS = ["test_resnet", "test_efficientnet", "test_convnext"]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)  # random-init blocks: enough to exercise every path, fast to build
    path = tmp_path_factory.mktemp("pool") / "p"
    build_pool(path, models=MODELS, input_size=32)
    return path


def config(pool: Path, trace: Path, *extra: str):
    overrides = [
        f"pool.path={pool}", f"output.trace={trace}", "stitch.weighting=data", "runtime.progress=none",
        "data.partition.num_clients=20", "clients_per_round=5", "rounds=6", "runtime.threads=1", *extra,
    ]
    return load_config(str(REPO / "examples" / "quickstart.toml"), overrides)


def table(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r", swmr=True) as f:
        return f[key][:]


# ----------------------------------------------------------------------------- closed-form stitching
def test_stitch_fit_recovers_a_linear_map_exactly(pool_dir: Path) -> None:
    pool = Pool.load(pool_dir)
    a, b = pool.info("test_resnet.1"), pool.info("test_efficientnet.2")  # 32 ch /4 -> 24 ch /4
    stitch = make_stitch(a, b, 32)
    x = torch.randn(6, a.output.channels, 8, 8)
    true = torch.randn(a.output.channels + 1, b.input.channels, dtype=torch.float64)
    rows = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double(), torch.ones(6 * 64, 1).double()], 1)
    target = (rows @ true).float().reshape(6, 8, 8, -1).permute(0, 3, 1, 2)
    xr, tr = fit_rows(stitch, x, target)
    xtx, xty = (xr.double().T @ xr.double()).numpy(), (xr.double().T @ tr.double()).numpy()
    w = solve_linear(xtx, xty, ridge=0.0)
    np.testing.assert_allclose(w, true.numpy(), rtol=1e-3, atol=1e-3)
    set_linear(stitch, w)
    with torch.no_grad():
        torch.testing.assert_close(stitch(x), target, rtol=1e-3, atol=1e-3)
    tt = float((tr.double() ** 2).sum())
    assert fit_residual(xtx, xty, tt, tr.double().sum(0).numpy(), w) < 1e-6


def test_stitch_fit_handles_resampling_in_both_directions(pool_dir: Path) -> None:
    pool = Pool.load(pool_dir)
    down = make_stitch(pool.info("test_resnet.0"), pool.info("test_convnext.2"), 32)  # /2 -> /8
    up = make_stitch(pool.info("test_convnext.2"), pool.info("test_resnet.1"), 32)  # /16 -> /2
    for stitch, src, dst in ((down, (32, 16), (32, 4)), (up, (48, 2), (32, 16))):
        x, t = torch.randn(2, src[0], src[1], src[1]), torch.randn(2, dst[0], dst[1], dst[1])
        xr, tr = fit_rows(stitch, x, t)
        side = min(src[1], dst[1])
        assert xr.shape == (2 * side * side, src[0] + 1) and tr.shape == (2 * side * side, dst[0])


def test_solve_linear_does_not_penalise_the_bias() -> None:
    rows = np.hstack([np.zeros((10, 2)), np.ones((10, 1))])
    w = solve_linear(rows.T @ rows, rows.T @ np.full((10, 1), 3.0), ridge=10.0)
    assert w[-1, 0] == pytest.approx(3.0)


# ----------------------------------------------------------------------------- scores
def test_cka_is_high_for_label_features_and_nan_for_one_class() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    good = np.eye(3)[y] + 0.01 * rng.standard_normal((60, 3))
    noise = rng.standard_normal((60, 3))
    assert linear_cka(good, y, 3) > 0.95 > 0.3 > linear_cka(noise, y, 3)
    assert math.isnan(linear_cka(good, np.zeros(60, dtype=np.int64), 3))
    assert ncm_accuracy(good, y) == 1.0 and ncm_accuracy(noise, np.zeros(60, dtype=np.int64)) == 1.0
    assert probe_accuracy(good, y, 3) == 1.0
    assert label_entropy(y, 3) == pytest.approx(1.0) and label_entropy(np.zeros(5, dtype=np.int64), 3) == 0.0


def test_aggregate_scores_skips_clients_that_did_not_score() -> None:
    scores = np.array([[1.0, np.nan], [3.0, 2.0]])
    agg = aggregate_scores(scores, np.array([1.0, 3.0]))
    assert agg[0] == pytest.approx(2.5) and agg[1] == pytest.approx(2.0)
    assert np.isnan(aggregate_scores(np.full((2, 1), np.nan), np.ones(2))[0])


# ----------------------------------------------------------------------------- whole runs
def test_run_stitches_fits_a_head_and_writes_its_tables(pool_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    summary = run(config(pool_dir, trace), SingleComm())
    rounds = summary.rounds
    steps = table(trace, "stitch/steps")
    kinds = [k.decode() for k in steps["kind"]]
    assert kinds[0] == "step" and kinds[-1] == "head" and "head" not in kinds[: kinds.index("head")]
    chosen = [c.decode() for c in steps["chosen_block"] if c]
    assert chosen[0].endswith(".0")  # the first block takes the image
    # position order: the k-th block comes from some model's k-th block
    assert [int(c.rsplit(".", 1)[1]) for c in chosen] == list(range(len(chosen)))
    assert steps["depth"][-1] == len(chosen)
    acc = rounds["test_accuracy"][-1]
    assert 0.3 < acc <= 1.0  # digits with a ridge head on random conv features: far above chance (0.1)
    cands = table(trace, "stitch/candidates")
    scores = table(trace, "stitch/scores")
    clients = table(trace, "stitch/clients")
    first = steps["round"][0]
    n_cands = int(steps["num_candidates"][0])
    assert (cands["round"] == first).sum() == n_cands == 3
    assert (scores["round"] == first).sum() == n_cands * int(steps["num_clients"][0])
    w = clients["weight"][clients["round"] == first]
    assert w.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(w, clients["data_weight"][clients["round"] == first], rtol=1e-5)  # data weights
    rl = table(trace, "rl/steps")
    assert rl["done"][-1] == 1 and rl["reward"][-1] == pytest.approx(acc, abs=1e-6)
    cr = table(trace, "client_rounds/table")
    ok = cr["status"] == 0
    assert (cr["bytes_up"][ok] > 0).all() and (cr["flops"][ok] > 0).all()


def test_stitching_layers_are_fitted_when_signatures_differ(pool_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    # "any" order lets every joinable block follow: the choice crosses models and needs stitching layers
    run(config(pool_dir, trace, "stitch.order=any", "stitch.patience=3", "stitch.min_gain=-1"), SingleComm())
    steps = table(trace, "stitch/steps")
    fitted = steps[(steps["kind"] == b"step") & (steps["stitch_identity"] == 0)]
    assert len(fitted) >= 1
    assert np.all((fitted["stitch_residual"] >= 0) & (fitted["stitch_residual"] < 1.5))


def test_search_space_optimizer_drops_models_and_its_ablation_keeps_them(pool_dir: Path, tmp_path: Path) -> None:
    on, off = tmp_path / "on.h5", tmp_path / "off.h5"
    run(config(pool_dir, on), SingleComm())
    run(config(pool_dir, off, "stitch.search_space=false"), SingleComm())
    s_on, s_off = table(on, "stitch/steps"), table(off, "stitch/steps")
    assert s_on["models_after"][0] == 2  # 3 models, bottom half dropped, never below 2
    assert (s_off["models_after"] == 3).all()


def test_feature_cache_gives_the_same_results_as_recomputing(pool_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    ra = run(config(pool_dir, a, "clients_per_round=20"), SingleComm())
    rb = run(config(pool_dir, b, "clients_per_round=20", "stitch.cache=false"), SingleComm())
    np.testing.assert_allclose(ra.rounds["test_accuracy"], rb.rounds["test_accuracy"], rtol=1e-6)
    np.testing.assert_allclose(table(a, "stitch/scores")["score"], table(b, "stitch/scores")["score"], rtol=1e-5)
    # the emulated cost: without the cache a client re-runs its prefix for every candidate
    fa, fb = table(a, "client_rounds/table")["flops"], table(b, "client_rounds/table")["flops"]
    assert fb.sum() > 1.5 * fa.sum()


def test_clients_that_cannot_hold_the_smallest_candidate_are_oom(pool_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.h5"
    run(config(pool_dir, trace, "devices.memory_fraction=0.00001", "rounds=3"), SingleComm())
    cr = table(trace, "client_rounds/table")
    reached = cr["status"] != 4
    assert (cr["status"][reached] == 1).all()  # every reached client: oom


def test_weighting_decides_the_aggregation(pool_dir: Path, tmp_path: Path) -> None:
    class OnlyFirst(DataSizeWeighting):
        name = "only-first"

        def __init__(self) -> None:
            self.rewards: list[tuple[float, bool]] = []
            self.seen: list[StepObservation] = []

        def weights(self, obs: StepObservation) -> np.ndarray:
            self.seen.append(obs)
            w = np.zeros(len(obs.num_samples))
            w[0] = 1.0
            return w

        def reward(self, value: float, *, done: bool) -> None:
            self.rewards.append((value, done))

    policy = OnlyFirst()
    trace = tmp_path / "t.h5"
    summary = run(config(pool_dir, trace), SingleComm(), weighting=policy)
    assert policy.seen and policy.rewards[-1] == (pytest.approx(summary.rounds["test_accuracy"][-1]), True)
    assert sum(done for _, done in policy.rewards) == 1
    cands = table(trace, "stitch/candidates")
    first = cands[cands["round"] == 0]
    s0 = policy.seen[0].scores[0]
    np.testing.assert_allclose(first["score"], s0, rtol=1e-5)  # the aggregate is client 0's scores
    assert table(trace, "rl/steps")["policy"][0] == b"only-first"


def test_missing_pool_and_too_few_rounds_are_one_line_errors(pool_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no pool there; build it"):
        run(config(tmp_path / "nowhere", tmp_path / "t.h5"), SingleComm())
    with pytest.raises(UserError, match="fedstitch needs at least 2"):
        run(config(pool_dir, tmp_path / "u.h5", "rounds=1"), SingleComm())
