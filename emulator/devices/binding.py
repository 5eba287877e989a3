"""One GPU per rank, chosen by node-local rank, and the bound GPU's identity for the trace."""

from __future__ import annotations

import os

from emulator.errors import UserError

DEVICE_SETTINGS = ("auto", "cpu", "cuda")


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value, as CUDA reads them.

    - ``None`` (unset): ``None``, every device is visible.
    - ``""``: ``[]``, no device is visible.
    - Comma-separated entries, whitespace around each stripped. The first entry decides the form:
      ordinals (``"0,2"`` -> ``["0", "2"]``), GPU UUIDs (``"GPU-8f3e..."``, a unique prefix is allowed) or
      MIG instances (``"MIG-GPU-<uuid>/<gi>/<ci>"`` before driver R470, ``"MIG-<uuid>"`` after).
    - An ordinal is read like C's ``strtoul``: its leading digits (``"1gpu"`` -> ``"1"``, ``"01"`` -> ``"1"``).
    - An invalid entry (a negative or non-numeric ordinal, an empty entry, an entry of another form than the
      first) ends the list: it and every entry after it are ignored, as CUDA does.
    - A repeated entry makes the whole list empty, as CUDA does (no device is visible).

    These are the rules PyTorch implements for CUDA (``torch.cuda._parse_visible_devices``); the list does
    not know how many devices exist, so an ordinal past the last device is kept here (CUDA drops it).
    """
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",")]
    first = entries[0]
    prefix = "GPU-" if first.startswith("GPU-") else "MIG-" if first.startswith("MIG-") else None
    out: list[str] = []
    for entry in entries:
        if prefix is not None:
            parsed = entry if entry.startswith(prefix) and len(entry) > len(prefix) else None
        else:
            parsed = _leading_ordinal(entry)
        if parsed is None:
            break
        if parsed in out:
            return []
        out.append(parsed)
    return out


def _leading_ordinal(entry: str) -> str | None:
    digits = ""
    for i, c in enumerate(entry):
        if c.isdigit():
            digits += c
        elif not (i == 0 and c == "+"):
            break
    return str(int(digits)) if digits else None


def visible_devices() -> list[str] | None:
    """This process's ``CUDA_VISIBLE_DEVICES``, parsed (see :func:`parse_visible_devices`)."""
    return parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _visible_env_text() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if value is None else f"CUDA_VISIBLE_DEVICES={value!r}"


def choose_device(setting: str, *, node_rank: int, cuda_count: int | None = None) -> str:
    """The torch device of a rank: ``"cpu"`` or ``"cuda:<i>"`` with ``i = node_rank % cuda_count``.

    ``setting`` is ``"cpu"``, ``"cuda"`` (a GPU is required: a one-line :class:`UserError` when none is
    visible) or ``"auto"`` (a GPU when any is visible, else the CPU). ``i`` is the ordinal among the visible
    devices, so ranks of a node spread round-robin over its GPUs and share them when ranks outnumber GPUs.
    ``cuda_count`` defaults to ``torch.cuda.device_count()``.
    """
    if setting not in DEVICE_SETTINGS:
        raise UserError(f"device = {setting!r}: choose one of {', '.join(DEVICE_SETTINGS)}")
    if node_rank < 0:
        raise ValueError(f"node_rank must be >= 0, got {node_rank}")
    if setting == "cpu":
        return "cpu"
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count()
    if cuda_count <= 0:
        if setting == "cuda":
            raise UserError(
                f"device = 'cuda' but no CUDA device is visible ({_visible_env_text()}); "
                "use device = 'auto' or 'cpu', or run where a GPU is visible"
            )
        return "cpu"
    return f"cuda:{node_rank % cuda_count}"


def _cuda_ordinal(device: str) -> int | None:
    if device == "cpu":
        return None
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:<i>'")


def _torch_uuid(ordinal: int) -> str | None:
    """``"GPU-<uuid>"`` of a visible CUDA ordinal from torch, or None when torch cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available() or ordinal >= torch.cuda.device_count():
            return None
        uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
    except Exception:  # no CUDA runtime, or a torch build without the field: fall back
        return None
    if not uuid:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def gpu_identity(device: str) -> str | None:
    """The identity of the GPU behind ``device``, for the trace; ``None`` for ``"cpu"``.

    In order of preference: the ``CUDA_VISIBLE_DEVICES`` entry when it names a MIG instance (the
    instance is what the rank runs on, whatever UUID torch reports); the UUID torch reports for the ordinal
    (``"GPU-<uuid>"``, usable with ``Meter``); the ``CUDA_VISIBLE_DEVICES`` entry (a UUID or its prefix, or
    the physical ordinal); the ordinal itself when every device is visible and no CUDA runtime answers.
    """
    ordinal = _cuda_ordinal(device)
    if ordinal is None:
        return None
    visible = visible_devices()
    entry = visible[ordinal] if visible is not None and ordinal < len(visible) else None
    if entry is not None and entry.startswith("MIG-"):
        return entry
    uuid = _torch_uuid(ordinal)
    if uuid is not None:
        return uuid
    if entry is not None:
        return entry
    return str(ordinal)


def gpu_nvml_index(device: str) -> int | str | None:
    """What :class:`emulator.devices.nvml.Meter` needs to open the GPU behind ``device``.

    The UUID when one is known (NVML finds a device by UUID whatever the enumeration order), otherwise the
    physical ordinal as an int: NVML numbers devices in PCI bus order, so a bare ordinal names the right GPU
    only when CUDA enumerates in that order too (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, or a single GPU).
    ``None`` for the CPU. A UUID *prefix* from ``CUDA_VISIBLE_DEVICES`` is passed on as is; NVML rejects it
    and the meter becomes ``kind = "none"`` with the reason.
    """
    identity = gpu_identity(device)
    if identity is None:
        return None
    return int(identity) if identity.isdigit() else identity


__all__ = [
    "DEVICE_SETTINGS",
    "choose_device",
    "gpu_identity",
    "gpu_nvml_index",
    "parse_visible_devices",
    "visible_devices",
]
