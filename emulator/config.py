"""Run configuration: frozen dataclasses, loaded from TOML, overridable with ``--set``.

Every field carries its allowed range in its metadata; a value outside it raises a
one-line :class:`ConfigError` naming the dotted key, the value and the range. The
resolved config is written back as TOML into the trace, so a run can be repeated
from its trace alone.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from emulator.errors import ConfigError, UserError
from emulator.registry import did_you_mean


def _opt(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    doc: str = "",
) -> Any:
    """A config field with its allowed range kept next to its default."""
    meta = {"ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices else None, "doc": doc}
    return field(default=default, metadata=meta)


def _allowed(meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "allowed: " + ", ".join(meta["choices"])
    lo = "[" + str(meta["ge"]) if meta.get("ge") is not None else (
        "(" + str(meta["gt"]) if meta.get("gt") is not None else "(-inf"
    )
    hi = str(meta["le"]) + "]" if meta.get("le") is not None else "inf)"
    return f"allowed range {lo}, {hi}"


class _Section:
    """Validates each field's type and range when a dataclass is constructed."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                if not isinstance(value, kind):
                    raise ConfigError(f.name, value, f"must be a table [{f.name}]")
                continue
            value = _check_type(f.name, value, kind)
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f.name, value, _allowed(meta))
            if isinstance(value, tuple) and meta.get("ge") is not None and len(value) < meta["ge"]:
                raise ConfigError(f.name, list(value), f"needs at least {meta['ge']:g} entries")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f.name, value, "must be a finite number")
                bad = (
                    (meta.get("ge") is not None and value < meta["ge"])
                    or (meta.get("gt") is not None and value <= meta["gt"])
                    or (meta.get("le") is not None and value > meta["le"])
                )
                if bad:
                    raise ConfigError(f.name, value, _allowed(meta))


def _check_type(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
    elif get_origin(kind) is tuple:  # tuple[str, ...]: a TOML array of strings
        item = get_args(kind)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # --set models=a,b
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, item) for v in value):
            raise ConfigError(key, value, f"must be a list of {item.__name__}s")
        value = tuple(value)
    return value


@dataclass(frozen=True)
class PartitionConfig(_Section):
    name: str = _opt("dirichlet", doc="partitioner: iid, dirichlet, shards, quantity")
    num_clients: int = _opt(100, ge=1, le=10_000_000, doc="registered (virtual) clients")
    alpha: float = _opt(0.5, gt=0.0, doc="Dirichlet concentration (dirichlet, quantity)")
    shards_per_client: int = _opt(2, ge=1, doc="label-sorted shards per client (shards)")


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: str = _opt("digits", doc="synthetic, digits, cifar10, cifar100, mnist, ...")
    root: str = _opt("data", doc="folder holding on-disk datasets; nothing is downloaded")
    image_size: int = _opt(0, ge=0, le=1024, doc="resize to this side; 0 = native size")
    num_classes: int = _opt(10, ge=2, le=100_000, doc="synthetic only")
    num_samples: int = _opt(6000, ge=2, doc="synthetic only: train + test samples")
    channels: int = _opt(3, ge=1, le=4, doc="synthetic only")
    test_fraction: float = _opt(0.2, gt=0.0, le=0.9, doc="held-out share where no split exists")
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = _opt("tiny_cnn", doc="a fedemu tiny model or any timm model name")
    pretrained: bool = _opt(False, doc="load pre-trained weights (timm); needs checkpoint offline")
    checkpoint: str = _opt("", doc="local weights file for pretrained=true (no hub access)")


@dataclass(frozen=True)
class TrainConfig(_Section):
    local_epochs: int = _opt(1, ge=1, le=1000)
    batch_size: int = _opt(32, ge=1, le=65536)
    lr: float = _opt(0.05, gt=0.0, le=10.0)
    momentum: float = _opt(0.9, ge=0.0, le=0.999)
    weight_decay: float = _opt(0.0, ge=0.0, le=1.0)


