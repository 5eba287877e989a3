"""The device catalogue: the shipped profiles are sane, and bad user files are one-line errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from emulator.devices.catalogue import (
    GIB,
    KINDS,
    Catalogue,
    catalogue_text,
    format_table,
    load_catalogue,
)
from emulator.errors import UserError

REQUIRED = [
    "rpi4",
    "rpi5",
    "jetson_nano",
    "jetson_xavier_nx",
    "jetson_agx_orin",
    "phone_low",
    "phone_high",
    "xps15",
    "v100",
]


@pytest.fixture(scope="module")
def builtin() -> Catalogue:
    return load_catalogue()


# --- the shipped catalogue -------------------------------------------------------------------


def test_builtin_has_the_required_devices(builtin: Catalogue) -> None:
    assert builtin.path == "builtin"
    assert set(REQUIRED) <= set(builtin.names())
    assert len(builtin) == len(builtin.names()) == len(set(builtin.names()))
    for i, name in enumerate(builtin.names()):
        assert builtin.index(name) == i
        assert builtin[i].name == name
        assert name in builtin


def test_every_device_names_its_sources(builtin: Catalogue) -> None:
    for dev in builtin.devices:
        assert dev.source.strip(), dev.name
        assert "http" in dev.source or "et al." in dev.source, dev.name
        assert dev.label.strip() and dev.kind in KINDS


def test_builtin_values_are_physical(builtin: Catalogue) -> None:
    for dev in builtin.devices:
        assert 0 < dev.availability <= 1
        assert dev.memory_bytes > 0 and dev.uplink_bps > 0 and dev.downlink_bps > 0
        assert dev.idle_power_w > 0 and dev.radio_power_w >= 0
        assert 1 <= len(dev.dvfs) <= 5
        # Computing costs more than idling.
        assert dev.min_level.power_w > dev.idle_power_w, dev.name


def test_dvfs_ascending_power_and_flops_increase(builtin: Catalogue) -> None:
    for dev in builtin.devices:
        freq = [lv.freq_mhz for lv in dev.dvfs]
        assert freq == sorted(freq) and len(set(freq)) == len(freq), dev.name
        power = [lv.power_w for lv in dev.dvfs]
        flops = [lv.flops for lv in dev.dvfs]
        assert all(b > a for a, b in itertools.pairwise(power)), dev.name
        assert all(b > a for a, b in itertools.pairwise(flops)), dev.name
        assert dev.max_level is dev.dvfs[-1] and dev.peak_flops == dev.dvfs[-1].flops


def test_devices_with_dvfs_have_several_levels(builtin: Catalogue) -> None:
    for name in REQUIRED:
        assert 3 <= len(builtin.get(name).dvfs) <= 5, name


def test_throughput_ordering_is_sane(builtin: Catalogue) -> None:
    peak = {d.name: d.peak_flops for d in builtin.devices}
    assert peak["v100"] > peak["jetson_agx_orin"] > peak["jetson_xavier_nx"] > peak["jetson_nano"]
    assert peak["rpi5"] > peak["rpi4"]
    assert peak["phone_high"] > peak["phone_low"]
    # Effective, not peak: the V100 stays below its 15.7 TFLOP/s data-sheet peak.
    assert 1e12 < peak["v100"] < 15.7e12


def test_as_arrays_shapes_and_nan_padding(builtin: Catalogue) -> None:
    a = builtin.as_arrays()
    d = len(builtin)
    levels = max(len(dev.dvfs) for dev in builtin.devices)
    for key in ("memory_bytes", "idle_power_w", "uplink_bps", "downlink_bps", "radio_power_w", "availability"):
        assert a[key].shape == (d,), key
    assert a["memory_bytes"].dtype == np.int64 and a["availability"].dtype == np.float64
    assert a["num_levels"].shape == (d,) and np.issubdtype(a["num_levels"].dtype, np.integer)
    for key in ("freq_mhz", "flops", "power_w"):
        assert a[key].shape == (d, levels) and a[key].dtype == np.float64
    padded = 0
    for i, dev in enumerate(builtin.devices):
        n = len(dev.dvfs)
        assert a["num_levels"][i] == n
        np.testing.assert_array_equal(a["flops"][i, :n], [lv.flops for lv in dev.dvfs])
        np.testing.assert_array_equal(a["power_w"][i, :n], [lv.power_w for lv in dev.dvfs])
        np.testing.assert_array_equal(a["freq_mhz"][i, :n], [lv.freq_mhz for lv in dev.dvfs])
        assert np.isnan(a["flops"][i, n:]).all() and np.isnan(a["power_w"][i, n:]).all()
        padded += levels - n
        assert a["memory_bytes"][i] == dev.memory_bytes
        assert a["uplink_bps"][i] == dev.uplink_bps
    assert padded > 0  # the builtin mixes 3- and 4-level devices, so padding is exercised
    with pytest.raises(ValueError):
        a["flops"][0, 0] = 1.0  # read-only: shared by every caller


def test_unknown_device_did_you_mean(builtin: Catalogue) -> None:
    with pytest.raises(UserError, match="did you mean 'rpi4'"):
        builtin.index("rpi44")


def test_format_table_one_line_per_device(builtin: Catalogue) -> None:
    text = format_table(builtin)
    lines = text.splitlines()
    assert len(lines) == len(builtin) + 1
    assert "GFLOP/s" in lines[0] and "MHz" in lines[0]
    for line, dev in zip(lines[1:], builtin.devices, strict=True):
        assert line.split()[0] == dev.name
    assert "9400/9400" in text  # the V100's 10 GbE, up/down Mbit/s


def test_catalogue_text_round_trips(builtin: Catalogue, tmp_path: Path) -> None:
    path = tmp_path / "dump.toml"
    path.write_text(catalogue_text(builtin))
    again = load_catalogue(path)
    assert again.names() == builtin.names()
    for a, b in zip(again.devices, builtin.devices, strict=True):
        assert a.memory_bytes == b.memory_bytes and a.source == b.source and a.label == b.label
        assert a.availability == b.availability
        for la, lb in zip(a.dvfs, b.dvfs, strict=True):
            assert la.freq_mhz == lb.freq_mhz and la.power_w == lb.power_w
            assert la.flops == pytest.approx(lb.flops, rel=1e-12)
        assert a.uplink_bps == pytest.approx(b.uplink_bps, rel=1e-12)


# --- user catalogues -------------------------------------------------------------------------


def device_row(device: str, /, **override: str) -> str:
    """A valid [[device]] row as TOML text; override a column with raw TOML, or drop it with ''."""
    cols = {
        "name": f'"{device}"',
        "label": f'"Test board {device}"',
        "kind": '"sbc"',
        "memory_gb": "2.5",
        "idle_power_w": "1.0",
        "uplink_mbps": "10",
        "downlink_mbps": "50",
        "radio_power_w": "0.4",
        "availability": "0.75",
        "source": '"made up for a test"',
        "dvfs": "[{ freq_mhz = 600, gflops = 2.0, power_w = 2.0 }, { freq_mhz = 1200, gflops = 4.0, power_w = 4.0 }]",
    }
    for key, value in override.items():
        if value == "":
            cols.pop(key)
        else:
            cols[key] = value
    return "[[device]]\n" + "".join(f"{k} = {v}\n" for k, v in cols.items())


def write(tmp_path: Path, text: str, name: str = "devices.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_user_file(tmp_path: Path) -> None:
    path = write(tmp_path, device_row("board_a") + "\n" + device_row("board_b", kind='"jetson"'))
    cat = load_catalogue(str(path))
    assert cat.names() == ["board_a", "board_b"]
    dev = cat.get("board_b")
    assert dev.kind == "jetson"
    assert dev.memory_bytes == round(2.5 * GIB)
    assert dev.uplink_bps == 10e6 and dev.downlink_bps == 50e6
    assert [lv.flops for lv in dev.dvfs] == [2.0e9, 4.0e9]
    assert cat.path == str(path)


def test_extra_files_append_devices(tmp_path: Path) -> None:
    extra = write(tmp_path, device_row("board_a"), "extra.toml")
    more = write(tmp_path, device_row("board_b"), "more.toml")
    base = load_catalogue()
    cat = load_catalogue("builtin", extra=[str(extra), more])
    assert cat.names() == [*base.names(), "board_a", "board_b"]
    assert cat.index("board_a") == len(base)
    assert "builtin" in cat.path and "extra.toml" in cat.path and "more.toml" in cat.path
    # A user file can also replace the builtin entirely.
    assert load_catalogue(extra).names() == ["board_a"]


def test_duplicate_across_files_names_both(tmp_path: Path) -> None:
    extra = write(tmp_path, device_row("board_a") + device_row("rpi4"), "mine.toml")
    with pytest.raises(UserError) as err:
        load_catalogue("builtin", extra=[extra])
    msg = str(err.value)
    assert "mine.toml" in msg and "builtin" in msg and "'rpi4'" in msg and "#2" in msg
    assert "\n" not in msg


def test_duplicate_within_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, device_row("board_a") + device_row("board_a"))
    with pytest.raises(UserError, match=r"devices\.toml: device #2 \('board_a'\) is already defined as device #1"):
        load_catalogue(path)


# (override of the 2nd row, column named in the message, words the message must contain)
BAD_ROWS = [
    ({"memory_gb": "-1"}, "memory_gb", "= -1: must be > 0"),
    ({"memory_gb": "0"}, "memory_gb", "must be > 0"),
    ({"memroy_gb": "2.0"}, "memroy_gb", "unknown column; did you mean 'memory_gb'"),
    ({"idle_power_w": ""}, "idle_power_w", "missing"),
    ({"memory_gb": '"big"'}, "memory_gb", "must be a number"),
    ({"availability": "true"}, "availability", "must be a number"),
    ({"label": "3"}, "label", "must be a string"),
    ({"kind": '"tablet"'}, "kind", "must be one of"),
    ({"availability": "1.5"}, "availability", "must be in (0, 1]"),
    ({"availability": "0"}, "availability", "must be in (0, 1]"),
    ({"uplink_mbps": "nan"}, "uplink_mbps", "finite"),
    ({"radio_power_w": "-0.1"}, "radio_power_w", "must be >= 0"),
    ({"source": '"  "'}, "source", "must not be empty"),
    ({"name": '"my board"'}, "name", "no spaces"),
    (
        {"dvfs": "[{ freq_mhz = 1200, gflops = 4.0, power_w = 4.0 }, { freq_mhz = 600, gflops = 2.0, power_w = 2.0 }]"},
        "dvfs[2].freq_mhz",
        "ascending",
    ),
    ({"dvfs": "[{ freq_mhz = 600, gflops = -2.0, power_w = 2.0 }]"}, "dvfs[1].gflops", "must be > 0"),
    ({"dvfs": "[{ freq_mhz = 600, gflop = 2.0, power_w = 2.0 }]"}, "dvfs[1].gflop", "did you mean 'gflops'"),
    ({"dvfs": "[{ freq_mhz = 600, gflops = 2.0 }]"}, "dvfs[1].power_w", "missing"),
    ({"dvfs": "[]"}, "dvfs", "at least one level"),
    ({"dvfs": "5"}, "dvfs", "array of tables"),
]


@pytest.mark.parametrize(("override", "column", "words"), BAD_ROWS, ids=[c for _, c, _ in BAD_ROWS])
def test_bad_row_is_one_line_naming_file_row_column(
    tmp_path: Path, override: dict[str, str], column: str, words: str
) -> None:
    path = write(tmp_path, device_row("board_a") + "\n" + device_row("board_b", **override))
    with pytest.raises(UserError) as err:
        load_catalogue(str(path))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: device #2")
    assert "devices.toml" in msg
    assert f"column '{column}'" in msg
    assert words in msg
    if column != "name":
        assert "('board_b')" in msg


def test_row_without_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, device_row("board_a", name=""))
    with pytest.raises(UserError, match=r"devices\.toml: device #1 column 'name': missing"):
        load_catalogue(path)


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, device_row("board_a") + "memory_gb = = 3\n")
    with pytest.raises(UserError) as err:
        load_catalogue(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: invalid TOML") and "line" in msg and "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.toml: catalogue file not found"):
        load_catalogue(tmp_path / "nope.toml")
    with pytest.raises(UserError, match=r"gone\.toml: catalogue file not found"):
        load_catalogue("builtin", extra=[tmp_path / "gone.toml"])


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "no devices"),
        ("device = 3\n", "no devices"),
        ('title = "x"\n' + device_row("board_a"), "unknown top-level key 'title'"),
    ],
)
def test_malformed_file_structure(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_catalogue(path)
    assert words in str(err.value) and "devices.toml" in str(err.value)
