"""rl_agent environments: padding and masks, replay rewards on hand-made traces, check_env, the live bridge.

The helpers here (toy steps where a meta feature marks noisy clients, a writer of hand-made
FedStitch traces) are shared by the other tests/test_rl_*.py files.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from emulator import records
from emulator.algorithms.stitch_weighting import META_COLUMNS, StepObservation, aggregate_scores, client_meta
from emulator.config import Config, config_from_dict, load_config, to_toml
from emulator.trace import TraceWriter, open_trace
from rl_agent.env import ReplayStitchEnv, StitchEnv
from rl_agent.observation import SCORE_CLIP, encode, expand_actions, observation_space
from rl_agent.replay import RecordedStep, load_episode

REPO = Path(__file__).resolve().parents[1]

# ---- shared helpers ------------------------------------------------------------------------------------


def toy_step(
    rng: np.random.Generator, *, round: int = 0, step: int = 0, max_steps: int = 4, num_clients: int = 8,
    num_candidates: int = 6,
) -> RecordedStep:
    """A step where noisy clients (low label entropy, many samples) all push a decoy candidate.

    Good clients score the candidates by their true quality; data-size weights mostly follow the
    noisy majority of samples to the decoy, so weighting the noisy clients down pays.
    """
    k = num_candidates
    quality = rng.uniform(0.0, 1.0, k)
    best = int(quality.argmax())
    decoy = int(rng.choice([j for j in range(k) if j != best]))
    noisy = np.zeros(num_clients, dtype=bool)
    noisy[rng.choice(num_clients, int(rng.integers(3, 6)), replace=False)] = True
    num_samples = np.where(noisy, rng.integers(100, 200, num_clients), rng.integers(30, 120, num_clients))
    scores = quality[None, :] + 0.05 * rng.normal(size=(num_clients, k))
    scores[noisy] = 0.3 * rng.normal(size=(int(noisy.sum()), k))
    scores[noisy, decoy] += 0.5
    scores[rng.integers(num_clients), k - 1] = np.nan  # one client could not hold the last candidate
    label_entropy = np.where(noisy, 0.1 + 0.1 * rng.uniform(size=num_clients),
                             0.8 + 0.2 * rng.uniform(size=num_clients))
    prefix = 0.3 + 0.05 * rng.uniform(size=num_clients)
    proxies = np.clip(prefix[:, None] + 0.2 * quality[None, :] + 0.02 * rng.normal(size=(num_clients, k)), 0, 1)
    proxies[~np.isfinite(scores)] = np.nan
    meta = client_meta(scores=scores, num_samples=num_samples, label_entropy=label_entropy, prefix_proxy=prefix)
    obs = StepObservation(
        round=round, step=step, max_steps=max_steps, scores=scores.astype(np.float32),
        proxies=proxies.astype(np.float32), num_samples=num_samples.astype(np.int64), meta=meta,
        clients=np.sort(rng.choice(1000, num_clients, replace=False)).astype(np.int64),
        candidates=tuple(f"m{j % 3}.b{j}" for j in range(k)),
    )
    return RecordedStep(obs=obs, candidate_proxy=0.4 + 0.1 * quality, proxy_before=0.4, recorded_chosen=best)


def toy_episodes(seed: int, episodes: int, steps: int = 3) -> list[list[RecordedStep]]:
    rng = np.random.default_rng(seed)
    return [[toy_step(rng, round=t, step=t, max_steps=steps) for t in range(steps)] for _ in range(episodes)]


def stitch_tables() -> dict[str, np.dtype]:
    return {"stitch/steps": records.STITCH_STEP_DTYPE, "stitch/candidates": records.STITCH_CANDIDATE_DTYPE,
            "stitch/scores": records.STITCH_SCORE_DTYPE, "stitch/clients": records.STITCH_CLIENT_DTYPE,
            "rl/steps": records.RL_STEP_DTYPE}


def write_trace(path: Path, episode: list[RecordedStep], *, seed: int = 0, depth: int = 4,
                extra_round: bool = False) -> Path:
    """A hand-made FedStitch trace holding ``episode``'s steps, one round each, as FedStitch writes them.

    ``extra_round``: also append a half-written round (a steps row without its candidates), as a killed
    run may leave.
    """
    cfg = config_from_dict({"algorithm": "fedstitch", "seed": seed, "stitch": {"depth": depth}})
    num = 1000
    clients = np.zeros(num, dtype=records.CLIENT_DTYPE)
    clients["client"] = np.arange(num)
    clients["num_samples"] = 100
    label_counts = np.ones((num, 10), dtype=np.int32)
    with TraceWriter(path, attrs={"config": to_toml(cfg)}, clients=clients, label_counts=label_counts,
                     tables=stitch_tables(), overwrite=True) as w:
        for rec in episode:
            o = rec.obs
            r = o.round
            c, k = o.scores.shape
            chosen = rec.recorded_chosen
            row = np.zeros(1, records.STITCH_STEP_DTYPE)
            row["round"], row["step"], row["kind"] = r, o.step, b"step"
            row["num_candidates"], row["num_clients"], row["chosen"] = k, c, chosen
            row["chosen_block"] = o.candidates[chosen].encode()
            row["proxy_before"], row["proxy_after"] = rec.proxy_before, rec.candidate_proxy[chosen]
            row["reward"] = rec.gain(chosen)
            w.append("stitch/steps", row)
            cand = np.zeros(k, records.STITCH_CANDIDATE_DTYPE)
            cand["round"], cand["index"] = r, np.arange(k)
            cand["block"] = [b.encode() for b in o.candidates]
            cand["model"] = [b.split(".")[0].encode() for b in o.candidates]
            cand["score"] = cand["data_score"] = aggregate_scores(o.scores, o.num_samples.astype(np.float64))
            cand["proxy"] = rec.candidate_proxy
            cand["num_scored"] = np.isfinite(o.scores).sum(axis=0)
            w.append("stitch/candidates", cand)
            ii, jj = np.nonzero(np.isfinite(o.scores))
            sc = np.zeros(len(ii), records.STITCH_SCORE_DTYPE)
            sc["round"], sc["client"], sc["index"] = r, o.clients[ii], jj
            sc["score"], sc["proxy"] = o.scores[ii, jj], o.proxies[ii, jj]
            w.append("stitch/scores", sc)
            cl = np.zeros(c, records.STITCH_CLIENT_DTYPE)
            cl["round"], cl["client"], cl["num_samples"] = r, o.clients, o.num_samples
            cl["action"] = 1.0
            cl["weight"] = cl["data_weight"] = o.num_samples / o.num_samples.sum()
            for j, name in enumerate(META_COLUMNS):
                cl[name] = o.meta[:, j]
            w.append("stitch/clients", cl)
            rl = np.zeros(1, records.RL_STEP_DTYPE)
            rl["round"], rl["step"], rl["policy"], rl["reward"] = r, o.step, b"data", row["reward"]
            rl["num_clients"], rl["num_candidates"] = c, k
            w.append("rl/steps", rl)
        if extra_round:
            row = np.zeros(1, records.STITCH_STEP_DTYPE)
            row["round"], row["step"], row["kind"], row["num_candidates"] = len(episode) + 5, 9, b"step", 3
            w.append("stitch/steps", row)
    return path


def manual_step(scores: list[list[float]], num_samples: list[int], *, cand_proxy: list[float],
                proxy_before: float = 0.5) -> RecordedStep:
    s = np.asarray(scores, dtype=np.float32)
    n = np.asarray(num_samples, dtype=np.int64)
    c, k = s.shape
    meta = client_meta(scores=s, num_samples=n, label_entropy=np.full(c, 0.5), prefix_proxy=np.full(c, proxy_before))
    obs = StepObservation(round=0, step=0, max_steps=2, scores=s, proxies=np.full((c, k), 0.6, np.float32),
                          num_samples=n, meta=meta, clients=np.arange(c, dtype=np.int64),
                          candidates=tuple(f"m.b{j}" for j in range(k)))
    return RecordedStep(obs=obs, candidate_proxy=np.asarray(cand_proxy, dtype=np.float64),
                        proxy_before=proxy_before, recorded_chosen=0)


# ---- observation ---------------------------------------------------------------------------------------


def test_padding_masks_and_standardised_scores() -> None:
    step = toy_step(np.random.default_rng(0), step=1, max_steps=4, num_clients=5, num_candidates=3)
    enc = encode(step.obs, 8, 6)
    o = enc.obs
    assert o in observation_space(8, 6)
    np.testing.assert_array_equal(o["client_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(o["candidate_mask"], [1, 1, 1, 0, 0, 0])
    assert o["step"][0] == pytest.approx(0.25)
    valid = np.isfinite(step.obs.scores)
    block = o["scores"][:5, :3]
    assert block[valid].mean() == pytest.approx(0.0, abs=1e-5)
    assert block[valid].std() == pytest.approx(1.0, abs=1e-4)
    assert (block[~valid] == 0).all() and (o["proxies"][:5, :3][~valid] == 0).all()
    assert (o["scores"][5:] == 0).all() and (o["scores"][:, 3:] == 0).all() and (o["meta"][5:] == 0).all()
    np.testing.assert_allclose(o["meta"][:5], np.nan_to_num(step.obs.meta), rtol=1e-6)
    # One score far out is clipped into the space, never outside it.
    wild = manual_step([[1e6, 0.0]] + [[0.0, 0.0]] * 200, [10] * 201, cand_proxy=[0.5, 0.5])  # z = 20
    assert encode(wild.obs, 300, 4).obs["scores"].max() == SCORE_CLIP


def test_truncation_keeps_the_largest_clients_and_best_candidates() -> None:
    # 5 clients, room for 3: the three largest (ids 1, 3, 4), in the step's order.
    scores = [[0.1, 0.9, 0.5, 0.2], [0.2, 0.8, 0.4, 0.1], [0.3, 0.7, 0.6, 0.0], [0.4, 0.6, 0.5, 0.3],
              [0.5, 0.5, 0.4, 0.2]]
    step = manual_step(scores, [10, 50, 20, 40, 30], cand_proxy=[0.5] * 4)
    enc = encode(step.obs, 3, 2)
    np.testing.assert_array_equal(enc.rows, [1, 3, 4])
    # The two best candidates by data-weighted score (1 and 2), kept in order.
    np.testing.assert_array_equal(enc.cols, [1, 2])
    assert enc.obs["client_mask"].sum() == 3 and enc.obs["candidate_mask"].sum() == 2
    np.testing.assert_allclose(enc.obs["meta"][:, 0], np.log1p([50, 40, 30]), rtol=1e-6)
    # Unobserved clients keep action 1 (their data-size weight); observed ones get theirs.
    np.testing.assert_allclose(expand_actions(np.array([0.2, 0.0, 0.7]), enc.rows, 5), [1, 0.2, 1, 0.0, 0.7])


# ---- replay ----------------------------------------------------------------------------------------------


def test_replay_reward_follows_the_clients_the_action_weights(tmp_path: Path) -> None:
    # Clients 0-1 (big) favour candidate 0, clients 2-3 favour candidate 2. Data weights pick 0.
    scores = [[0.9, 0.1, 0.2], [0.8, 0.2, 0.1], [0.1, 0.3, 0.9], [0.2, 0.1, 0.8]]
    step = manual_step(scores, [100, 90, 20, 10], cand_proxy=[0.52, 0.55, 0.61], proxy_before=0.5)
    path = write_trace(tmp_path / "hand.h5", [step], depth=2)
    env = ReplayStitchEnv([path], max_clients=6, max_candidates=4)
    env.reset(seed=0)
    only_x = np.array([0, 0, 1, 1, 1, 1], dtype=np.float32)  # padding slots: any value
    _, reward, terminated, truncated, info = env.step(only_x)
    assert info["chosen"] == 2 and reward == pytest.approx(0.61 - 0.5, abs=1e-6)
    assert terminated and not truncated
    assert info["data_chosen"] == 0 and info["data_reward"] == pytest.approx(0.52 - 0.5, abs=1e-6)
    env.reset()
    _, reward, *_ = env.step(np.ones(6, dtype=np.float32))
    assert reward == pytest.approx(0.02, abs=1e-6)
    env.reset()  # all-zero weights count like data-size weights, not like "nothing"
    _, reward, _, _, info = env.step(np.zeros(6, dtype=np.float32))
    assert info["chosen"] == 0


def test_replay_reads_back_what_was_written_and_skips_half_rounds(tmp_path: Path) -> None:
    episode = toy_episodes(3, 1, steps=3)[0]
    path = write_trace(tmp_path / "toy.h5", episode, depth=3, extra_round=True)
    back = load_episode(path)
    assert len(back) == 3  # the half-written round is left out
    for got, want in zip(back, episode, strict=True):
        np.testing.assert_array_equal(got.obs.clients, want.obs.clients)
        np.testing.assert_array_equal(got.obs.scores, want.obs.scores)  # NaN where it was NaN
        np.testing.assert_allclose(got.obs.meta, want.obs.meta, rtol=1e-6)
        np.testing.assert_allclose(got.candidate_proxy, want.candidate_proxy, rtol=1e-6)
        assert got.obs.candidates == want.obs.candidates and got.obs.max_steps == 3
        assert got.proxy_before == pytest.approx(want.proxy_before)
    with open_trace(path) as f:
        assert len(f["stitch/steps"]) == 4


def test_replay_episode_walks_the_recorded_path(tmp_path: Path) -> None:
    episodes = toy_episodes(1, 2, steps=3)
    paths = [write_trace(tmp_path / f"t{i}.h5", ep) for i, ep in enumerate(episodes)]
    env = ReplayStitchEnv(paths, max_clients=8, max_candidates=6)
    assert env.num_steps == 6 and len(env.episodes) == 2
    obs, _ = env.reset(options={"episode": 1})
    want = encode(episodes[1][0].obs, 8, 6).obs
    for key in want:
        np.testing.assert_array_equal(obs[key], want[key])
    rewards = []
    for t in range(3):
        obs, r, term, _, _ = env.step(np.ones(8, np.float32))
        rewards.append(r)
        assert term == (t == 2)
    step_rewards = [s.gain(s.choose(np.ones(8))) for s in episodes[1]]
    np.testing.assert_allclose(rewards, step_rewards, rtol=1e-5)  # proxies are stored as float32
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(8, np.float32))


def test_replay_env_passes_check_env(tmp_path: Path) -> None:
    paths = [write_trace(tmp_path / f"t{i}.h5", ep) for i, ep in enumerate(toy_episodes(5, 3))]
    env = ReplayStitchEnv(paths, max_clients=10, max_candidates=8)
    with pytest.warns(UserWarning, match="render"):  # no render modes: the checker says so, nothing else
        check_env(env)


def test_replay_needs_fedstitch_traces(small_traces: list[Path]) -> None:
    from emulator.errors import UserError

    with pytest.raises(UserError, match="not a FedStitch run"):
        ReplayStitchEnv(small_traces)


# ---- live env (real FedStitch runs on a small synthetic task) ----------------------------------------


@pytest.fixture(scope="session")
def rl_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pool of the three test timm models with random weights (~2 s): enough to stitch, fast to build."""
    from pools import build_pool

    path = tmp_path_factory.mktemp("rlpool") / "pool"
    build_pool(path, models=["test_resnet", "test_efficientnet", "test_convnext"], pretrained="none", input_size=32)
    return path