@dataclass(frozen=True)
class DevicesConfig(_Section):
    catalogue: str = _opt("builtin", doc="'builtin' or a catalogue TOML file")
    extra_catalogue: str = _opt("", doc="a TOML file whose devices are added to the catalogue")
    mix: str = _opt("uniform", doc="xsmall..xlarge (RaFFM), uniform, homogeneous:<device>, or rpi4:0.5,v100:0.5")
    jitter: float = _opt(0.1, ge=0.0, le=1.0, doc="per-client lognormal sigma of speed and bandwidth")
    noise: float = _opt(0.05, ge=0.0, le=1.0, doc="per-round lognormal sigma of a client's compute time")
    memory_fraction: float = _opt(1.0, gt=0.0, le=1.0, doc="share of a device's memory open to training")
    availability: bool = _opt(True, doc="sampled clients go offline at their device's rate")
    frequency: str = _opt("optimizer", choices=("optimizer", "max"), doc="DVFS: energy optimizer or fixed max")
    throttle: str = _opt("virtual", choices=("virtual", "sleep"), doc="sleep stretches real time to emulated")
    dilation: float = _opt(1.0, gt=0.0, doc="sleep mode: real time = emulated time / dilation")
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"), doc="where ranks compute")
    meter_period_s: float = _opt(0.1, ge=0.01, le=60.0, doc="NVML power sampling period")


@dataclass(frozen=True)
class PretrainConfig(_Section):
    """The source task a pool is pretrained on: distinct from the FL target task."""

    dataset: str = _opt("synthetic", doc="any registered dataset")
    root: str = _opt("data")
    num_classes: int = _opt(20, ge=2, le=100_000, doc="synthetic only")
    num_samples: int = _opt(6000, ge=2, doc="synthetic only")
    seed: int = _opt(1, ge=0, doc="differs from the run seed: another synthetic task")
    epochs: int = _opt(6, ge=1, le=10_000)
    batch_size: int = _opt(64, ge=1, le=65536)
    optimizer: str = _opt("adamw", choices=("adamw", "sgd"))
    lr: float = _opt(0.003, gt=0.0, le=10.0)


@dataclass(frozen=True)
class PoolConfig(_Section):
    path: str = _opt("data/pools/quickstart", doc="the pool folder (manifest.json + one safetensors per block)")
    source: str = _opt("pretrain", choices=("timm", "pretrain"), doc="timm weights, or pretrain here")
    models: tuple[str, ...] = _opt(
        ("test_resnet", "test_efficientnet", "test_convnext"), ge=1,
        doc="timm model names to cut into blocks",
    )
    pretrained: str = _opt("none", doc="source = timm: 'hub', 'none', or a weights file")
    input_size: int = _opt(32, ge=8, le=1024, doc="image side the blocks are described at")
    vit_groups: int = _opt(4, ge=1, le=64, doc="transformer blocks per ViT are split into this many groups")
    overwrite: bool = _opt(False)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass(frozen=True)
