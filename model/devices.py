"""Where the net runs: the one rule for a device specification, shared by the service and training.

    "auto"            the caller's default (a GPU when there is one, else the CPU)
    "cpu", "cuda", "cuda:N"    one device; both towers there
    "cuda:0,cuda:1"   two devices, one per tower ("cpu,cpu": both on the CPU)

``parse_devices`` checks the syntax; ``check_present`` that a device exists on this machine (``AlexNet.place``
calls it, so the library refuses a missing GPU with the same one-line reason as the service and training).
Apple's "mps" and any other torch device type are refused: this project runs on CPUs and CUDA GPUs only.
"""

from __future__ import annotations

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


def check_present(device) -> None:
    """ValueError, in one line, for a device this machine lacks: CUDA without a CUDA build or GPU, a GPU index
    past the last one, or a device type this project does not run on. Without it torch's own failure is an
    ``AssertionError: Torch not compiled with CUDA enabled`` from deep inside ``.to()``."""
    import torch

    device = torch.device(device)
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r}: this project runs on cpu and cuda devices only")
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asks for CUDA, but torch {torch.__version__} sees no CUDA GPU")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
