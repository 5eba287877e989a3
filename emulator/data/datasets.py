"""Datasets as plain uint8 arrays, loaded from local files only (never downloaded).

Every dataset is returned as one :class:`ArrayDataset` (uint8 ``[N, C, H, W]`` images
and int64 labels) so a node can copy it into MPI shared memory as flat buffers and
ranks can read client shards by index. Factories register under a name in
:data:`DATASETS`; :func:`load_dataset` calls one with a fixed set of keyword
arguments. Anything a user can get wrong (missing folder, corrupt file) is a
one-line :class:`~emulator.errors.UserError` naming the path and the fix.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from emulator.errors import UserError
from emulator.registry import Registry

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "check_dataset",
    "load_dataset",
    "register_dataset",
    "resize_images",
]

# Images per batch when resizing or computing statistics: bounds temporary memory
# (a float32 batch of 2048 CIFAR images is 25 MB) while keeping numpy/torch calls large.
_BATCH = 2048
_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset in memory: uint8 images ``[N, C, H, W]`` and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


DATASETS: Registry[ArrayDataset] = Registry("dataset")
# Cheap existence checks, keyed like DATASETS; datasets without one always pass.
_CHECKS: dict[str, Callable[[Path], None]] = {}


def register_dataset(
    name: str,
) -> Callable[[Callable[..., ArrayDataset]], Callable[..., ArrayDataset]]:
    """Decorator registering a dataset factory under ``name``.

    The factory is called with keyword arguments ``root, image_size, seed,
    num_classes, num_samples, channels, test_fraction`` and returns an ArrayDataset.
    """
    return DATASETS.register(name)


def _register_check(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def decorator(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        _CHECKS[name] = fn
        return fn

    return decorator


def load_dataset(
    name: str,
    *,
    root: Path,
    image_size: int,
    seed: int,
    num_classes: int,
    num_samples: int,
    channels: int,
    test_fraction: float,
) -> ArrayDataset:
    """Load dataset ``name`` from ``root`` (local files only), resized to ``image_size``.

    ``image_size`` 0 keeps the native size. ``num_classes``, ``num_samples`` and
    ``channels`` only matter to generated datasets; ``test_fraction`` only to datasets
    without a fixed test split. Deterministic given ``seed``.
    """
    factory = DATASETS.get(name)
    if int(image_size) < 0:
        raise UserError(f"dataset {name!r}: data.image_size = {image_size}: must be >= 0")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise UserError(f"dataset {name!r}: data.test_fraction = {test_fraction}: must be in [0, 1)")
    ds = factory(
        root=Path(root).expanduser(),
        image_size=int(image_size),
        seed=int(seed),
        num_classes=int(num_classes),
        num_samples=int(num_samples),
        channels=int(channels),
        test_fraction=float(test_fraction),
    )
    if ds.num_train == 0:
        raise UserError(f"dataset {name!r}: the training split is empty")
    return ds


def check_dataset(name: str, *, root: Path) -> None:
    """Raise a UserError if ``name`` is unknown or its expected files are missing.

    Cheap (existence only, nothing is read), so rank 0 can fail fast before a job
    spends time starting workers.
    """
    DATASETS.get(name)
    check = _CHECKS.get(name)
    if check is not None:
        check(Path(root).expanduser())


# --------------------------------------------------------------------------- helpers


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``[N, C, H, W]`` images to ``size`` x ``size`` (bilinear, antialiased).

    Works in batches so a CIFAR-sized array never exists as float all at once.
    ``size`` 0 or the current size returns ``x`` unchanged.
    """
    if size == 0 or (x.shape[2] == size and x.shape[3] == size):
        return np.ascontiguousarray(x)
    import torch  # lazy: only resizing needs torch
    from torch.nn.functional import interpolate

    out = np.empty((x.shape[0], x.shape[1], size, size), dtype=np.uint8)
    for start in range(0, x.shape[0], _BATCH):
        batch = torch.from_numpy(np.array(x[start : start + _BATCH], dtype=np.float32))
        res = interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _BATCH] = res.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of ``x / 255`` from 256-bin histograms (no float copy)."""
    channels = x.shape[1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, x.shape[0], _BATCH):
        chunk = x[start : start + _BATCH]
        for c in range(channels):
            hist[c] += np.bincount(chunk[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum(axis=1).astype(np.float64)
    total[total == 0] = 1.0
    mean = hist @ values / total
    var = hist @ (values**2) / total - mean**2
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), _STD_FLOOR)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _make(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    image_size: int,
) -> ArrayDataset:
    x_train = resize_images(x_train, image_size)
    x_test = resize_images(x_test, image_size)
    mean, std = _channel_stats(x_train)
    return ArrayDataset(
        name=name,
        x_train=x_train,
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=x_test,
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        num_classes=int(num_classes),
        mean=mean,
        std=std,
    )


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: round(count_c * test_fraction) of each class go to test."""
    n = labels.shape[0]
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, shuffled within
    sorted_labels = labels[order]
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    n_test = np.rint(counts * test_fraction).astype(np.int64)
    cls_pos = np.searchsorted(classes, sorted_labels)
    rank = np.arange(n) - starts[cls_pos]
    is_test = rank < n_test[cls_pos]
    return np.sort(order[~is_test]), np.sort(order[is_test])