class OutputConfig(_Section):
    dir: str = _opt("runs", doc="folder for traces when output.trace is empty")
    trace: str = _opt("", doc="trace path; empty = <dir>/<name>-<time>.h5")
    overwrite: bool = _opt(False, doc="replace an existing trace at output.trace")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Round-boundary checkpoints beside the trace (``<trace>.ckpt/``), for ``fedemu run --resume``."""

    every: int = _opt(1, ge=0, le=1_000_000, doc="checkpoint after every this many rounds (and on a stop "
                                                 "signal and at the end); 0 = never")
    keep: int = _opt(2, ge=1, le=1000, doc="newest checkpoints kept; older ones are deleted")


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    threads: int = _opt(0, ge=0, le=1024, doc="torch threads per rank; 0 = cores / ranks on node")
    progress: str = _opt("auto", choices=("auto", "bar", "lines", "none"))
    eval_batch_size: int = _opt(512, ge=1, le=65536)
    round_timeout_s: float = _opt(0.0, ge=0.0, le=1e7, doc="watchdog: a round running longer dumps every "
                                                           "rank's stack and aborts the job; 0 = off")


@dataclass(frozen=True)
class StitchConfig(_Section):
    """FedStitch (DESIGN.md §5); the choices marked inferred there are options here."""

    depth: int = _opt(4, ge=1, le=64, doc="most blocks in the stitched model (the first included)")
    order: str = _opt("position", choices=("position", "any"),
                      doc="step k's candidates: the k-th block of each source model (position), or any block "
                          "the join rule allows after the last one (any)")
    head_rounds: int = _opt(3, ge=1, le=1000, doc="rounds whose clients' statistics are summed for the head")
    score: str = _opt("cka", choices=("cka", "ncm", "probe"),
                      doc="client score of a candidate: linear CKA vs one-hot labels, nearest-class-mean "
                          "or ridge linear-probe accuracy on its own data")
    weighting: str = _opt("rl", choices=("rl", "data"), doc="client weights: the RL policy, or sample counts")
    policy: str = _opt("", doc="a policy file (safetensors) to start the RL weighting from; empty = fresh")
    search_space: bool = _opt(True, doc="search-space optimizer after each step (off = the ablation)")
    drop_fraction: float = _opt(0.5, ge=0.0, le=0.95, doc="drop source models ranked in this bottom share")
    min_models: int = _opt(2, ge=1, doc="the optimizer never keeps fewer source models")
    patience: int = _opt(1, ge=1, le=64, doc="stop after this many steps without proxy gain")
    min_gain: float = _opt(0.0, ge=-1.0, le=1.0, doc="a step must raise the quality proxy by more than this")
    ridge: float = _opt(1e-3, ge=0.0, le=1e3, doc="relative ridge of the stitching-layer and head fits")
    head: str = _opt("ridge", choices=("ridge", "ncm"), doc="the federated head: ridge regression or class means")
    batch_size: int = _opt(64, ge=1, le=65536, doc="forward batch on clients")
    cache: bool = _opt(True, doc="keep each client's prefix features across steps (within its memory budget)")
    cache_mib: int = _opt(1024, ge=0, doc="per-rank cap on cached features (MiB), least recently used dropped")
    blocks_on_device: bool = _opt(False, doc="clients hold the pool already: candidate blocks cost no download")


@dataclass(frozen=True)
class RLConfig(_Section):
    """The built-in REINFORCE client-weighting policy (``rl_agent``)."""

    lr: float = _opt(0.01, gt=0.0, le=1.0)
    hidden: int = _opt(32, ge=1, le=4096, doc="hidden units of the per-client policy network")
    sigma: float = _opt(0.5, gt=0.0, le=10.0, doc="exploration: std of the Gaussian on each client's logit")
    baseline_momentum: float = _opt(0.9, ge=0.0, le=0.999, doc="running-mean reward baseline")
    train: bool = _opt(True, doc="update the policy during live runs")
    max_clients: int = _opt(64, ge=1, le=100_000, doc="padded observation size (clients)")
    max_candidates: int = _opt(64, ge=1, le=100_000, doc="padded observation size (candidate blocks)")
    save: str = _opt("", doc="write the policy here (safetensors) at the end of a live run")


@dataclass(frozen=True)
class ProFLConfig(_Section):
    """ProFL (arXiv 2404.13349), progressive block-wise training; inferred parts are options.

    See docs/algorithms-profl.md.
    """

    shrinking: str = _opt("paper", choices=("paper", "none"),
                          doc="shrinking stage (back to front, initialises blocks and output modules) or none")
    shrink_rounds: int = _opt(2, ge=1, le=100_000, doc="rounds per block in the shrinking stage")
    num_blocks: int = _opt(4, ge=0, le=64, doc="merge front stages into at most this many blocks; 0 = one per stage")
    window: int = _opt(5, ge=1, le=1000, doc="W: updates of a block the effective movement looks back over")
    threshold: float = _opt(0.15, gt=0.0, le=1.0, doc="tau: a block freezes when its effective movement stays below it")
    patience: int = _opt(2, ge=1, le=1000, doc="consecutive checks below the threshold before a block freezes")
    metric: str = _opt("block", choices=("block", "layer_mean"),
                       doc="effective movement over the block as one vector, or the mean over its tensors")
    min_rounds_per_block: int = _opt(5, ge=1, le=1_000_000, doc="growing stage: rounds before a block may freeze")
    max_rounds_per_block: int = _opt(40, ge=1, le=1_000_000, doc="growing stage: freeze a block after this many rounds")
    output_width: int = _opt(0, ge=0, le=65536, doc="channels of the output modules' conv; 0 = the model's final width")
    download_prefix: bool = _opt(True, doc="clients download the frozen prefix each round (they keep nothing)")
    fitting_clients: bool = _opt(True, doc="sample each step's cohort only among clients whose memory budget "
                                           "holds that step's training (off: sample all, the rest are oom)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_rounds_per_block < self.min_rounds_per_block:
            raise ConfigError(
                "max_rounds_per_block", self.max_rounds_per_block,
                f"must be >= profl.min_rounds_per_block = {self.min_rounds_per_block}",
            )


@dataclass(frozen=True)
class FedPEFTConfig(_Section):
    """FedPEFT (arXiv 2210.01708): a frozen backbone fine-tuned through a small trainable subset.

    See docs/algorithms-fedpeft-raffm.md.
    """

    variant: str = _opt("bias", choices=("bias", "adapter", "prompt", "head", "full", "scratch"),
                        doc="what trains: biases+head, adapters+head, deep prompts+head, the head, "
                            "everything (full fine-tune), or everything from random init (scratch)")
    adapter_reduction: int = _opt(8, ge=1, le=4096, doc="adapter bottleneck: d -> d/reduction -> d")
    prompt_tokens: int = _opt(10, ge=1, le=1024, doc="learnable prompt tokens per layer (deep VPT)")
    prompt_dropout: float = _opt(0.1, ge=0.0, le=0.9, doc="dropout on the prompt tokens while training")
    dp: bool = _opt(False, doc="sample-level DP-SGD on clients (needs the 'dp' extra: opacus)")
    epsilon: float = _opt(5.0, gt=0.0, le=1000.0, doc="DP target epsilon")
    delta: float = _opt(1e-3, gt=0.0, le=0.5, doc="DP target delta")
    clip: float = _opt(1.0, gt=0.0, le=1e6, doc="per-sample gradient L2 clip norm")
    accountant: str = _opt("rdp", choices=("rdp", "prv"), doc="opacus accountant for the noise multiplier")
    faithful_to_code: bool = _opt(False, doc="the authors' code: one shared adapter; DP noise without clipping")


@dataclass(frozen=True)
class RaFFMConfig(_Section):
    """RaFFM (arXiv 2310.00247): salient parameter prioritisation + budget-fitted ViT subnetworks.

    See docs/algorithms-fedpeft-raffm.md.
    """

    mlp_ratios: tuple[float, ...] = _opt((0.25, 0.5, 0.75, 1.0), ge=1,
                                         doc="elastic MLP hidden widths, fractions of the full hidden size")
    head_ratios: tuple[float, ...] = _opt((0.5, 0.75, 1.0), ge=1,
                                          doc="elastic per-head Q/K/V dimension, fractions of the head dim "
                                              "(every head is kept)")
    spp: bool = _opt(True, doc="salient parameter prioritisation every round (off = the ablation)")
    eval_sizes: bool = _opt(True, doc="at the last round, test every ladder size into raffm/eval")
    faithful_to_code: bool = _opt(False, doc="the authors' code: random per-layer sizes, first client full, "
                                             "average divided by every client's weight")

    def __post_init__(self) -> None:
        for key in ("mlp_ratios", "head_ratios"):
            object.__setattr__(self, key, self._ratios(key, getattr(self, key)))
        super().__post_init__()

    @staticmethod
    def _ratios(key: str, value: Any) -> tuple[float, ...]:
        """Ratios in (0, 1], sorted and deduplicated; accepts ``--set k=0.5,1`` and TOML ints."""
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(key, value, "must be a non-empty list of numbers in (0, 1]")
        try:
            ratios = [float(v) for v in items if not isinstance(v, bool)]
        except (TypeError, ValueError):
            raise ConfigError(key, list(items), "must be a non-empty list of numbers in (0, 1]") from None
        if len(ratios) != len(items) or not all(0.0 < r <= 1.0 for r in ratios):
            raise ConfigError(key, list(items), "must be a non-empty list of numbers in (0, 1]")
        return tuple(sorted(set(ratios)))


@dataclass(frozen=True)
class Config(_Section):
    name: str = _opt("run", doc="run name, used in the trace file name")
    seed: int = _opt(0, ge=0, le=2**63 - 1)
    rounds: int = _opt(10, ge=1, le=10_000_000)
    clients_per_round: int = _opt(10, ge=1)
    eval_every: int = _opt(1, ge=1, doc="evaluate every N rounds (and always the last)")
    deadline_s: float = _opt(0.0, ge=0.0, doc="emulated round deadline; 0 = wait for every client")
    overcommit: float = _opt(1.0, ge=1.0, le=10.0, doc="sample this many times clients_per_round, keep the first")
    algorithm: str = _opt("fedavg")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    profl: ProFLConfig = field(default_factory=ProFLConfig)
    fedpeft: FedPEFTConfig = field(default_factory=FedPEFTConfig)
    raffm: RaFFMConfig = field(default_factory=RaFFMConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.data.partition.num_clients
        if self.clients_per_round > n:
            raise ConfigError(
                "clients_per_round", self.clients_per_round,
                f"must be <= data.partition.num_clients = {n}",
            )


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Construct ``cls`` from a TOML table, naming the full dotted key in any error."""
    if not isinstance(values, Mapping):
        raise ConfigError(prefix or "<root>", values, "must be a table")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise UserError(f"{path}: unknown config key; {did_you_mean(key, names)}")
        kind = hints[key]
        kwargs[key] = _build(kind, value, path) if dataclasses.is_dataclass(kind) else value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.with_prefix(prefix) from None