def live_config(pool: Path, tmp_path: Path, *extra: str) -> Config:
    """FedStitch on a small synthetic task: a run takes well under a second here."""
    sets = [
        "algorithm=fedstitch", "seed=0", "rounds=5", "clients_per_round=3", "data.dataset=synthetic",
        "data.num_samples=200", "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=6",
        f"pool.path={pool}", "stitch.depth=3", "stitch.head_rounds=1", "devices.availability=false",
        "runtime.progress=none", "runtime.threads=1", f"output.dir={tmp_path}", *extra,
    ]
    return load_config(REPO / "examples" / "quickstart.toml", sets)


def test_live_env_runs_an_episode_and_writes_its_trace(rl_pool: Path, tmp_path: Path) -> None:
    env = StitchEnv(live_config(rl_pool, tmp_path), trace_dir=tmp_path / "episodes", max_clients=6, max_candidates=5)
    obs, info = env.reset(seed=1)
    assert obs in env.observation_space and info["step"] == 0
    assert obs["client_mask"].sum() == info["num_clients"] > 0
    assert obs["candidate_mask"].sum() == info["num_candidates"] == 3  # the first blocks of the 3 models
    rng = np.random.default_rng(0)
    rewards, done, actions = [], False, []
    while not done:
        actions.append(rng.uniform(0.05, 1.0, 6).astype(np.float32))
        obs, reward, done, truncated, info = env.step(actions[-1])
        rewards.append(reward)
        assert not truncated and obs in env.observation_space
    assert env.summary is not None
    assert env.trace_path == tmp_path / "episodes" / "quickstart-episode00001.h5"
    with open_trace(env.trace_path) as f:
        steps = f["stitch/steps"][:]
        rl = f["rl/steps"][:]
        clients = f["stitch/clients"][:]
    steps = steps[steps["kind"] != b"head"]
    assert len(rewards) == len(steps) >= 2
    # Each step's reward is the proxy gain the run recorded; the last one adds the final test accuracy.
    np.testing.assert_allclose(rewards[:-1], steps["reward"][:-1], rtol=1e-5)
    final = rl[rl["done"] == 1]
    assert len(final) == 1 and (rl["policy"][rl["done"] == 0] == b"env").all()
    assert rewards[-1] == pytest.approx(float(steps["reward"][-1]) + float(final["reward"][0]), rel=1e-5)
    assert final["reward"][0] == pytest.approx(float(env.summary.rounds["test_accuracy"][-1]), rel=1e-6)
    # The run weighted its clients with n_i * a_i from the env's actions (clients in the step's order).
    first = clients[clients["round"] == steps["round"][0]]
    m = len(first)
    np.testing.assert_allclose(first["action"], first["num_samples"] * actions[0][:m], rtol=1e-5)
    env.close()
    assert env.trace_path.exists()  # a trace_dir given by the caller is kept


