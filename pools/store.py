"""Pool folders on disk: ``manifest.json`` plus one safetensors file per block.

Layout of a pool folder::

    manifest.json            {"schema_version": 1, "input_size", "in_chans", "source", "blocks": [...]}
    resnet18.0.safetensors   the block's state_dict (safetensors; metadata names the block)
    ...

Each ``blocks`` entry is ``BlockInfo.to_json()`` plus ``file``, ``tensors`` (key -> shape and safetensors dtype)
and ``sha256`` of the file. ``source`` says how the pool was built; ``source["models"]`` holds, per source model,
the timm name and the ``create_model`` keyword arguments that rebuild its architecture, so ``Pool.block`` can
recreate any block without the original checkpoint. No pickle anywhere: tensors go through safetensors only.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from pools.blocks import cut_model
from pools.errors import PoolError
from pools.info import BlockInfo

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "input_size", "in_chans", "source", "blocks")
BLOCK_KEYS = ("file", "tensors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch dtype -> the safetensors header's dtype name
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def did_you_mean(name: str, choices: list[str]) -> str:
    """A short hint naming the closest choices (pools must not import the emulator's registry)."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    if len(choices) <= 12:
        return "choose one of " + ", ".join(sorted(choices))
    return f"none of the {len(choices)} known names is close"


def one_line(err: BaseException | str) -> str:
    """An exception's message squeezed onto one line (for PoolError messages)."""
    return " ".join(str(err).split()) or type(err).__name__


def block_filename(name: str) -> str:
    """The file a block is stored in: its name with anything but ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".safetensors"


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a pool") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def model_specs(source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``source["models"]`` as {timm model name: spec}; a spec has ``model`` and ``kwargs`` at least."""
    models = source.get("models")
    if not isinstance(models, list):
        raise ValueError('source["models"] must be a list of {"model": ..., "kwargs": {...}}')
    specs: dict[str, dict[str, Any]] = {}
    for spec in models:
        if not (isinstance(spec, dict) and isinstance(spec.get("model"), str) and isinstance(spec.get("kwargs"), dict)):
            raise ValueError(f'source["models"] entry {spec!r} lacks "model" (str) or "kwargs" (dict)')
        specs[spec["model"]] = spec
    return specs


class Pool:
    """A loaded (validated) pool folder. Blocks are rebuilt on demand by :meth:`block`."""

    def __init__(
        self,
        path: Path,
        *,
        input_size: int,
        in_chans: int,
        infos: list[BlockInfo],
        source: dict[str, Any],
        entries: dict[str, dict[str, Any]],
    ) -> None:
        self.path = path
        self.input_size = input_size
        self.in_chans = in_chans
        self.infos = infos
        self.source = source
        self._entries = entries  # block name -> manifest entry (file, tensors, sha256)
        self._by_name = {info.name: info for info in infos}
        self._specs = model_specs(source)
        self._cut: dict[str, list[nn.Module]] = {}  # model name -> its cut blocks (rebuilt architecture)
        self._loaded: set[str] = set()  # block names whose weights are in the cached modules

    # ----------------------------------------------------------------- loading and validation
    @staticmethod
    def load(path: str | os.PathLike[str], *, verify: bool = False) -> Pool:
        """Open and validate a pool folder; every problem is one PoolError line naming the block/file and the fix.

        Checks the manifest (JSON, schema version, required keys), that every block file exists and that its
        safetensors header holds exactly the manifest's tensor keys, shapes and dtypes. ``verify=True`` also
        checks every file's sha256 (reads all bytes; :meth:`block` checks the one it loads anyway).
        """
        path = Path(path)
        where = f"pool {path}"
        if not path.is_dir():
            if path.exists():
                raise PoolError(f"{where}: not a folder; give the pool's folder (the one holding {MANIFEST})")
            raise PoolError(f"{where}: no such folder; build it first (fedemu pool build) or fix the path")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise PoolError(f"{where}: {MANIFEST} is missing; not a pool folder, or an incomplete one: rebuild it")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PoolError(f"{where}: {MANIFEST} is not valid JSON ({one_line(err)}); rebuild the pool") from None
        if not isinstance(manifest, dict):
            raise PoolError(f"{where}: {MANIFEST} is not a JSON object; rebuild the pool")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PoolError(
                f"{where}: {MANIFEST} has schema_version {version!r}, this fedemu reads {SCHEMA_VERSION}; "
                "rebuild the pool with this version"
            )
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise PoolError(f"{where}: {MANIFEST} lacks key(s) {', '.join(missing)}; rebuild the pool")
        input_size, in_chans, source, blocks = (manifest[k] for k in ("input_size", "in_chans", "source", "blocks"))
        for key, value in (("input_size", input_size), ("in_chans", in_chans)):
            if not (isinstance(value, int) and value > 0):
                raise PoolError(f"{where}: {MANIFEST} {key} = {value!r} is not a positive integer; rebuild the pool")
        if not isinstance(source, dict):
            raise PoolError(f"{where}: {MANIFEST} source is not an object; rebuild the pool")
        try:
            specs = model_specs(source)
        except ValueError as err:
            raise PoolError(f"{where}: {MANIFEST} {one_line(err)}; rebuild the pool") from None
        if not isinstance(blocks, list) or not blocks:
            raise PoolError(f"{where}: {MANIFEST} lists no blocks; rebuild the pool")

        infos: list[BlockInfo] = []
        entries: dict[str, dict[str, Any]] = {}
        for position, entry in enumerate(blocks):
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"block {name!r}" if isinstance(name, str) else f"block #{position}"
            if not isinstance(entry, dict) or any(k not in entry for k in BLOCK_KEYS):
                raise PoolError(f"{where}: {label} entry lacks file/tensors in {MANIFEST}; rebuild the pool")
            fields = {k: v for k, v in entry.items() if k not in (*BLOCK_KEYS, "sha256")}
            try:
                info = BlockInfo.from_json(fields)
            except (TypeError, KeyError, ValueError) as err:
                raise PoolError(
                    f"{where}: {label} entry is malformed in {MANIFEST} ({one_line(err)}); rebuild the pool"
                ) from None
            if info.name in entries:
                raise PoolError(f"{where}: {label} is listed twice in {MANIFEST}; rebuild the pool")
            if (info.input_size, info.in_chans) != (input_size, in_chans):
                raise PoolError(
                    f"{where}: {label} was described at input_size {info.input_size}, in_chans {info.in_chans} but "
                    f"the pool says {input_size}, {in_chans}; rebuild the pool"
                )
            if info.model not in specs:
                raise PoolError(
                    f"{where}: {label} comes from model {info.model!r} which source.models does not "
                    "describe; rebuild the pool"
                )
            _check_block_file(path, info.name, entry)
            infos.append(info)
            entries[info.name] = entry
        pool = Pool(path, input_size=input_size, in_chans=in_chans, infos=infos, source=source, entries=entries)
        if verify:
            pool.verify()
        return pool

    def verify(self) -> None:
        """Check every block file's sha256 against the manifest (reads every byte)."""
        for info in self.infos:
            entry = self._entries[info.name]
            if "sha256" in entry and _sha256(self.path / entry["file"]) != entry["sha256"]:
                raise PoolError(self._corrupt(info.name, "its sha256 differs from the manifest's"))

    def _corrupt(self, name: str, why: str) -> str:
        file = self._entries[name]["file"]
        return f"pool {self.path}: block {name!r} file {file} is truncated or corrupt: {why}; rebuild the pool"

    # ----------------------------------------------------------------- queries
    def names(self) -> list[str]:
        return [info.name for info in self.infos]

    def info(self, name: str) -> BlockInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise PoolError(f"pool {self.path}: no block {name!r}; {did_you_mean(name, self.names())}") from None

    def models(self) -> list[str]:
        """Source model names in pool order."""
        return list(dict.fromkeys(info.model for info in self.infos))

    def model_spec(self, model: str) -> dict[str, Any]:
        """How ``model`` was created: ``{"model", "kwargs", ...}`` from the manifest's source."""
        try:
            return self._specs[model]
        except KeyError:
            raise PoolError(f"pool {self.path}: no model {model!r}; {did_you_mean(model, self.models())}") from None

    def normalization(self, model: str) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) the model's first block expects its [0, 1] images normalised with."""
        spec = self.model_spec(model)
        mean = list(spec.get("mean", IMAGENET_MEAN))
        std = list(spec.get("std", IMAGENET_STD))
        if len(mean) != self.in_chans:  # e.g. ImageNet statistics for a 1-channel pool
            mean = [sum(mean) / len(mean)] * self.in_chans
            std = [sum(std) / len(std)] * self.in_chans
        return mean, std

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[BlockInfo]:
        return iter(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __repr__(self) -> str:
        return f"Pool({str(self.path)!r}, {len(self)} blocks from {', '.join(self.models())}, input {self.input_size})"

    # ----------------------------------------------------------------- rebuilding blocks
    def block(self, name: str) -> nn.Module:
        """The block ``name`` with its stored weights (eval mode).

        The model's architecture is recreated with timm (``pretrained=False`` and the recorded kwargs) and cut
        once per source model; the cut modules are cached and shared, so two calls return the same module:
        ``copy.deepcopy`` it before changing its weights.
        """
        info = self.info(name)
        blocks = self._cut.get(info.model)
        if blocks is None:
            blocks = self._rebuild(info.model)
            self._cut[info.model] = blocks
        if info.index >= len(blocks):
            raise PoolError(
                f"pool {self.path}: block {name!r} has index {info.index} but cutting {info.model!r} "
                f"gives {len(blocks)} blocks (different timm version?); rebuild the pool"
            )
        module = blocks[info.index]
        if name not in self._loaded:
            module.load_state_dict(self._read_state(name), strict=True)
            self._loaded.add(name)
        return module.eval()

    def _rebuild(self, model: str) -> list[nn.Module]:
        spec = self.model_spec(model)
        try:
            net = timm.create_model(model, pretrained=False, **spec["kwargs"])
        except Exception as err:  # unknown model in this timm, bad kwargs
            raise PoolError(
                f"pool {self.path}: cannot recreate model {model!r} with {spec['kwargs']} "
                f"({one_line(err)}); use the timm version that built the pool or rebuild it"
            ) from None
        return cut_model(net, model, vit_groups=int(spec.get("vit_groups", 4)))

    def _read_state(self, name: str) -> dict[str, torch.Tensor]:
        entry = self._entries[name]
        file = self.path / entry["file"]
        try:
            data = file.read_bytes()
        except OSError as err:
            raise PoolError(self._corrupt(name, one_line(err))) from None
        if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise PoolError(self._corrupt(name, "its sha256 differs from the manifest's"))
        try:
            return safetensors.torch.load(data)
        except Exception as err:
            raise PoolError(self._corrupt(name, one_line(err))) from None


def _check_block_file(path: Path, name: str, entry: dict[str, Any]) -> None:
    """The header of the block's safetensors file matches the manifest's keys, shapes and dtypes."""
    file = entry["file"]
    where = f"pool {path}: block {name!r} file {file}"
    if not isinstance(file, str) or Path(file).name != file:
        raise PoolError(f"{where}: the manifest's file name is not a plain file name; rebuild the pool")
    tensors = entry["tensors"]
    if not isinstance(tensors, dict):
        raise PoolError(f"{where}: the manifest's tensors entry is not an object; rebuild the pool")
    full = path / file
    if not full.is_file():
        raise PoolError(f"{where} is missing; rebuild the pool")
    try:
        with safetensors.safe_open(str(full), framework="pt") as fh:
            header = {key: (list(fh.get_slice(key).get_shape()), fh.get_slice(key).get_dtype()) for key in fh.keys()}
    except Exception as err:  # safetensors raises SafetensorError (and others) on bad headers or short files
        raise PoolError(f"{where} is truncated or corrupt: {one_line(err)}; rebuild the pool") from None
    extra = sorted(set(header) - set(tensors))
    lacking = sorted(set(tensors) - set(header))
    if extra or lacking:
        parts = []
        if lacking:
            parts.append(f"lacks tensor(s) {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''}")
        if extra:
            parts.append(f"has unlisted tensor(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise PoolError(f"{where} does not match the manifest: it {' and '.join(parts)}; rebuild the pool")
    for key, want in tensors.items():
        shape, dtype = header[key]
        if not isinstance(want, dict) or list(want.get("shape", [])) != shape or want.get("dtype") != dtype:
            raise PoolError(
                f"{where} does not match the manifest: tensor {key!r} is {dtype}{shape} in the file but "
                f"{want!r} in the manifest; rebuild the pool"
            )


def write_pool(
    path: str | os.PathLike[str],
    *,
    blocks: list[tuple[nn.Module, BlockInfo]],
    input_size: int,
    in_chans: int,
    source: dict[str, Any],
    overwrite: bool = False,
) -> Pool:
    """Write a pool folder atomically and return it loaded.

    Everything goes into a sibling ``<name>.tmp-XXXX`` folder that is renamed to ``path`` only once complete,
    so an interrupted write never leaves a half pool at ``path``. ``source["models"]`` must describe every
    block's model (``{"model": name, "kwargs": {...timm create_model kwargs}}``) so blocks can be rebuilt.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PoolError(f"pool {path} already exists; pass overwrite=True (--overwrite) or choose another path")
    if not blocks:
        raise ValueError("write_pool needs at least one block")
    specs = model_specs(source)
    names = [info.name for _, info in blocks]
    if len(set(names)) != len(names):
        raise ValueError(f"block names are not unique: {names}")
    files = [block_filename(name) for name in names]
    if len(set(files)) != len(files) or MANIFEST in files:
        raise ValueError(f"block names map to clashing file names: {files}")
    for _, info in blocks:
        if (info.input_size, info.in_chans) != (input_size, in_chans):
            raise ValueError(
                f"block {info.name!r} was described at {info.input_size}/{info.in_chans} channels, "
                f"not the pool's {input_size}/{in_chans}"
            )
        if info.model not in specs:
            raise ValueError(f'source["models"] does not describe model {info.model!r} of block {info.name!r}')
    json.dumps(source)  # fail before writing anything if the source is not JSON

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(path, "tmp")
    try:
        entries = []
        for (module, info), file in zip(blocks, files, strict=True):
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
            safetensors.torch.save_file(state, str(tmp / file), metadata={"block": info.name, "model": info.model})
            os.chmod(tmp / file, _FILE_MODE)  # safetensors creates 0600; a pool is shared read-only data
            _fsync(tmp / file)
            tensors = {k: {"shape": list(v.shape), "dtype": st_dtype(v.dtype)} for k, v in state.items()}
            entries.append({**info.to_json(), "file": file, "tensors": tensors, "sha256": _sha256(tmp / file)})
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "input_size": input_size,
            "in_chans": in_chans,
            "source": source,
            "blocks": entries,
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pool.load(path)


def _fresh_dir(path: Path, kind: str) -> Path:
    """A new empty sibling folder ``<name>.<kind>-XXXXXXXX`` (default permissions, unlike mkdtemp's 0700)."""
    while True:
        candidate = path.with_name(f"{path.name}.{kind}-{secrets.token_hex(4)}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _replace(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename the finished ``tmp`` folder to ``path``; an old pool there is moved aside, then deleted."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not overwrite:
        raise PoolError(f"pool {path} already exists; pass overwrite=True (--overwrite) or choose another path")
    old = _fresh_dir(path, "old")
    os.replace(path, old / "pool")  # a folder or a stray file
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old / "pool", path)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
