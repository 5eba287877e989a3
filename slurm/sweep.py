"""Sweep files: a base config and a grid of dotted keys; the cartesian product becomes one job array.

```toml
base = "quickstart.toml"          # relative to this file
name = "alpha-sweep"              # optional: job name and run-name prefix (default: the base's name)
max_parallel = 4                  # optional: at most this many array tasks at once
[grid]
seed = [0, 1, 2]
"data.partition.alpha" = [0.1, 0.5]
```

Task order is deterministic: the grid's keys in file order, the last key varying fastest.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emulator.config import apply_overrides, read_toml, to_toml
from emulator.errors import UserError
from emulator.registry import did_you_mean
from slurm.render import Task, safe_name
from slurm.tasks import resolve, set_dotted

SWEEP_KEYS = ("base", "name", "max_parallel", "grid")


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: Path
    base: Path
    name: str | None
    max_parallel: int | None
    grid: dict[str, list[Any]]  # dotted key -> values, in file order


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (not yet the configs it makes: see :func:`sweep_tasks`)."""
    file = Path(path)
    where = f"sweep file {str(file)!r}"
    try:
        with open(file, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{where} not found") from None
    except IsADirectoryError:
        raise UserError(f"{where} is a directory; give a .toml file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where}: invalid TOML: {err}") from None
    for key in data:
        if key not in SWEEP_KEYS:
            raise UserError(f"{where}: unknown key {key!r}; {did_you_mean(key, list(SWEEP_KEYS))}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise UserError(f'{where}: needs base = "path/to/config.toml" (relative to the sweep file)')
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or safe_name(name) != name):
        raise UserError(f"{where}: name = {name!r}: use letters, digits and . _ + - only")
    parallel = data.get("max_parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise UserError(f"{where}: max_parallel = {parallel!r}: must be a whole number >= 1")
    grid_table = data.get("grid")
    if not isinstance(grid_table, dict) or not grid_table:
        raise UserError(f'{where}: needs a [grid] table of dotted keys and value lists, e.g. "seed" = [0, 1]')
    grid: dict[str, list[Any]] = {}
    for key, values in _flatten(grid_table):
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid {key!r} = {values!r}: must be a non-empty list of values")
        grid[key] = values
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = file.parent / base_path
    return Sweep(path=file, base=base_path, name=name, max_parallel=parallel, grid=grid)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``[grid.data.partition] alpha = [...]`` is the same as ``"data.partition.alpha" = [...]``."""
    items: list[tuple[str, Any]] = []
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        items.extend(_flatten(value, dotted) if isinstance(value, dict) else [(dotted, value)])
    return items


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product, keys in ``grid`` order, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's last part (``alpha``), or the whole key where last parts collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last, strict=True)}


def format_value(value: Any) -> str:
    """A value as it appears in a run name: 0.1, 2, true, resnet18, a+b for lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def label(point: Mapping[str, Any], shorts: Mapping[str, str]) -> str:
    """``alpha0.1-seed2``: the swept values of one task, filesystem-safe."""
    return safe_name("-".join(f"{shorts[k]}{format_value(v)}" for k, v in point.items()))


def sweep_tasks(sweep: Sweep, overrides: Sequence[str] = ()) -> list[Task]:
    """One validated task per grid point; any bad key or value fails here, before anything is written."""
    values = read_toml(sweep.base)
    apply_overrides(values, overrides)
    prefix = sweep.name or safe_name(str(values.get("name", "run")))
    shorts = short_keys(list(sweep.grid))
    tasks: list[Task] = []
    seen: set[str] = set()
    for index, point in enumerate(grid_points(sweep.grid)):
        name = f"{prefix}-{label(point, shorts)}"
        if name in seen:  # two values that differ only in characters a file name cannot hold
            name = f"{name}-{index}"
        seen.add(name)
        task_values = copy.deepcopy(values)
        try:
            for key, value in point.items():
                set_dotted(task_values, key, value)
            if "name" not in point:
                task_values["name"] = name
            cfg = resolve(task_values)
        except UserError as err:
            raise UserError(f"sweep task {index} ({name}): {err}") from None
        tasks.append(Task(index=index, name=name, config_toml=to_toml(cfg), values=point))
    return tasks


def task_table(tasks: Sequence[Task]) -> str:
    """A plain table: array index, run name and the swept values."""
    keys = list(tasks[0].values) if tasks else []
    rows = [["task", "name", *keys]]
    rows += [[str(t.index), t.name, *(format_value(t.values[k]) for k in keys)] for t in tasks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
