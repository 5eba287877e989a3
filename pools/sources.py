"""Pool sources: where a pool's blocks come from, as a small registry (DESIGN.md §8).

- ``timm``: timm models, random init (``pretrained="none"``), timm's own pretrained weights (``"hub"``: the Hugging
  Face Hub through timm, honouring the HF cache and ``HF_HUB_OFFLINE``), or a local weights file; see
  :func:`build_pool`.
- ``pretrain``: timm models trained here on a source dataset given as arrays; see :func:`pools.pretrain.pretrain_pool`.

``create_pool("timm", path, models=[...], input_size=32)`` builds through the registry; an unknown source name is
a one-line PoolError with "did you mean".
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from pools.blocks import cut_model, describe_blocks, family_of
from pools.errors import PoolError
from pools.store import Pool, did_you_mean, one_line, write_pool

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")
HUB_PROBE_TIMEOUT_S = 3.0

PretrainedSpec = str | os.PathLike[str]

SOURCES: dict[str, Callable[..., Pool]] = {}


def register_source(name: str) -> Callable[[Callable[..., Pool]], Callable[..., Pool]]:
    """Register a pool source factory ``factory(path, **kwargs) -> Pool`` under ``name``."""

    def decorator(factory: Callable[..., Pool]) -> Callable[..., Pool]:
        if name in SOURCES:
            raise ValueError(f"pool source {name!r} registered twice")
        SOURCES[name] = factory
        return factory

    return decorator


def get_source(name: str) -> Callable[..., Pool]:
    """The factory of pool source ``name``; a one-line PoolError with "did you mean" otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise PoolError(f"unknown pool source {name!r}; {did_you_mean(name, list(SOURCES))}") from None


def create_pool(source: str, path: str | os.PathLike[str], /, **kwargs: Any) -> Pool:
    """Build a pool at ``path`` with the registered source ``source`` (``timm``, ``pretrain``)."""
    return get_source(source)(path, **kwargs)


# --------------------------------------------------------------------------- creating timm models
def timm_kwargs(model_name: str, *, input_size: int, in_chans: int, num_classes: int = 0) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments a pool records to rebuild ``model_name``'s architecture."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if family_of(model_name) == "vit":  # position embeddings are sized for the input
        kwargs["img_size"] = input_size
    return kwargs


def create_timm(
    model_name: str, *, pretrained: PretrainedSpec, input_size: int, in_chans: int, num_classes: int = 0
) -> nn.Module:
    """A timm model for a pool, in eval mode (``num_classes=0``: no classifier head, by default).

    ``pretrained``: ``"none"`` (random init), ``"hub"`` (timm's own pretrained weights: Hugging Face Hub or its
    cache; fails fast with a one-line PoolError when they are not cached and the hub is unreachable) or the path
    of a local weights file (``.safetensors`` preferred; ``.pth``/``.bin`` go through timm's loader).
    """
    kwargs = timm_kwargs(model_name, input_size=input_size, in_chans=in_chans, num_classes=num_classes)
    if not isinstance(pretrained, str | os.PathLike):
        raise PoolError(f"model {model_name!r}: pretrained={pretrained!r} must be 'none', 'hub' or a weights file")
    if pretrained == "none":
        # Seeded by the name (and the caller's RNG left alone): the same random pool on every build.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(model_name.encode()))
            model = _create(model_name, kwargs, pretrained=False)
    elif pretrained == "hub":
        _check_hub_reachable(model_name)
        model = _create(model_name, kwargs, pretrained=True, what="pretrained='hub'")
    else:
        file = _weights_file(model_name, pretrained)
        with _TimmLoadLog() as log:
            model = _create(
                model_name,
                kwargs,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(file)},
                what=f"weights file {file}",
            )
        log.check(model_name, file)
    return model.eval()


