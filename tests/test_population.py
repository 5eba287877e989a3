"""Populations: exact mix proportions, seeded placement, mean-1 jitter, one-line errors, scale."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from emulator.devices.catalogue import Catalogue, load_catalogue
from emulator.devices.population import (
    MIXES,
    Population,
    largest_remainder,
    make_population,
    parse_mix,
    register_mix,
)
from emulator.errors import UserError

RAFFM = {
    "xsmall": {"rpi4": 0.8, "rpi5": 0.2},
    "small": {"rpi4": 0.4, "rpi5": 0.4, "xps15": 0.2},
    "medium": {"rpi5": 0.3, "xps15": 0.4, "jetson_agx_orin": 0.3},
    "large": {"xps15": 0.2, "jetson_agx_orin": 0.4, "v100": 0.4},
    "xlarge": {"jetson_agx_orin": 0.1, "v100": 0.9},
}


@pytest.fixture(scope="module")
def cat() -> Catalogue:
    return load_catalogue()


def population(cat: Catalogue, n: int, mix: str = "xsmall", seed: int = 0, jitter: float = 0.0) -> Population:
    return make_population(n, mix=parse_mix(mix, cat), catalogue=cat, rng=np.random.default_rng(seed), jitter=jitter)


def names_of(cat: Catalogue, pop: Population) -> dict[str, int]:
    counts = pop.counts(len(cat))
    return {cat[i].name: int(c) for i, c in enumerate(counts) if c}


# --- mixes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RAFFM))
def test_raffm_mixes_exact(cat: Catalogue, name: str) -> None:
    assert name in MIXES
    mix = parse_mix(name, cat)
    assert list(mix) == list(RAFFM[name])
    for device, weight in RAFFM[name].items():
        assert mix[device] == pytest.approx(weight, abs=1e-12)


def test_uniform_covers_the_catalogue(cat: Catalogue) -> None:
    mix = parse_mix("uniform", cat)
    assert list(mix) == cat.names()
    assert all(w == pytest.approx(1 / len(cat)) for w in mix.values())


def test_homogeneous_and_inline(cat: Catalogue) -> None:
    assert parse_mix("homogeneous:v100", cat) == {"v100": 1.0}
    assert parse_mix(" rpi4 : 1 , v100 : 3 ", cat) == {"rpi4": 0.25, "v100": 0.75}
    assert parse_mix("rpi4:0.5,v100:0.5", cat) == {"rpi4": 0.5, "v100": 0.5}
    pop = population(cat, 10, "homogeneous:jetson_nano")
    assert names_of(cat, pop) == {"jetson_nano": 10}


def test_register_mix(cat: Catalogue) -> None:
    register_mix("test_edge_mix", {"rpi4": 1, "jetson_nano": 3})
    assert parse_mix("test_edge_mix", cat) == {"rpi4": 0.25, "jetson_nano": 0.75}
    with pytest.raises(ValueError, match="twice"):
        register_mix("test_edge_mix", {"rpi4": 1})


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("xsmal", "did you mean 'xsmall'"),
        ("rpi44:1,v100:1", "did you mean 'rpi4'"),
        ("homogeneous:v10", "did you mean 'v100'"),
        ("rpi4", "did you mean 'homogeneous:rpi4'"),
        ("rpi4:0,v100:1", "must be a finite number > 0"),
        ("rpi4:-1", "must be a finite number > 0"),
        ("rpi4:inf", "must be a finite number > 0"),
        ("rpi4:abc", "must be a number"),
        ("rpi4:1,rpi4:2", "listed twice"),
        ("rpi4:1,,v100:1", "is not 'device:weight'"),
        ("", "empty"),
    ],
)
def test_bad_mix_specs(cat: Catalogue, spec: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        parse_mix(spec, cat)
    msg = str(err.value)
    assert words in msg and "\n" not in msg
    assert msg.startswith("devices.mix")


def test_mix_with_device_missing_from_a_user_catalogue(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_text(
        '[[device]]\nname = "board"\nlabel = "b"\nkind = "sbc"\nmemory_gb = 1\nidle_power_w = 1\n'
        'uplink_mbps = 1\ndownlink_mbps = 1\nradio_power_w = 0\navailability = 1\nsource = "test"\n'
        "dvfs = [{ freq_mhz = 1, gflops = 1, power_w = 2 }]\n"
    )
    small = load_catalogue(own)
    with pytest.raises(UserError, match="'rpi4': not in device catalogue"):
        parse_mix("xsmall", small)
    assert parse_mix("uniform", small) == {"board": 1.0}


# --- assignment --------------------------------------------------------------------------------


def test_xsmall_100_is_exactly_80_20(cat: Catalogue) -> None:
    pop = population(cat, 100, "xsmall")
    assert names_of(cat, pop) == {"rpi4": 80, "rpi5": 20}
    assert pop.device.dtype == np.int16 and pop.device.shape == (100,)


@pytest.mark.parametrize("name", sorted(RAFFM))
@pytest.mark.parametrize("n", [1, 7, 10, 99, 1000])
def test_counts_follow_weights_within_one(cat: Catalogue, name: str, n: int) -> None:
    counts = names_of(cat, population(cat, n, name))
    assert sum(counts.values()) == n
    for device, weight in RAFFM[name].items():
        assert abs(counts.get(device, 0) - weight * n) < 1


def test_largest_remainder() -> None:
    np.testing.assert_array_equal(largest_remainder(10, np.array([1.0, 1.0, 1.0])), [4, 3, 3])
    np.testing.assert_array_equal(largest_remainder(3, np.array([0.6, 0.3, 0.1])), [2, 1, 0])
    np.testing.assert_array_equal(largest_remainder(2, np.array([1.0, 1.0, 1.0])), [1, 1, 0])  # ties: earlier first
    np.testing.assert_array_equal(largest_remainder(0, np.array([1.0, 2.0])), [0, 0])
    rng = np.random.default_rng(1)
    for _ in range(200):
        w = rng.random(rng.integers(1, 12)) + 1e-3
        n = int(rng.integers(0, 10_000))
        counts = largest_remainder(n, w)
        assert counts.sum() == n
        assert np.all(np.abs(counts - n * w / w.sum()) < 1)
    with pytest.raises(ValueError):
        largest_remainder(5, np.array([1.0, 0.0]))


def test_deterministic_per_seed_and_seeds_differ(cat: Catalogue) -> None:
    a = population(cat, 1000, "medium", seed=3, jitter=0.2)
    b = population(cat, 1000, "medium", seed=3, jitter=0.2)
    c = population(cat, 1000, "medium", seed=4, jitter=0.2)
    for field in ("device", "speed", "bandwidth"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.device, c.device)  # a different permutation...
    np.testing.assert_array_equal(a.counts(len(cat)), c.counts(len(cat)))  # ...of the same labels
    assert not np.array_equal(a.speed, c.speed)


def test_jitter_does_not_move_devices(cat: Catalogue) -> None:
    still = population(cat, 500, "large", seed=9, jitter=0.0)
    jittered = population(cat, 500, "large", seed=9, jitter=0.3)
    np.testing.assert_array_equal(still.device, jittered.device)


def test_jitter_zero_is_exactly_one(cat: Catalogue) -> None:
    pop = population(cat, 1000, "uniform", jitter=0.0)
    assert pop.speed.dtype == np.float32 and pop.bandwidth.dtype == np.float32
    assert np.all(pop.speed == 1.0) and np.all(pop.bandwidth == 1.0)


def test_jitter_mean_one_and_clipped(cat: Catalogue) -> None:
    pop = population(cat, 100_000, "uniform", seed=5, jitter=0.2)
    for arr in (pop.speed, pop.bandwidth):
        assert abs(float(arr.mean(dtype=np.float64)) - 1.0) < 0.02
        assert arr.min() >= 0.5 and arr.max() <= 2.0
        assert 0.17 < float(np.log(arr).std()) < 0.23  # sigma of the lognormal
    assert not np.array_equal(pop.speed, pop.bandwidth)
    wide = population(cat, 100_000, "uniform", seed=5, jitter=1.0)
    assert wide.speed.min() == np.float32(0.5) and wide.speed.max() == np.float32(2.0)  # the clip bites


def test_arrays_are_read_only(cat: Catalogue) -> None:
    pop = population(cat, 10)
    with pytest.raises(ValueError):
        pop.device[0] = 1
    with pytest.raises(ValueError):
        pop.speed[0] = 2.0


def test_bad_arguments(cat: Catalogue) -> None:
    mix = parse_mix("xsmall", cat)
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="must be an integer >= 1"):
        make_population(0, mix=mix, catalogue=cat, rng=rng, jitter=0.1)
    with pytest.raises(UserError, match="jitter"):
        make_population(10, mix=mix, catalogue=cat, rng=rng, jitter=-0.1)
    with pytest.raises(UserError, match="did you mean 'rpi5'"):
        make_population(10, mix={"rpi55": 1.0}, catalogue=cat, rng=rng, jitter=0.1)
    with pytest.raises(UserError, match="> 0"):
        make_population(10, mix={"rpi5": 0.0}, catalogue=cat, rng=rng, jitter=0.1)


def test_100k_clients_small_and_fast(cat: Catalogue) -> None:
    start = time.perf_counter()
    pop = population(cat, 100_000, "xlarge", seed=1, jitter=0.2)
    elapsed = time.perf_counter() - start
    assert len(pop) == pop.num_clients == 100_000
    assert pop.nbytes == 100_000 * (2 + 4 + 4)
    assert pop.nbytes < 2_000_000
    assert names_of(cat, pop) == {"jetson_agx_orin": 10_000, "v100": 90_000}
    assert elapsed < 1.0