def _check_labels(name: str, path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"dataset {name!r}: {path} has labels outside 0..{num_classes - 1}; "
            "the file is corrupt or not this dataset"
        )


# --------------------------------------------------------------------------- synthetic

_GRID = 4  # low-frequency grid per prototype: smooth images, learnable by a small CNN
_NUISANCE = 0.3  # per-sample nuisance scale relative to class separation (sets difficulty)
_CONTRAST = 48.0  # pixel std of the smooth part, in 0..255 units


def _interp_matrix(out_size: int, grid: int) -> np.ndarray:
    """Bilinear upsampling as a matrix ``[out_size, grid]`` (apply on both axes)."""
    if out_size == 1:
        t = np.array([(grid - 1) / 2.0])
    else:
        t = np.linspace(0.0, grid - 1.0, out_size)
    i0 = np.minimum(np.floor(t).astype(np.int64), grid - 2)
    frac = t - i0
    a = np.zeros((out_size, grid), dtype=np.float32)
    rows = np.arange(out_size)
    a[rows, i0] = 1.0 - frac
    a[rows, i0 + 1] = frac
    return a


@register_dataset("synthetic")
def _synthetic(
    *,
    root: Path,
    image_size: int,
    seed: int,
    num_classes: int,
    num_samples: int,
    channels: int,
    test_fraction: float,
) -> ArrayDataset:
    """Class-conditional smooth images: prototype (shifted) + smooth nuisance + pixel noise.

    The nuisance field lives in the same low-frequency space as the prototypes, so
    classes overlap a little (not trivially 100% accurate) whatever the image size.
    """
    del root
    if num_classes < 1:
        raise UserError(f"dataset 'synthetic': data.num_classes = {num_classes}: must be >= 1")
    if channels < 1:
        raise UserError(f"dataset 'synthetic': data.channels = {channels}: must be >= 1")
    if num_samples < 1:
        raise UserError(f"dataset 'synthetic': data.num_samples = {num_samples}: must be >= 1")
    size = image_size or 32
    shift = max(1, round(size / 16))
    # Separate streams: prototypes depend only on (seed, classes, channels), so more
    # samples or another image size keep the same classes.
    rng_proto = np.random.default_rng([seed, 0])
    rng_data = np.random.default_rng([seed, 1])
    rng_split = np.random.default_rng([seed, 2])
    grids = rng_proto.standard_normal((num_classes, channels, _GRID, _GRID), dtype=np.float32)
    # Render on a padded canvas, then crop at a random offset: a shift of up to
    # `shift` pixels each way.
    a_pad = _interp_matrix(size + 2 * shift, _GRID)

    # Nuisance grows with the grid dimension so the class overlap (Bayes error) is
    # similar for 1 and 3 channels; gain keeps the smooth part near _CONTRAST pixel std.
    ratio = np.float32(_NUISANCE * np.sqrt(_GRID * _GRID * channels))
    gain = np.float32(_CONTRAST / np.sqrt(1.0 + float(ratio) ** 2))

    labels = rng_data.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    offsets = rng_data.integers(0, 2 * shift + 1, size=(num_samples, 2))
    x = np.empty((num_samples, channels, size, size), dtype=np.uint8)
    chans = np.arange(channels)[None, :]
    for start in range(0, num_samples, _BATCH):
        stop = min(start + _BATCH, num_samples)
        n = stop - start
        grid = rng_data.standard_normal((n, channels, _GRID, _GRID), dtype=np.float32)
        grid *= ratio
        grid += grids[labels[start:stop]]
        grid *= gain
        canvas = a_pad @ grid @ a_pad.T  # [n, C, S + 2*shift, S + 2*shift]
        windows = sliding_window_view(canvas, (size, size), axis=(2, 3))
        off = offsets[start:stop]
        field = windows[np.arange(n)[:, None], chans, off[:, 0:1], off[:, 1:2]]  # [n, C, S, S]
        # Pixel noise: 2*(sum of two uniform 0..15 nibbles), triangular, std ~9, mean 30.
        # Random bytes cost a fraction of float normals, which dominated generation time.
        nibbles = np.frombuffer(rng_data.bytes(field.size), dtype=np.uint8).reshape(field.shape)
        noise = nibbles & np.uint8(15)
        noise += nibbles >> 4
        noise <<= 1
        field += noise
        field += np.float32(128.5 - 30.0)  # +0.5 so the uint8 cast below rounds
        np.clip(field, 0.0, 255.9, out=field)
        x[start:stop] = field

    train_idx, test_idx = _stratified_split(labels, test_fraction, rng_split)
    # The images are generated at the target size already: no resize in _make.
    return _make(
        "synthetic",
        x[train_idx],
        labels[train_idx],
        x[test_idx],
        labels[test_idx],
        num_classes,
        0,
    )


