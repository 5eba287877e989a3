"""FedStitch checkpoint/resume: a run killed mid-round and resumed equals the run that was never stopped.

Both with data-size weights and with the RL weighting learning during the run (its network, Adam
state, exploration generator and episode buffer travel in the checkpoint), and the policy's own
state round trip on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emulator import checkpoint
from emulator.algorithms.stitch_weighting import DataSizeWeighting
from emulator.comm import SingleComm
from emulator.config import Config
from emulator.runner import run
from emulator.trace import open_trace
from rl_agent.observation import encode
from rl_agent.policy import ReinforcePolicy
from rl_agent.weighting import make_weighting
from tests.test_rl_env import live_config, rl_pool, toy_step  # noqa: F401  (rl_pool: the fixture)

TABLES = ("stitch/steps", "stitch/candidates", "stitch/scores", "stitch/clients", "rl/steps")
ROUND_COLUMNS = ("round", "test_accuracy", "test_loss", "num_ok", "emulated_time_s")
CLIENT_COLUMNS = ("round", "client", "status", "flops", "peak_memory_bytes", "bytes_up", "bytes_down", "energy_j",
                  "freq_mhz")


class KilledError(Exception):
    pass


class KillAt:
    """Delegates to a weighting, and raises at its ``at``-th ``weights`` call (a job killed mid-round)."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def weights(self, obs: Any) -> np.ndarray:
        self.calls += 1
        if self.calls == self.at:
            raise KilledError
        return self.inner.weights(obs)

    def __getattr__(self, name: str) -> Any:  # name, reward, state_dict, load_state_dict
        return getattr(self.inner, name)


def cfg_for(pool: Path, tmp_path: Path, trace: str, weighting: str, *extra: str) -> Config:
    return live_config(pool, tmp_path, f"output.trace={tmp_path / trace}", f"stitch.weighting={weighting}",
                       "rounds=7", "stitch.depth=4", "clients_per_round=4", "stitch.min_gain=-1",
                       "stitch.order=any", "rl.sigma=1.0", "rl.max_clients=8", "rl.max_candidates=16", *extra)


def tables(path: Path) -> dict[str, np.ndarray]:
    with open_trace(path) as f:
        out = {key: f[key][:] for key in TABLES}
        rounds, client_rounds = f["rounds/table"][:], f["client_rounds/table"][:]
    out["rounds"] = rounds[list(ROUND_COLUMNS)]  # not the wall-clock columns
    out["client_rounds"] = client_rounds[list(CLIENT_COLUMNS)]
    return out


def weighting(cfg: Config) -> Any:
    return make_weighting(cfg) or DataSizeWeighting()


@pytest.mark.parametrize("mode", ["data", "rl"])
def test_a_resumed_run_continues_exactly(rl_pool: Path, tmp_path: Path, mode: str) -> None:  # noqa: F811
    extra: tuple[str, ...] = ()
    if mode == "rl":
        # Start from a policy a first live run saved: its final-reward baseline is set, so this run's final
        # reward (the test accuracy) really updates it, through the episode's decisions from before the kill.
        first = cfg_for(rl_pool, tmp_path, "first.h5", mode, "seed=1", f"rl.save={tmp_path / 'p.safetensors'}")
        run(first, SingleComm(), weighting=weighting(first))
        assert ReinforcePolicy.load(tmp_path / "p.safetensors").baselines["final"].count == 1
        extra = (f"stitch.policy={tmp_path / 'p.safetensors'}",)
    whole = cfg_for(rl_pool, tmp_path, "whole.h5", mode, *extra)
    w_whole = weighting(whole)
    summary = run(whole, SingleComm(), weighting=w_whole)
    assert summary is not None
    steps = tables(tmp_path / "whole.h5")["stitch/steps"]
    assert (steps["kind"] == b"step").sum() >= 3  # the kill below falls in the middle of the stitching

    broken = cfg_for(rl_pool, tmp_path, "broken.h5", mode, *extra)
    with pytest.raises(KilledError):
        run(broken, SingleComm(), weighting=KillAt(weighting(broken), at=3))  # killed in round 2
    saved = checkpoint.latest(checkpoint.checkpoint_dir(tmp_path / "broken.h5"))
    assert saved is not None and saved.round == 1
    state = saved.meta["algorithm_state"]
    assert len(state["prefix"]) == 2 and state["phase"] == "step"
    if mode == "rl":
        assert state["weighting"]["name"] == "reinforce" and state["weighting"]["train"]
        policy_arrays = saved.section("algorithm/weighting/policy")
        assert "gen" in policy_arrays and any(k.startswith("opt/") for k in policy_arrays)
        assert policy_arrays["episode/feats"].shape[0] == 2  # the two decisions the final reward will credit
    else:
        assert state["weighting"] is None

    w_resumed = weighting(broken)  # a fresh policy, loaded from the checkpoint
    resumed = run(broken, SingleComm(), weighting=w_resumed, resume=True)
    assert resumed is not None
    a, b = tables(tmp_path / "whole.h5"), tables(tmp_path / "broken.h5")
    for key in a:
        assert a[key].dtype == b[key].dtype and len(a[key]) == len(b[key]), key
        for name in a[key].dtype.names:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}.{name}")
    np.testing.assert_array_equal(summary.rounds["test_accuracy"], resumed.rounds["test_accuracy"])
    if mode == "rl":  # the policy really acted: its actions are not all equal (data-size weighting)
        clients = a["stitch/clients"]
        ratio = clients["action"] / clients["num_samples"]
        assert np.ptp(ratio[clients["round"] == 0]) > 1e-3
        # ... and learnt the same: the final reward credited the decisions made before the kill too.
        for p, q in zip(w_whole.policy.net.parameters(), w_resumed.policy.net.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        assert w_whole.policy.updates == w_resumed.policy.updates


def test_policy_state_round_trip_continues_identically() -> None:
    torch.set_num_threads(1)
    old = ReinforcePolicy(sigma=0.8, lr=0.02, seed=4)
    rng = np.random.default_rng(0)
    for t in range(12):
        step = toy_step(rng, step=t % 3, max_steps=3)
        old.act(encode(step.obs, 8, 6).obs, explore=True)
        old.learn(0.01 * t, final=False)
        if t % 3 == 2:
            old.learn(0.5 + 0.01 * t, final=True)
    old.act(encode(toy_step(rng).obs, 8, 6).obs, explore=True)  # leave a decision pending
    old.learn(0.02)
    arrays, meta = old.state_dict()
    new = ReinforcePolicy(sigma=0.8, lr=0.02, seed=99)  # another seed: everything must come from the state
    new.load_state_dict(arrays, meta)
    assert new.updates == old.updates > 0 and new.baselines == old.baselines
    for t in range(6):
        obs = encode(toy_step(np.random.default_rng(100 + t)).obs, 8, 6).obs
        np.testing.assert_array_equal(old.act(obs, explore=True), new.act(obs, explore=True))
        old.learn(0.03 * t, final=t == 5)
        new.learn(0.03 * t, final=t == 5)
    for p, q in zip(old.net.parameters(), new.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(Exception, match="other settings"):
        ReinforcePolicy(sigma=0.3, lr=0.02).load_state_dict(arrays, meta)
