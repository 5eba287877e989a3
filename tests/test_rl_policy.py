"""The built-in REINFORCE policy: it learns a contextual bandit, saves and loads exactly, rejects bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emulator.config import config_from_dict
from emulator.errors import UserError
from rl_agent.observation import encode, expand_actions, observed_rows
from rl_agent.policy import FEATURES, METADATA_KEY, ReinforcePolicy, client_features
from rl_agent.weighting import PolicyWeighting, make_weighting
from tests.test_rl_env import toy_step

MAX_C, MAX_K = 16, 8


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # tiny tensors: threads only cost (and the CI has 2 cores)


def bandit_reward(policy: ReinforcePolicy, step, *, explore: bool) -> float:  # type: ignore[no-untyped-def]
    enc = encode(step.obs, MAX_C, MAX_K)
    actions = policy.act(enc.obs, explore=explore)
    return step.gain(step.choose(expand_actions(actions, enc.rows, len(step.obs.num_samples))))


def test_reinforce_learns_to_weight_noisy_clients_down() -> None:
    """Noisy clients (low label entropy, more data) push a decoy; after training the policy beats a = 1."""
    policy = ReinforcePolicy(sigma=1.0, lr=0.01, seed=0)
    train = np.random.default_rng(1)
    for _ in range(400):
        policy.learn(bandit_reward(policy, toy_step(train), explore=True))
    test = [toy_step(np.random.default_rng(1000 + i)) for i in range(150)]
    learnt = np.mean([bandit_reward(policy, s, explore=False) for s in test])
    data = np.mean([s.gain(s.choose(np.ones(len(s.obs.num_samples)))) for s in test])
    best = np.mean([s.candidate_proxy.max() - s.proxy_before for s in test])
    assert learnt > data + 0.5 * (best - data), (learnt, data, best)
    # ... and it did so by weighting the noisy clients down.
    probe = toy_step(np.random.default_rng(5))
    enc = encode(probe.obs, MAX_C, MAX_K)
    a = policy.act(enc.obs, explore=False)[: len(enc.rows)]
    noisy = probe.obs.meta[enc.rows, 1] < 0.5
    assert a[noisy].max() < a[~noisy].min()


def test_fresh_policy_is_data_size_weighting_and_padding_is_ignored() -> None:
    policy = ReinforcePolicy(seed=3)
    step = toy_step(np.random.default_rng(0), num_clients=5)
    enc = encode(step.obs, MAX_C, MAX_K)
    a = policy.act(enc.obs, explore=False)
    assert a.shape == (MAX_C,) and a.dtype == np.float32
    np.testing.assert_allclose(a[:5], 0.5, atol=1e-6)  # equal actions: weights proportional to n_i
    assert (a[5:] == 1.0).all()
    w = PolicyWeighting(policy, train=False, max_clients=MAX_C, max_candidates=MAX_K).weights(step.obs)
    np.testing.assert_allclose(w / w.sum(), step.obs.num_samples / step.obs.num_samples.sum(), rtol=1e-6)


def test_policy_is_permutation_equivariant() -> None:
    policy = ReinforcePolicy(seed=0)
    train = np.random.default_rng(2)
    for _ in range(30):  # some learning, so the outputs differ between clients
        policy.learn(bandit_reward(policy, toy_step(train), explore=True))
    step = toy_step(np.random.default_rng(9))
    enc = encode(step.obs, MAX_C, MAX_K)
    perm = np.random.default_rng(0).permutation(len(enc.rows))
    shuffled = dict(enc.obs)
    for key in ("scores", "proxies", "meta"):
        shuffled[key] = enc.obs[key].copy()
        shuffled[key][: len(perm)] = enc.obs[key][perm]
    a = policy.act(enc.obs, explore=False)
    b = policy.act(shuffled, explore=False)
    np.testing.assert_allclose(b[: len(perm)], a[perm], rtol=1e-5, atol=1e-6)
    assert len(np.unique(a[: len(perm)].round(4))) > 1


def test_seeded_policies_act_identically() -> None:
    step = toy_step(np.random.default_rng(4))
    obs = encode(step.obs, MAX_C, MAX_K).obs
    p, q, r = ReinforcePolicy(seed=7), ReinforcePolicy(seed=7), ReinforcePolicy(seed=8)
    torch.manual_seed(123)  # the policy uses its own generators: the global RNG changes nothing
    pa = [p.act(obs, explore=True) for _ in range(3)]
    torch.manual_seed(456)
    qa = [q.act(obs, explore=True) for _ in range(3)]
    np.testing.assert_array_equal(np.stack(pa), np.stack(qa))
    assert not np.array_equal(pa[0], r.act(obs, explore=True))


def test_save_load_round_trip_gives_identical_actions(tmp_path: Path) -> None:
    policy = ReinforcePolicy(hidden=16, sigma=0.7, lr=0.02, seed=1)
    train = np.random.default_rng(3)
    for _ in range(40):
        policy.learn(bandit_reward(policy, toy_step(train), explore=True))
    path = policy.save(tmp_path / "sub" / "policy.safetensors", agent="test")
    loaded = ReinforcePolicy.load(path)
    assert (loaded.hidden, loaded.sigma, loaded.lr, loaded.updates) == (16, 0.7, 0.02, policy.updates)
    assert loaded.baselines == policy.baselines
    for i in range(5):
        obs = encode(toy_step(np.random.default_rng(50 + i)).obs, MAX_C, MAX_K).obs
        np.testing.assert_array_equal(loaded.act(obs, explore=False), policy.act(obs, explore=False))
    # [rl] settings override the learning hyper-parameters, never the network.
    rl = config_from_dict({"rl": {"hidden": 64, "sigma": 0.2, "lr": 0.005}}).rl
    again = ReinforcePolicy.load(path, rl=rl, seed=11)
    assert (again.hidden, again.sigma, again.lr, again.seed) == (16, 0.2, 0.005, 11)


def test_make_weighting_loads_trains_and_saves(tmp_path: Path) -> None:
    src = ReinforcePolicy(seed=2)
    src.save(tmp_path / "start.safetensors")
    assert make_weighting(config_from_dict({"stitch": {"weighting": "data"}})) is None
    out = tmp_path / "end.safetensors"
    cfg = config_from_dict({"seed": 5, "stitch": {"policy": str(tmp_path / "start.safetensors")},
                            "rl": {"save": str(out), "max_clients": 4}})
    weighting = make_weighting(cfg)
    assert isinstance(weighting, PolicyWeighting) and weighting.name == "reinforce"
    rng = np.random.default_rng(0)
    for t in range(3):
        step = toy_step(rng, num_clients=6)
        w = weighting.weights(step.obs)
        assert w.shape == (6,) and (w >= 0).all()
        # The two smallest clients are beyond max_clients = 4: action 1, their plain sample count.
        small = np.setdiff1d(np.arange(6), observed_rows(step.obs.num_samples, 4))
        assert len(small) == 2 and step.obs.num_samples[small].max() <= np.sort(step.obs.num_samples)[2]
        np.testing.assert_allclose(w[small], step.obs.num_samples[small])
        weighting.reward(0.01 * t, done=False)
        assert not out.exists()
    weighting.reward(0.8, done=True)  # the end of the run writes the policy
    assert out.exists()
    saved = ReinforcePolicy.load(out)
    assert saved.updates == weighting.policy.updates > 0
    assert saved.baselines["final"].count == 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"\x00" * 7), "not a readable safetensors file"),
        (lambda p: p.write_bytes(_valid_bytes(p)[:-40]), "not a readable safetensors file"),
        (lambda p: _write(p, {}), "no 'fedemu_policy' metadata"),
        (lambda p: _write(p, {METADATA_KEY: "{oops"}), "corrupt 'fedemu_policy' metadata"),
        (lambda p: _write(p, {METADATA_KEY: json.dumps({"format": 99, "kind": "reinforce"})}), "format 99"),
        (lambda p: _write(p, {METADATA_KEY: _meta(features=["x"])}), "trained on features"),
        (lambda p: _write(p, {METADATA_KEY: _meta(hidden=8)}), "do not match hidden = 8"),
        (lambda p: _write(p, {METADATA_KEY: _meta(hidden="many")}), "bad metadata"),
    ],
)
def test_bad_policy_files_are_one_line_errors(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.safetensors"
    make(path)
    with pytest.raises(UserError, match=match) as err:
        ReinforcePolicy.load(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text
    cfg = config_from_dict({"stitch": {"policy": str(path)}})
    with pytest.raises(UserError, match=match):
        make_weighting(cfg)


def test_non_finite_weights_are_rejected(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    policy = ReinforcePolicy(hidden=4)
    tensors = {k: v.clone() for k, v in policy.net.state_dict().items()}
    tensors["0.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(policy.metadata())})
    with pytest.raises(UserError, match=r"non-finite values in 0\.weight"):
        ReinforcePolicy.load(path)


def test_features_cover_each_client_row() -> None:
    step = toy_step(np.random.default_rng(0), num_clients=6)
    feats = client_features(encode(step.obs, MAX_C, MAX_K).obs)
    assert feats.shape == (MAX_C, len(FEATURES)) and np.isfinite(feats).all()
    assert (feats[6:] == 0).all() and (feats[:6] != 0).any(axis=1).all()
    i = FEATURES.index("label_entropy")
    np.testing.assert_allclose(feats[:6, i], step.obs.meta[:, 1], rtol=1e-6)


# ---- helpers for the bad-file cases ----------------------------------------------------------------------


def _meta(**changes: object) -> str:
    meta = ReinforcePolicy(hidden=4).metadata()
    meta.update(changes)
    return json.dumps(meta)


def _write(path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in ReinforcePolicy(hidden=4).net.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def _valid_bytes(path: Path) -> bytes:
    ReinforcePolicy(hidden=4).save(path)
    return path.read_bytes()
