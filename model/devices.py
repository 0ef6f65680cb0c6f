"""Where the net runs: the one rule for a device specification, shared by the service and training.

    "auto"            the caller's default (a GPU when there is one, else the CPU)
    "cpu", "cuda", "cuda:N"    one device; both towers there
    "cuda:0,cuda:1"   two devices, one per tower ("cpu,cpu": both on the CPU)

``parse_devices`` checks the syntax only; ``resolve_devices`` also checks that the devices exist, with
``check_present``, which ``AlexNet.place`` calls too: a missing GPU is one line wherever it is found.
Apple's "mps" and any other torch device type are refused: this project runs on CPUs and CUDA GPUs only.
"""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda")


def parse_devices(spec: str) -> tuple[str, ...]:
    """``"cpu"``/``"cuda:1"`` → one device; ``"cuda:0,cuda:1"`` → one per tower; ``"auto"`` is kept as is.
    ValueError, saying why, for anything else."""
    parts = tuple(p.strip() for p in spec.split(",")) if spec else ()
    if parts == ("auto",):
        return parts
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"expected one device or two separated by a comma, got {spec!r}")
    for part in parts:
        kind, _, index = part.partition(":")
        if kind == "mps":
            raise ValueError(f"{part!r}: Apple's MPS devices are not supported by this project (use cpu)")
        if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"{part!r} is not a device (cpu, cuda, cuda:N or auto)")
    return parts


class DeviceError(ValueError):
    """A device this machine does not have (a ValueError: the argument names something that is not here)."""


def check_present(device) -> None:
    """DeviceError, in one line, for a device this machine lacks: CUDA without a CUDA build or GPU, or a GPU
    index past the last one. Without it torch's own failure is an ``AssertionError: Torch not compiled with
    CUDA enabled`` from deep inside ``.to()``."""
    device = torch.device(device)
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r}: this project runs on cpu and cuda devices only")
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r} asks for CUDA, but torch {torch.__version__} sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")


def resolve_devices(spec: str) -> tuple[torch.device, ...]:
    """A device specification → one device or two (one per tower), each checked to exist here.

    "auto" is a CUDA GPU when torch sees one, else the CPU.
    ValueError for a bad specification, DeviceError for a device this machine does not have.
    """
    parts = parse_devices(spec)
    if parts == ("auto",):
        parts = ("cuda",) if torch.cuda.is_available() else ("cpu",)
    devices = tuple(torch.device(p) for p in parts)
    for device in devices:
        check_present(device)
    return devices