def test_live_env_abandons_a_running_episode(rl_pool: Path, tmp_path: Path) -> None:
    env = StitchEnv(live_config(rl_pool, tmp_path), max_clients=6, max_candidates=5)
    env.reset(seed=0)
    first = env._thread
    assert first is not None and first.is_alive()  # waiting for the first action
    env.reset(seed=0)  # abandons the first run mid-episode
    assert not first.is_alive()
    with open_trace(env.trace_dir / "quickstart-episode00001.h5") as f:
        kinds = [bytes(k) for k in f["events/table"]["kind"]]
        assert b"error" in kinds and b"finish" not in kinds  # closed cleanly, marked unfinished
    folder = env.trace_dir
    env.close()
    assert not folder.exists()  # the env's own temporary folder goes with it
    assert not [t for t in threading.enumerate() if t.name.startswith("stitchenv-")]


def test_live_env_passes_check_env(rl_pool: Path, tmp_path: Path) -> None:
    env = StitchEnv(live_config(rl_pool, tmp_path), max_clients=6, max_candidates=5)
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="render"):
        check_env(env)
    env.close()
    assert time.perf_counter() - t0 < 60


def test_live_env_reports_a_failed_run(rl_pool: Path, tmp_path: Path) -> None:
    env = StitchEnv(live_config(rl_pool, tmp_path, "algorithm=fedavg"))  # FedAvg takes no weighting
    with pytest.raises(RuntimeError, match="takes no client-weighting policy"):
        env.reset(seed=0)
    env.close()