def _create(model_name: str, kwargs: dict[str, Any], *, pretrained: bool, what: str = "", **extra: Any) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs, **extra)
    except PoolError:
        raise
    except Exception as err:  # timm/hub/torch raise many kinds; the user gets one line
        via = f" with {what}" if what else ""
        raise PoolError(f"model {model_name!r}: cannot create it{via} ({one_line(err)})") from None


def _weights_file(model_name: str, pretrained: PretrainedSpec) -> Path:
    file = Path(pretrained).expanduser()
    if not str(file).lower().endswith(WEIGHT_SUFFIXES):
        raise PoolError(
            f"model {model_name!r}: pretrained={str(pretrained)!r} is neither 'none', 'hub' nor a weights file "
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    if not file.is_file():
        raise PoolError(f"model {model_name!r}: weights file {file} does not exist; fix the path")
    return file.resolve()


class _TimmLoadLog(logging.Handler):
    """Captures what timm's loader logs about missing/unexpected keys (it loads non-strict when it drops the head)."""

    LOGGER = "timm.models._builder"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TimmLoadLog:
        logger = logging.getLogger(self.LOGGER)
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger(self.LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]

    def check(self, model_name: str, file: Path) -> None:
        for msg in self.messages:
            if msg.startswith("Missing keys") or "random init" in msg:
                raise PoolError(
                    f"model {model_name!r}: weights file {file} does not fit the model ({msg[:300]}); "
                    "give the weights of this very architecture"
                )
            if msg.startswith("Unexpected keys"):
                warnings.warn(f"model {model_name!r}: weights file {file}: {msg[:300]}", stacklevel=3)


# --------------------------------------------------------------------------- hub: fail fast offline
def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_files(model_name: str) -> tuple[str | None, list[str], str | None]:
    """(hf repo id[@rev], candidate file names, plain url) of timm's pretrained weights for ``model_name``."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise PoolError(f"model {model_name!r}: timm has no pretrained weights for it; use pretrained='none'")
    hub_id = getattr(cfg, "hf_hub_id", None) or None
    url = getattr(cfg, "url", None) or None
    if not hub_id and not url:
        raise PoolError(f"model {model_name!r}: timm has no pretrained weights for it; use pretrained='none'")
    filename = getattr(cfg, "hf_hub_filename", None)
    if filename:
        files = [filename]
        if not filename.endswith(".safetensors"):
            files.insert(0, "model.safetensors" if filename == "pytorch_model.bin" else filename + ".safetensors")
    else:
        files = ["model.safetensors", "pytorch_model.bin"]
    return hub_id, files, url


def _cached(hub_id: str | None, files: list[str], url: str | None) -> bool:
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for file in files:
            with contextlib.suppress(Exception):
                hit = try_to_load_from_cache(repo, file, cache_dir=str(hf_hub_cache_dir()), revision=revision or None)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return True
    if url:
        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if checkpoint.is_file():
            return True
    return False


def _unreachable(host_url: str) -> str | None:
    """Why ``host_url`` cannot be reached within a few seconds, or None when a TCP connection opens."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe says nothing; let the download itself decide
    parsed = urlparse(host_url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable: {one_line(err)}"


def _check_hub_reachable(model_name: str) -> None:
    """Fail within seconds, in one line, when timm's weights are neither cached nor downloadable."""
    hub_id, files, url = _hub_files(model_name)
    if _cached(hub_id, files, url):
        return
    where = f"Hugging Face repo {hub_id}" if hub_id else url
    fix = (
        f"download them once with network into the cache (timm.create_model({model_name!r}, pretrained=True)), "
        "then set HF_HUB_OFFLINE=1 with that populated cache, or pass pretrained=<path to a .safetensors file>"
    )
    if _hub_offline():
        raise PoolError(
            f"model {model_name!r}: pretrained='hub' weights ({where}) are not in the cache {hf_hub_cache_dir()} "
            f"and HF_HUB_OFFLINE is set (no network); {fix}"
        )
    probe = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub_id else url
    why = _unreachable(probe or "https://huggingface.co")
    if why:
        raise PoolError(
            f"model {model_name!r}: pretrained='hub' weights ({where}) are not in the cache {hf_hub_cache_dir()} "
            f"and there is no network ({why}); {fix}"
        )


# --------------------------------------------------------------------------- the timm source
def model_spec(
    model: nn.Module, model_name: str, kwargs: dict[str, Any], *, vit_groups: int, **extra: Any
) -> dict[str, Any]:
    """What a pool's ``source["models"]`` records per model: how to rebuild it and how to normalise its input."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    spec: dict[str, Any] = {"model": model_name, "kwargs": dict(kwargs), "vit_groups": vit_groups}
    if cfg.get("mean") and cfg.get("std"):
        spec["mean"], spec["std"] = list(cfg["mean"]), list(cfg["std"])
    spec.update(extra)
    return spec


def _pretrained_record(spec: PretrainedSpec) -> str | dict[str, str]:
    if spec in ("none", "hub"):
        return str(spec)
    file = Path(spec).expanduser().resolve()
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return {"file": str(file), "sha256": digest.hexdigest()}


def check_models(models: list[str]) -> None:
    """A non-empty list of distinct timm models that can be cut (PoolError naming the bad one otherwise)."""
    if isinstance(models, str) or not models:
        raise PoolError(f"models = {models!r}: give a non-empty list of timm model names")
    dupes = sorted({m for m in models if models.count(m) > 1})
    if dupes:
        raise PoolError(f"models lists {', '.join(dupes)} more than once; each model goes into a pool once")
    for name in models:
        family_of(name)  # unknown model or family: PoolError with did-you-mean


def check_new_path(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise PoolError(f"pool {path} already exists; pass overwrite=True (--overwrite) or choose another path")


@register_source("timm")
def build_pool(
    path: str | os.PathLike[str],
    *,
    models: list[str],
    pretrained: PretrainedSpec | dict[str, PretrainedSpec] = "none",
    input_size: int,
    in_chans: int = 3,
    vit_groups: int = 4,
    overwrite: bool = False,
) -> Pool:
    """The ``timm`` source: create each model, cut it into blocks, describe them, write the pool.

    ``pretrained`` is one spec for every model (``"none"``, ``"hub"``, a weights file) or a dict model -> spec
    (a weights file belongs to one architecture, so several models need the dict form).
    """
    path = Path(path)
    check_new_path(path, overwrite)
    check_models(models)
    if isinstance(pretrained, dict):
        unknown = sorted(set(pretrained) - set(models))
        if unknown:
            raise PoolError(f"pretrained names model(s) {', '.join(unknown)} that are not in models {models}")
        specs = {m: pretrained.get(m, "none") for m in models}
    else:
        if pretrained not in ("none", "hub") and len(models) > 1:
            raise PoolError(
                f"pretrained={str(pretrained)!r} is one weights file for {len(models)} models; "
                "give a dict {model: weights file} instead"
            )
        specs = {m: pretrained for m in models}

    pairs: list[tuple[nn.Module, Any]] = []
    records = []
    for name in models:
        kwargs = timm_kwargs(name, input_size=input_size, in_chans=in_chans)
        model = create_timm(name, pretrained=specs[name], input_size=input_size, in_chans=in_chans)
        blocks = cut_model(model, name, vit_groups=vit_groups)
        infos = describe_blocks(blocks, model_name=name, input_size=input_size, in_chans=in_chans)
        pairs.extend(zip(blocks, infos, strict=True))
        records.append(
            model_spec(model, name, kwargs, vit_groups=vit_groups, pretrained=_pretrained_record(specs[name]))
        )
    source = {
        "kind": "timm",
        "models": records,
        "vit_groups": vit_groups,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    return write_pool(path, blocks=pairs, input_size=input_size, in_chans=in_chans, source=source, overwrite=overwrite)


@register_source("pretrain")
def _pretrain_source(path: str | os.PathLike[str], /, **kwargs: Any) -> Pool | None:
    from pools.pretrain import pretrain_pool

    return pretrain_pool(path, **kwargs)