# --------------------------------------------------------------------------- digits


@register_dataset("digits")
def _digits(
    *,
    root: Path,
    image_size: int,
    seed: int,
    num_classes: int,
    num_samples: int,
    channels: int,
    test_fraction: float,
) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, shipped with the package)."""
    del root, num_classes, num_samples, channels
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    x = np.clip(images, 0, 255).astype(np.uint8)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    return _make("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, image_size)


# --------------------------------------------------------------------------- CIFAR

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR100_DIR = "cifar-100-python"


def _cifar_files(name: str, root: Path) -> tuple[list[Path], list[Path], str]:
    if name == "cifar10":
        base = root / _CIFAR10_DIR
        return [base / f for f in _CIFAR10_TRAIN], [base / "test_batch"], "CIFAR-10 python version"
    base = root / _CIFAR100_DIR
    return [base / "train"], [base / "test"], "CIFAR-100 python version"


def _check_cifar(name: str, root: Path) -> None:
    train, test, what = _cifar_files(name, root)
    for path in [*train, *test]:
        if not path.is_file():
            raise UserError(
                f"dataset {name!r}: expected {path} ({what}); "
                f"put the extracted archive under data.root = '{root}'"
            )


def _read_cifar_batch(
    name: str, path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise UserError(
            f"dataset {name!r}: cannot read {path} as a CIFAR python batch "
            f"({type(exc).__name__}); re-extract the archive"
        ) from None
    if not isinstance(batch, dict):
        raise UserError(f"dataset {name!r}: {path} is not a CIFAR python batch (not a dict)")
    # Batches re-pickled under Python 3 may have str keys instead of bytes.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key.encode(), batch.get(label_key))
    if data is None or labels is None:
        raise UserError(
            f"dataset {name!r}: {path} lacks the 'data' or {label_key!r} entry; "
            "is it the right CIFAR version?"
        )
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(
            f"dataset {name!r}: {path} has data of shape {data.shape} and dtype {data.dtype}; "
            "expected [N, 3072] uint8"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise UserError(
            f"dataset {name!r}: {path} has {labels.shape[0] if labels.ndim else 0} labels "
            f"for {data.shape[0]} images"
        )
    labels = labels.astype(np.int64)
    _check_labels(name, path, labels, num_classes)
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, root: Path, image_size: int) -> ArrayDataset:
    _check_cifar(name, root)
    train, test, _ = _cifar_files(name, root)
    label_key, num_classes = ("labels", 10) if name == "cifar10" else ("fine_labels", 100)
    parts = [_read_cifar_batch(name, p, label_key, num_classes) for p in train]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    del parts
    x_test, y_test = _read_cifar_batch(name, test[0], label_key, num_classes)
    return _make(name, x_train, y_train, x_test, y_test, num_classes, image_size)


@register_dataset("cifar10")
def _cifar10(*, root: Path, image_size: int, **_: object) -> ArrayDataset:
    return _load_cifar("cifar10", root, image_size)


@register_dataset("cifar100")
def _cifar100(*, root: Path, image_size: int, **_: object) -> ArrayDataset:
    return _load_cifar("cifar100", root, image_size)


_register_check("cifar10")(lambda root: _check_cifar("cifar10", root))
_register_check("cifar100")(lambda root: _check_cifar("cifar100", root))


# --------------------------------------------------------------------------- MNIST (idx)

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _idx_dirs(name: str, root: Path) -> list[Path]:
    # torchvision's layout first, then the files placed directly under root.
    return [root / _MNIST_DIRS[name] / "raw", root]


def _find_idx(name: str, root: Path, stem: str) -> Path:
    dirs = _idx_dirs(name, root)
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    where = " or ".join(str(d / stem) + "[.gz]" for d in dirs)
    raise UserError(
        f"dataset {name!r}: expected {where} (idx files); put the four idx files under data.root = '{root}'"
    )


def _check_mnist(name: str, root: Path) -> None:
    for stem in _IDX_FILES:
        _find_idx(name, root, stem)


def _read_idx(name: str, path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (big-endian header: 0, 0, dtype code, ndim, then ndim uint32)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise UserError(f"dataset {name!r}: cannot read {path} ({exc}); re-extract it") from None
    bad = f"dataset {name!r}: {path} is not a valid idx file"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{bad} (bad magic number)")
    if raw[2] != 0x08:
        raise UserError(f"{bad} (element type 0x{raw[2]:02x}; expected unsigned byte 0x08)")
    if raw[3] != ndim:
        raise UserError(f"{bad} ({raw[3]} dimensions; expected {ndim})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{bad} (truncated header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise UserError(
            f"{bad} (header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"file has {len(raw) - header})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_pair(name: str, root: Path, images: str, labels: str) -> tuple[np.ndarray, ...]:
    img_path = _find_idx(name, root, images)
    lab_path = _find_idx(name, root, labels)
    x = _read_idx(name, img_path, 3)
    y = _read_idx(name, lab_path, 1).astype(np.int64)
    if x.shape[0] != y.shape[0]:
        raise UserError(
            f"dataset {name!r}: {img_path} has {x.shape[0]} images but {lab_path} has {y.shape[0]} labels"
        )
    _check_labels(name, lab_path, y, 10)
    # Copy: the parsed view is read-only and would pin the raw file bytes.
    return x[:, None, :, :].copy(), y


def _load_mnist(name: str, root: Path, image_size: int) -> ArrayDataset:
    _check_mnist(name, root)
    x_train, y_train = _load_idx_pair(name, root, _IDX_FILES[0], _IDX_FILES[1])
    x_test, y_test = _load_idx_pair(name, root, _IDX_FILES[2], _IDX_FILES[3])
    return _make(name, x_train, y_train, x_test, y_test, 10, image_size)


@register_dataset("mnist")
def _mnist(*, root: Path, image_size: int, **_: object) -> ArrayDataset:
    return _load_mnist("mnist", root, image_size)


@register_dataset("fashion-mnist")
def _fashion_mnist(*, root: Path, image_size: int, **_: object) -> ArrayDataset:
    return _load_mnist("fashion-mnist", root, image_size)


_register_check("mnist")(lambda root: _check_mnist("mnist", root))
_register_check("fashion-mnist")(lambda root: _check_mnist("fashion-mnist", root))


# --------------------------------------------------------------------------- imagefolder

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_imagefolder(root: Path) -> None:
    for split in ("train", "test"):
        path = root / split
        if not path.is_dir():
            raise UserError(
                f"dataset 'imagefolder': expected {path}/<class>/*.png|jpg|jpeg|bmp; "
                f"put train/ and test/ folders under data.root = '{root}'"
            )
    if not _subdirs(root / "train"):
        raise UserError(
            f"dataset 'imagefolder': {root / 'train'} has no class subfolders; "
            "expected train/<class>/<image files>"
        )


def _list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        if not folder.is_dir():
            continue
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        files.extend(found)
        labels.extend([label] * len(found))
    return files, np.asarray(labels, dtype=np.int64)


def _read_images(files: list[Path], size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UserError(
                f"dataset 'imagefolder': cannot read image {path} ({type(exc).__name__}); "
                "remove or replace the file"
            ) from None
    return out


@register_dataset("imagefolder")
def _imagefolder(*, root: Path, image_size: int, **_: object) -> ArrayDataset:
    """``root/{train,test}/<class>/*.png|jpg|jpeg|bmp``, classes = sorted train subfolders."""
    _check_imagefolder(root)
    if image_size <= 0:
        raise UserError(
            "dataset 'imagefolder': images may differ in size; set data.image_size "
            "to a positive size (e.g. 32)"
        )
    classes = _subdirs(root / "train")
    extra = sorted(set(_subdirs(root / "test")) - set(classes))
    if extra:
        raise UserError(
            f"dataset 'imagefolder': {root / 'test'} has class folders {extra} that are not "
            f"in {root / 'train'}; test must use the training classes"
        )
    split_data = []
    for split in ("train", "test"):
        files, labels = _list_images(root / split, classes)
        if not files:
            raise UserError(
                f"dataset 'imagefolder': no .png/.jpg/.jpeg/.bmp images under {root / split}/<class>/"
            )
        split_data.append((_read_images(files, image_size), labels))
    (x_train, y_train), (x_test, y_test) = split_data
    return _make("imagefolder", x_train, y_train, x_test, y_test, len(classes), 0)


_register_check("imagefolder")(_check_imagefolder)
