"""The runs a job script carries: configs validated through emulator's own loading, as TOML text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emulator.config import Config, check_plugins, config_from_dict, to_toml
from emulator.errors import UserError
from slurm.render import Task, safe_name


def check_config(cfg: Config) -> None:
    """What ``fedemu validate`` checks, minus the compute device: a login node often has no GPU."""
    from emulator.data import check_dataset
    from emulator.devices import configured_catalogue
    from emulator.devices.population import parse_mix

    check_plugins(cfg)
    check_dataset(cfg.data.dataset, root=Path(cfg.data.root))
    parse_mix(cfg.devices.mix, configured_catalogue(cfg))


def resolve(values: Mapping[str, Any]) -> Config:
    """A validated :class:`Config` from a TOML-like dict (overrides already applied)."""
    cfg = config_from_dict(values)
    check_config(cfg)
    return cfg


def single_task(config: str | Path | None, overrides: Sequence[str] = ()) -> Task:
    """The one task of a plain job: ``config`` (None = the embedded defaults) with ``--set`` overrides."""
    from emulator.config import load_config

    cfg = load_config(config, overrides)
    check_config(cfg)
    return Task(index=0, name=safe_name(cfg.name), config_toml=to_toml(cfg))


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """``values["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating tables on the way."""
    parts = key.split(".")
    if not all(parts):
        raise UserError(f"{key!r}: not a dotted config key such as data.partition.alpha")
    table = values
    for part in parts[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{key}: {part!r} is a value, not a table")
        table = child
    table[parts[-1]] = value
