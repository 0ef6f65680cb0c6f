"""Where the net runs: the one rule for a device specification, shared by the service and training.

    "auto"            the caller's default (a GPU when there is one, else the CPU)
    "cpu", "cuda", "cuda:N"    one device; both towers there
    "cuda:0,cuda:1"   two devices, one per tower ("cpu,cpu": both on the CPU)

Only the syntax is checked here; whether the devices exist is checked by whoever places the model.
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
