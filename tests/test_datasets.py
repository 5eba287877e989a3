"""Datasets load from tiny local files written by the tests; nothing is downloaded."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from emulator.data import DATASETS, ArrayDataset, check_dataset, load_dataset, resize_images
from emulator.errors import UserError

REAL = ["cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder"]


def load(name: str, root: Path, **overrides: object) -> ArrayDataset:
    kwargs: dict = dict(
        root=root,
        image_size=0,
        seed=0,
        num_classes=10,
        num_samples=500,
        channels=3,
        test_fraction=0.2,
    )
    kwargs.update(overrides)
    return load_dataset(name, **kwargs)


def assert_well_formed(ds: ArrayDataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.uint8 and x.ndim == 4 and x.flags.c_contiguous
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert x.shape[1:] == (ds.in_chans, ds.image_size, ds.image_size)
        if y.size:
            assert 0 <= y.min() and y.max() < ds.num_classes
    assert len(ds.mean) == len(ds.std) == ds.in_chans
    scaled = ds.x_train.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, scaled.mean(axis=(0, 2, 3)), atol=1e-9)
    np.testing.assert_allclose(ds.std, np.maximum(scaled.std(axis=(0, 2, 3)), 1e-3), atol=1e-9)


# --------------------------------------------------------------------------- synthetic


def test_registered_names() -> None:
    assert {"synthetic", "digits", *REAL} <= set(DATASETS.names())


@pytest.mark.parametrize(
    ("image_size", "channels", "num_classes"),
    [(0, 3, 10), (1, 1, 2), (7, 4, 3), (28, 1, 100)],
)
def test_synthetic_shapes_and_determinism(
    tmp_path: Path, image_size: int, channels: int, num_classes: int
) -> None:
    ds = load(
        "synthetic",
        tmp_path,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        num_samples=400,
        test_fraction=0.25,
    )
    assert_well_formed(ds)
    assert ds.image_size == (image_size or 32)
    assert ds.in_chans == channels
    assert ds.num_classes == num_classes
    assert ds.num_train + ds.num_test == 400
    assert ds.num_test == pytest.approx(100, abs=num_classes)  # stratified rounding
    again = load(
        "synthetic",
        tmp_path,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        num_samples=400,
        test_fraction=0.25,
    )
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    other = load(
        "synthetic",
        tmp_path,
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        num_samples=400,
        test_fraction=0.25,
        seed=1,
    )
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_is_balanced_and_class_dependent(tmp_path: Path) -> None:
    ds = load("synthetic", tmp_path, num_samples=2000, num_classes=10, image_size=16)
    assert np.bincount(ds.y_train, minlength=10).tolist() == [160] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [40] * 10
    # Class means differ far more than the noise in a mean of 160 samples would.
    x = ds.x_train.astype(np.float64)
    means = np.stack([x[ds.y_train == k].mean(axis=0) for k in range(10)])
    spread = np.abs(means - means.mean(axis=0)).mean()
    assert spread > 5.0
    # ...but samples within a class vary (not a copy of the prototype).
    assert x[ds.y_train == 0].std(axis=0).mean() > 10.0


def test_synthetic_nearest_mean_is_above_chance_but_not_perfect(tmp_path: Path) -> None:
    ds = load("synthetic", tmp_path, num_samples=3000, num_classes=10, image_size=16)
    x_tr = ds.x_train.reshape(ds.num_train, -1).astype(np.float64)
    x_te = ds.x_test.reshape(ds.num_test, -1).astype(np.float64)
    means = np.stack([x_tr[ds.y_train == k].mean(axis=0) for k in range(10)])
    dist = ((x_te[:, None, :] - means[None]) ** 2).sum(axis=2)
    acc = (dist.argmin(axis=1) == ds.y_test).mean()
    assert 0.4 < acc < 0.99


def test_synthetic_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="channels"):
        load("synthetic", tmp_path, channels=0)
    with pytest.raises(UserError, match="test_fraction"):
        load("synthetic", tmp_path, test_fraction=1.0)
    with pytest.raises(UserError, match="image_size"):
        load("synthetic", tmp_path, image_size=-1)


# --------------------------------------------------------------------------- digits


def test_digits_loads_and_resizes(tmp_path: Path) -> None:
    ds = load("digits", tmp_path, test_fraction=0.25)
    assert_well_formed(ds)
    assert (ds.in_chans, ds.image_size, ds.num_classes) == (1, 8, 10)
    assert ds.num_train + ds.num_test == 1797
    assert abs(ds.num_test - 1797 * 0.25) <= 10
    assert ds.x_train.max() == 255  # 16 scaled to 255
    big = load("digits", tmp_path, test_fraction=0.25, image_size=16)
    assert big.x_train.shape == (ds.num_train, 1, 16, 16)
    np.testing.assert_array_equal(big.y_train, ds.y_train)
    # Same seed: same split; another seed: another split.
    other = load("digits", tmp_path, test_fraction=0.25, seed=3)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_resize_keeps_constant_images_constant() -> None:
    x = np.full((5, 2, 9, 9), 77, dtype=np.uint8)
    out = resize_images(x, 4)
    assert out.shape == (5, 2, 4, 4) and out.dtype == np.uint8
    assert (out == 77).all()
    np.testing.assert_array_equal(resize_images(x, 0), x)  # 0 = native size
    assert resize_images(x, 12).shape == (5, 2, 12, 12)


# --------------------------------------------------------------------------- CIFAR


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = root / "cifar-10-batches-py"
    all_data = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        write_pickle(base / name, {b"data": data, b"labels": labels, b"batch_label": b"x"})
        all_data.append((data, labels))
    return all_data


def test_cifar10_loads(tmp_path: Path) -> None:
    parts = fake_cifar10(tmp_path)
    check_dataset("cifar10", root=tmp_path)
    ds = load("cifar10", tmp_path)
    assert_well_formed(ds)
    assert (ds.num_train, ds.num_test, ds.num_classes, ds.image_size) == (20, 4, 10, 32)
    expected = np.concatenate([d for d, _ in parts[:5]]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train, expected)
    np.testing.assert_array_equal(ds.y_train, np.concatenate([lab for _, lab in parts[:5]]))
    np.testing.assert_array_equal(ds.y_test, parts[5][1])
    small = load("cifar10", tmp_path, image_size=16)
    assert small.x_train.shape == (20, 3, 16, 16)
    assert small.x_test.shape == (4, 3, 16, 16)


def test_cifar100_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-python"
    train = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    write_pickle(base / "train", {"data": train, "fine_labels": [0, 99, 5, 5, 42, 7]})
    write_pickle(
        base / "test",
        {b"data": train[:2], b"fine_labels": [3, 4], b"coarse_labels": [0, 1]},
    )
    ds = load("cifar100", tmp_path)
    assert_well_formed(ds)
    assert ds.num_classes == 100
    assert ds.y_train.tolist() == [0, 99, 5, 5, 42, 7]
    np.testing.assert_array_equal(ds.x_train[1], train[1].reshape(3, 32, 32))


def test_cifar_corruption_is_a_user_error(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(UserError) as err:
        load("cifar10", tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    write_pickle(bad, {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(UserError, match="3072"):
        load("cifar10", tmp_path)
    write_pickle(bad, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]})
    with pytest.raises(UserError, match="labels outside"):
        load("cifar10", tmp_path)


# --------------------------------------------------------------------------- MNIST idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_mnist(folder: Path, gz_train: bool, gz_test: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / name, arr, gz_train if name.startswith("train") else gz_test)
    return arrays


@pytest.mark.parametrize(
    ("name", "subdir", "gz_train", "gz_test"),
    [
        ("mnist", "MNIST/raw", False, True),
        ("mnist", ".", True, False),
        ("fashion-mnist", "FashionMNIST/raw", True, True),
        ("fashion-mnist", ".", False, False),
    ],
)
def test_mnist_idx_loads(tmp_path: Path, name: str, subdir: str, gz_train: bool, gz_test: bool) -> None:
    arrays = fake_mnist(tmp_path / subdir, gz_train, gz_test)
    check_dataset(name, root=tmp_path)
    ds = load(name, tmp_path)
    assert_well_formed(ds)
    assert (ds.num_train, ds.num_test, ds.in_chans, ds.image_size) == (12, 5, 1, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert load(name, tmp_path, image_size=32).x_test.shape == (5, 1, 32, 32)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x08\x03\x00\x00" + b"\x00" * 20, "magic"),
        (b"\x00\x00\x0d\x03" + b"\x00" * 20, "element type"),
        (b"\x00\x00\x08\x01" + b"\x00" * 20, "dimensions"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (struct.pack(">BBBBIII", 0, 0, 8, 3, 12, 28, 28) + b"\x00" * 100, "bytes of data"),
        (gzip.compress(b"\x00\x00\x08\x03")[:-6], "cannot read"),
    ],
)
def test_malformed_idx_is_a_user_error(tmp_path: Path, payload: bytes, match: str) -> None:
    fake_mnist(tmp_path, False, False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(payload)
    with pytest.raises(UserError, match=match) as err:
        load("mnist", tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_idx_count_mismatch_and_constant_images(tmp_path: Path) -> None:
    folder = tmp_path / "MNIST" / "raw"
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8), False)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), False)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(1, np.uint8), False)
    with pytest.raises(UserError, match="2 images but"):
        load("mnist", tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8), False)
    ds = load("mnist", tmp_path)
    assert ds.mean == (0.0,) and ds.std == (1e-3,)  # std floored, never 0


# --------------------------------------------------------------------------- imagefolder


def fake_imagefolder(root: Path) -> dict[str, tuple[int, int, int]]:
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 200, 0)}
    for split, count in (("train", 3), ("test", 1)):
        for i, (cls, colour) in enumerate(colours.items()):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for j in range(count):
                size = (10 + i, 12 + j)  # sizes differ: image_size makes them uniform
                ext = ["png", "bmp", "PNG"][j % 3]
                Image.new("RGB", size, colour).save(folder / f"{j}.{ext}")
            if split == "train":
                Image.new("L", (6, 6), 128).save(folder / "gray.png")  # converted to RGB
                (folder / "notes.txt").write_text("not an image")
    return colours


def test_imagefolder_loads(tmp_path: Path) -> None:
    colours = fake_imagefolder(tmp_path)
    ds = load("imagefolder", tmp_path, image_size=8)
    assert_well_formed(ds)
    assert (ds.num_classes, ds.in_chans, ds.image_size) == (3, 3, 8)
    assert (ds.num_train, ds.num_test) == (12, 3)
    assert np.bincount(ds.y_train).tolist() == [4, 4, 4]
    assert ds.y_test.tolist() == [0, 1, 2]  # sorted class names: cat, dog, emu
    for label, colour in enumerate(colours.values()):
        np.testing.assert_array_equal(
            ds.x_test[label], np.broadcast_to(np.array(colour, np.uint8)[:, None, None], (3, 8, 8))
        )
    assert (ds.x_train[ds.y_train == 0] == 128).all(axis=(1, 2, 3)).sum() == 1  # gray image


def test_imagefolder_errors(tmp_path: Path) -> None:
    fake_imagefolder(tmp_path)
    with pytest.raises(UserError, match=r"data\.image_size"):
        load("imagefolder", tmp_path, image_size=0)
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(UserError, match="zebra"):
        load("imagefolder", tmp_path, image_size=8)
    (tmp_path / "test" / "zebra").rmdir()
    broken = tmp_path / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError) as err:
        load("imagefolder", tmp_path, image_size=8)
    assert str(broken) in str(err.value)


# --------------------------------------------------------------------------- missing data


EXPECTED_PATH = {
    "cifar10": "cifar-10-batches-py/data_batch_1",
    "cifar100": "cifar-100-python/train",
    "mnist": "MNIST/raw/train-images-idx3-ubyte",
    "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte",
    "imagefolder": "train",
}


@pytest.mark.parametrize("name", REAL)
def test_missing_data_is_a_one_line_user_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(UserError) as loaded:
        load(name, root, image_size=8)
    message = str(loaded.value)
    assert str(root / EXPECTED_PATH[name]) in message
    assert f"dataset {name!r}" in message and "data.root" in message
    assert "\n" not in message
    with pytest.raises(UserError) as checked:
        check_dataset(name, root=root)
    assert str(checked.value) == message


def test_check_dataset_passes_when_present(tmp_path: Path) -> None:
    check_dataset("synthetic", root=tmp_path / "absent")
    check_dataset("digits", root=tmp_path / "absent")
    fake_cifar10(tmp_path)
    check_dataset("cifar10", root=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="test_batch"):
        check_dataset("cifar10", root=tmp_path)


def test_unknown_dataset_suggests_a_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean") as err:
        load("cifar-10", tmp_path)
    assert "'cifar10'" in str(err.value)
    with pytest.raises(UserError, match="did you mean"):
        check_dataset("minst", root=tmp_path)
