"""The RL workflow from the command line: FedStitch runs → `fedemu rl train` → a live run that uses the policy.

Both agents (built-in REINFORCE and stable-baselines3 PPO distilled into the same file) write a
policy that a live `fedemu run --set stitch.policy=FILE` loads; the live trace's recorded client
actions are the loaded policy's own deterministic actions on the recorded observations, so the test
fails if the run fell back to data-size weights or to a fresh policy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emulator.cli import main
from emulator.trace import open_trace
from rl_agent.observation import encode
from rl_agent.policy import ReinforcePolicy, read_policy_file
from rl_agent.replay import load_episode
from tests.conftest import REPO, fedemu_env
from tests.test_rl_env import rl_pool  # noqa: F401  (the fixture)

SMALL = [
    "algorithm=fedstitch", "rounds=5", "clients_per_round=4", "data.dataset=synthetic", "data.num_samples=240",
    "data.num_classes=4", "data.image_size=32", "data.partition.num_clients=8", "data.partition.alpha=0.1",
    "stitch.depth=3", "stitch.head_rounds=1", "stitch.order=any", "stitch.min_gain=-1",
    "devices.availability=false", "runtime.progress=none", "runtime.threads=1",
    "rl.max_clients=8", "rl.max_candidates=16",
]


def sets(*extra: str) -> list[str]:
    out: list[str] = []
    for item in (*SMALL, *extra):
        out += ["--set", item]
    return out


@pytest.fixture(scope="module")
def recorded(rl_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:  # noqa: F811
    """Two data-weighted FedStitch traces (seeds 1, 2), written by `fedemu run`."""
    folder = tmp_path_factory.mktemp("rl-cli")
    traces = []
    for seed in (1, 2):
        trace = folder / f"data-seed{seed}.h5"
        code = main(["run", str(REPO / "examples" / "quickstart.toml"),
                     *sets(f"seed={seed}", f"pool.path={rl_pool}", "stitch.weighting=data", f"output.trace={trace}")])
        assert code == 0
        traces.append(trace)
    return traces


def recorded_actions(trace: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per step of ``trace``: the observation's padded encoding and the client actions a_i the run recorded."""
    with open_trace(trace) as f:
        clients = f["stitch/clients"][:]
    observations, actions = [], []
    for step in load_episode(trace):
        enc = encode(step.obs, 8, 16)
        observations.append(enc.obs)
        rows = clients[clients["round"] == step.obs.round]
        order = np.searchsorted(rows["client"], step.obs.clients[enc.rows])
        # `action` holds the raw weights n_i * a_i the policy gave (docs/trace-schema.md).
        actions.append((rows["action"][order] / rows["num_samples"][order]).astype(np.float32))
    return observations, actions


@pytest.mark.parametrize("agent", ["reinforce", "ppo"])
def test_policy_trained_offline_drives_a_live_run(
    agent: str, recorded: list[Path], rl_pool: Path, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy_file = tmp_path / f"{agent}.safetensors"
    code = main(["rl", "train", "--traces", *map(str, recorded), "--agent", agent, "--episodes", "30",
                 "--progress", "none", "--out", str(policy_file), "--set", "rl.sigma=1.0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recorded steps in 2 episode(s) from 2 trace(s)" in out
    assert f"wrote {policy_file}" in out and "vs data-size weighting" in out
    policy = ReinforcePolicy.load(policy_file)
    meta, _ = read_policy_file(policy_file)
    assert meta["agent"] == agent and meta["traces"] == [p.name for p in recorded]
    assert np.isfinite(meta["mean_reward"]) and np.isfinite(meta["data_reward"])

    # A live 2-rank run (rank 0 serves, one worker) with the policy loaded and frozen.
    live = tmp_path / "live.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "run", str(REPO / "examples" / "quickstart.toml"), "--ranks", "2",
         *sets("seed=3", f"pool.path={rl_pool}", f"stitch.policy={policy_file}", "rl.train=false",
               f"output.trace={live}")],
        capture_output=True, text=True, env=fedemu_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open_trace(live) as f:
        rl_steps = f["rl/steps"][:]
        assert int(f.attrs["ranks"]) == 2
    assert len(rl_steps) >= 2 and (rl_steps["policy"] == b"reinforce").all()
    observations, actions = recorded_actions(live)
    assert len(observations) >= 2
    for obs, acted in zip(observations, actions, strict=True):
        expected = policy.act(obs, explore=False)[: len(acted)]
        np.testing.assert_allclose(acted, expected, rtol=1e-5, atol=1e-6)
    # ... and those are not data-size weights (all clients' actions equal).
    assert max(float(np.ptp(a)) for a in actions) > 1e-4


def test_missing_policy_file_is_a_one_line_error(rl_pool: Path, tmp_path: Path) -> None:  # noqa: F811
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "run", str(REPO / "examples" / "quickstart.toml"),
         *sets(f"pool.path={rl_pool}", f"stitch.policy={tmp_path / 'nope.safetensors'}",
               f"output.trace={tmp_path / 'x.h5'}")],
        capture_output=True, text=True, env=fedemu_env(), timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.safetensors" in lines[0], proc.stderr
    assert not (tmp_path / "x.h5").exists()


def test_rl_train_refuses_a_non_fedstitch_trace(small_traces: list[Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rl", "train", "--traces", str(small_traces[0]), "--out", str(tmp_path / "p.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not a FedStitch run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.safetensors").exists()
