"""Config loading, overrides and one-line errors (exit code 2, no trace left behind)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from emulator.cli import main
from emulator.config import Config, DataConfig, config_from_dict, load_config, to_toml
from emulator.errors import ConfigError, UserError
from tests.conftest import REPO, fedemu_env

QUICKSTART = REPO / "examples" / "quickstart.toml"


def test_quickstart_loads_with_overrides() -> None:
    cfg = load_config(QUICKSTART, ["rounds=5", "data.partition.alpha=0.1", "data.dataset=synthetic"])
    assert cfg.rounds == 5
    assert cfg.data.partition.alpha == pytest.approx(0.1)
    assert cfg.data.dataset == "synthetic"  # a bare word needs no TOML quotes
    assert cfg.name == "quickstart"


def test_resolved_config_round_trips_through_toml() -> None:
    cfg = load_config(QUICKSTART, ["train.lr=0.125", 'output.trace="a \\"quoted\\" path.h5"'])
    again = config_from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_ints_are_accepted_for_floats_but_not_the_reverse() -> None:
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"rounds = 2\.5: must be an integer"):
        config_from_dict({"rounds": 2.5})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"rounds": 0}, "rounds = 0: allowed range [1, 10000000]"),
        ({"data": {"partition": {"alpha": -1.0}}}, "data.partition.alpha = -1.0: allowed range (0.0, inf)"),
        ({"train": {"momentum": 1.5}}, "train.momentum = 1.5: allowed range [0.0, 0.999]"),
        ({"runtime": {"progress": "fancy"}}, "runtime.progress = 'fancy': allowed: auto, bar, lines, none"),
        ({"model": {"pretrained": "yes"}}, "model.pretrained = 'yes': must be true or false"),
        ({"clients_per_round": 500}, "clients_per_round = 500: must be <= data.partition.num_clients = 100"),
        ({"data": 3}, "data = 3: must be a table"),
    ],
)
def test_bad_values_name_key_value_and_range(values: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert str(err.value) == expected


def test_unknown_keys_suggest_the_closest() -> None:
    with pytest.raises(UserError, match=r"data\.partiton: unknown config key; did you mean 'partition'\?"):
        config_from_dict({"data": {"partiton": {}}})
    with pytest.raises(UserError, match=r"^roundz: unknown config key; did you mean 'rounds'\?$"):
        config_from_dict({"roundz": 3})


def test_unknown_plugin_names_suggest_the_closest() -> None:
    with pytest.raises(UserError, match=r"algorithm = 'fedavgg': unknown algorithm; did you mean 'fedavg'"):
        load_config(None, ["algorithm=fedavgg"])
    with pytest.raises(UserError, match=r"data\.dataset = 'cifar1O'.*did you mean 'cifar10'"):
        load_config(None, ["data.dataset=cifar1O"])
    with pytest.raises(UserError, match=r"model\.name = 'resnet1B'.*did you mean 'resnet18'"):
        load_config(None, ["model.name=resnet1B"])


def test_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.rounds = 3  # type: ignore[misc]
    assert isinstance(cfg.data, DataConfig)


BAD_INPUTS = [
    (["--set", "data.partition.alpha=-1"], "data.partition.alpha = -1.0"),
    (["--set", "rounds=0"], "rounds = 0"),
    (["--set", "data.partiton.alpha=0.1"], "did you mean 'partition'"),
    (["--set", "rounds"], "expected KEY.PATH=VALUE"),
    (["--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--ranks", "0"], "--ranks = 0"),
    (["--set", "devices.mix=smal"], "did you mean 'small'"),
    (["--set", "devices.mix=rpi4:0.5,rpi9:0.5"], "rpi9"),
    (["--set", "devices.catalogue=/nonexistent/devices.toml"], "/nonexistent/devices.toml"),
    (["--set", "devices.device=cuda"], "no CUDA device"),
    (["--set", "devices.throttle=slow"], "devices.throttle = 'slow': allowed: virtual, sleep"),
    (["--set", "overcommit=0.5"], "overcommit = 0.5"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD_INPUTS)
def test_cli_bad_input_is_one_line_exit_2_and_no_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    trace = tmp_path / "t.h5"
    code = main(["run", str(QUICKSTART), "--set", f"output.trace={trace}", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fedemu: error: ")
    assert needle in err
    assert not trace.exists() and list(tmp_path.iterdir()) == []


def test_cli_missing_and_broken_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "invalid TOML" in err and err.count("\n") == 1


def test_devices_command_prints_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out.splitlines()
    for name in ("rpi4", "rpi5", "jetson_nano", "jetson_xavier_nx", "jetson_agx_orin", "phone_low",
                 "phone_high", "xps15", "v100"):
        assert sum(line.startswith(name + " ") for line in out) == 1, name


def test_devices_command_rejects_a_malformed_user_catalogue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "mine.toml"
    bad.write_text('[[device]]\nname = "board"\nmemory_gb = -1\n')
    assert main(["devices", "--extra", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mine.toml" in err and "#1" in err


def test_validate_accepts_the_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "ok" in capsys.readouterr().out


def test_process_exit_code_is_2(tmp_path: Path) -> None:
    """The real console entry point, as a user runs it."""
    trace = tmp_path / "t.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "emulator", "run", str(QUICKSTART), "--set", "train.lr=-0.1",
         "--set", f"output.trace={trace}"],
        capture_output=True, text=True, env=fedemu_env(), timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedemu: error: train.lr = -0.1: allowed range (0.0, 10.0]"
    assert not trace.exists()


def test_lists_from_toml_arrays_and_from_set() -> None:
    cfg = config_from_dict({"pool": {"models": ["resnet18", "vit_tiny_patch16_224"]}})
    assert cfg.pool.models == ("resnet18", "vit_tiny_patch16_224")
    assert load_config(None, ["pool.models=test_resnet,test_vit"]).pool.models == ("test_resnet", "test_vit")
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"pool\.models = \[1, 2\]: must be a list of strs"):
        config_from_dict({"pool": {"models": [1, 2]}})
    with pytest.raises(ConfigError, match=r"pool\.models = \[\]: needs at least 1 entries"):
        config_from_dict({"pool": {"models": []}})