def config_from_dict(values: Mapping[str, Any]) -> Config:
    return _build(Config, values, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value); the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set rounds=5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words (synthetic, runs/x.h5) need no quotes
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        table = values
        for part in parts[:-1]:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {part!r} is a value, not a table")
            table = child
        table[parts[-1]] = value
    return values


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {str(path)!r} not found") from None
    except IsADirectoryError:
        raise UserError(f"config file {str(path)!r} is a directory; give a .toml file") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {str(path)!r}: invalid TOML: {err}") from None


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML file (None = the embedded defaults), apply ``--set`` overrides, validate."""
    values = read_toml(Path(path)) if path is not None else {}
    cfg = config_from_dict(apply_overrides(values, overrides))
    check_plugins(cfg)
    return cfg


def check_plugins(cfg: Config) -> None:
    """Names of plugins must exist in their registries (imports kept lazy: timm is slow)."""
    from emulator.algorithms import ALGORITHMS
    from emulator.data import DATASETS, PARTITIONERS
    from emulator.models import check_model_name

    ALGORITHMS.get(cfg.algorithm, key="algorithm")
    DATASETS.get(cfg.data.dataset, key="data.dataset")
    PARTITIONERS.get(cfg.data.partition.name, key="data.partition.name")
    check_model_name(cfg.model.name, key="model.name")
    if cfg.model.pretrained and cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError("model.checkpoint", cfg.model.checkpoint, "file not found")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text (top-level scalars first, then tables)."""
    lines: list[str] = []
    _emit_table(to_dict(cfg), [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(values: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
    if path:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(value, [*path, key], lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
