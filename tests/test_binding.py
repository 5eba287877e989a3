"""CUDA_VISIBLE_DEVICES parsing, device choice per node-local rank, GPU identity."""

from __future__ import annotations

import pytest
import torch

from emulator.devices import binding
from emulator.devices.binding import choose_device, gpu_identity, gpu_nvml_index, parse_visible_devices
from emulator.errors import UserError

UUID_A = "GPU-8f3e2a1b-1111-2222-3333-444455556666"
UUID_B = "GPU-0c9d7e6f-aaaa-bbbb-cccc-ddddeeeeffff"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),  # unset: every device
        ("", []),  # set but empty: none
        ("0", ["0"]),
        ("0,2", ["0", "2"]),
        (" 1 , 3 ", ["1", "3"]),  # whitespace stripped
        ("2,0", ["2", "0"]),  # order kept: ordinal 0 is physical device 2
        ("01", ["1"]),
        ("1gpu,2", ["1", "2"]),  # strtoul: leading digits
        ("0,-1,2", ["0"]),  # a negative entry ends the list
        ("0,x,2", ["0"]),  # so does a non-numeric one
        ("0,,2", ["0"]),  # and an empty one
        ("-1", []),
        ("0,0", []),  # a repeat hides every device
        (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),
        ("GPU-8f3e", ["GPU-8f3e"]),  # a UUID prefix
        (f"{UUID_A},1", [UUID_A]),  # another form ends the list
        (f"{UUID_A}, {UUID_A}", []),
        ("GPU-", []),
        ("MIG-GPU-8f3e2a1b-1111-2222-3333-444455556666/1/0", ["MIG-GPU-8f3e2a1b-1111-2222-3333-444455556666/1/0"]),
        ("MIG-5d2b0c1e-aaaa-bbbb-cccc-000011112222,MIG-77", ["MIG-5d2b0c1e-aaaa-bbbb-cccc-000011112222", "MIG-77"]),
        ("MIG-5d2b,GPU-8f3e", ["MIG-5d2b"]),
        ("1,GPU-8f3e", ["1"]),
    ],
)
def test_parse_visible_devices(value: str | None, expected: list[str] | None) -> None:
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize(
    ("node_rank", "count", "expected"),
    [(0, 1, "cuda:0"), (3, 1, "cuda:0"), (0, 4, "cuda:0"), (3, 4, "cuda:3"), (5, 4, "cuda:1"), (7, 2, "cuda:1")],
)
def test_round_robin(node_rank: int, count: int, expected: str) -> None:
    assert choose_device("cuda", node_rank=node_rank, cuda_count=count) == expected
    assert choose_device("auto", node_rank=node_rank, cuda_count=count) == expected
    assert choose_device("cpu", node_rank=node_rank, cuda_count=count) == "cpu"


def test_auto_without_gpu_is_cpu() -> None:
    assert choose_device("auto", node_rank=3, cuda_count=0) == "cpu"


def test_auto_on_this_machine() -> None:
    expected = "cuda:0" if torch.cuda.device_count() > 0 else "cpu"
    assert choose_device("auto", node_rank=0) == expected


def test_cuda_without_gpu_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UserError) as err:
        choose_device("cuda", node_rank=0, cuda_count=0)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("device = 'cuda' but no CUDA device is visible (CUDA_VISIBLE_DEVICES='')")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES unset"):
        choose_device("cuda", node_rank=0, cuda_count=0)


def test_unknown_setting() -> None:
    with pytest.raises(UserError, match="'gpu': choose one of auto, cpu, cuda"):
        choose_device("gpu", node_rank=0, cuda_count=1)
    with pytest.raises(ValueError):
        choose_device("cuda", node_rank=-1, cuda_count=1)


@pytest.fixture
def no_torch_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a rank sees without a CUDA runtime: identity comes from CUDA_VISIBLE_DEVICES alone."""
    monkeypatch.setattr(binding, "_torch_uuid", lambda ordinal: None)


@pytest.mark.usefixtures("no_torch_uuid")
def test_gpu_identity_from_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_identity("cpu") is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_identity("cuda:1") == "1"
    assert gpu_identity("cuda") == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert gpu_identity("cuda:1") == "2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUID_A},{UUID_B}")
    assert gpu_identity("cuda:1") == UUID_B
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-GPU-8f3e/1/0")
    assert gpu_identity("cuda:0") == "MIG-GPU-8f3e/1/0"
    with pytest.raises(ValueError):
        gpu_identity("mps")


def test_gpu_identity_prefers_the_uuid_torch_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binding, "_torch_uuid", lambda ordinal: UUID_A if ordinal == 0 else None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert gpu_identity("cuda:0") == UUID_A
    assert gpu_identity("cuda:1") == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-77")
    assert gpu_identity("cuda:0") == "MIG-77"  # the MIG instance, not its parent GPU


def test_torch_uuid_is_none_without_cuda() -> None:
    if torch.cuda.is_available():
        assert binding._torch_uuid(0).startswith(("GPU-", "MIG-"))
    else:
        assert binding._torch_uuid(0) is None


@pytest.mark.usefixtures("no_torch_uuid")
def test_gpu_nvml_index(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_nvml_index("cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert gpu_nvml_index("cuda:0") == 2  # the physical ordinal, an int for nvmlDeviceGetHandleByIndex
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID_B)
    assert gpu_nvml_index("cuda:0") == UUID_B  # a UUID, for nvmlDeviceGetHandleByUUID
