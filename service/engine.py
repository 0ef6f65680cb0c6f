"""A checkpoint made ready to serve: the network on its device(s), its preprocessing, classes and identity.

A ``LoadedModel`` is immutable once built. Hot reload builds a new one and swaps the reference, so a
request that started on one model finishes on it: its preprocessing, weights and reported identity agree.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from model import AlexNetConfig, Checkpoint, CPUInferenceNet, GroupedAlexNet, ImageClass, Preprocessor, load_checkpoint
from model.checkpoint import FORMAT_VERSION

from .schemas import Crops, ModelIdentity
from .settings import parse_devices

log = logging.getLogger("service")

TEN_CROPS = 10  # the paper's 4 corners + centre, and their mirror images


class DeviceError(RuntimeError):
    """The configured device does not exist on this machine."""


def resolve_devices(spec: str) -> tuple[torch.device, ...]:
    """The ALEXNET_DEVICE setting → one device or two (one per tower)."""
    parts = parse_devices(spec)
    if parts == ("auto",):
        parts = ("cuda",) if torch.cuda.is_available() else ("cpu",)
    devices = tuple(torch.device(p) for p in parts)
    for device in devices:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"device {spec!r} asks for CUDA, but torch {torch.__version__} sees no CUDA GPU")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible")
    return devices


def rows_per_image(crops: Crops) -> int:
    return TEN_CROPS if crops == "ten" else 1


@dataclass(frozen=True, eq=False)
class LoadedModel:
    net: nn.Module
    preprocessor: Preprocessor
    classes: tuple[ImageClass, ...]
    identity: ModelIdentity
    devices: tuple[torch.device, ...]
    metadata: dict  # architecture, preprocessing, provenance, training (as stored in the checkpoint)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @torch.inference_mode()
    def predict(self, requests: list[list[torch.Tensor]], crops: list[Crops], max_batch: int) -> list[torch.Tensor]:
        """Softmax probabilities [n, classes] for each request's n uint8 images [3, S, S].

        All requests' network inputs are concatenated and run in chunks of at most ``max_batch`` rows.
        Ten-crop requests contribute 10 rows per image, averaged after the softmax (the paper's 10-patch
        prediction). Everything tensor-sized happens here, in the caller's (inference) thread.
        """
        counts = [len(images) for images in requests]
        images = torch.stack([image for request in requests for image in request])
        images = images.to(self.input_device, non_blocking=True)
        if all(crop == "center" for crop in crops):
            x = self.preprocessor.from_uint8(images, "center")
        else:
            parts, start = [], 0
            for n, crop in zip(counts, crops):
                part = self.preprocessor.from_uint8(images[start : start + n], crop)
                parts.append(part.flatten(0, 1) if crop == "ten" else part)
                start += n
            x = torch.cat(parts)
        probabilities = torch.cat([self.net(chunk).float().softmax(dim=1) for chunk in x.split(max_batch)]).cpu()
        out, start = [], 0
        for n, crop in zip(counts, crops):
            rows = n * rows_per_image(crop)
            p = probabilities[start : start + rows]
            out.append(p.view(n, TEN_CROPS, -1).mean(dim=1) if crop == "ten" else p)
            start += rows
        return out

    def warm_up(self) -> None:
        """Decode an image and run one forward pass, so that the first request pays for no lazy set-up
        (Pillow's format plugins, torch's kernels, CUDA's context)."""
        image = self.preprocessor.load(_WARM_UP_PNG)
        self.predict([[image]], ["center"], max_batch=1)
        for device in self.devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 96, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


_WARM_UP_PNG = _png(32, 24)


def _build(checkpoint: Checkpoint, devices: tuple[torch.device, ...], net: GroupedAlexNet | None) -> nn.Module:
    if devices == (torch.device("cpu"),):
        # The net laid out for oneDNN: 1.25-1.5× the towers' throughput (bench/model_throughput.py, ours-cpu).
        return CPUInferenceNet(net if net is not None else checkpoint.build_grouped())
    if len(devices) == 1:
        # groups=2 convolutions on one GPU: one kernel launch per layer instead of two
        net = net.to(devices[0]) if net is not None else checkpoint.build_grouped(devices[0])
    else:
        # One tower per device, as in the paper ("cpu,cpu" runs the same code path on one CPU).
        net = net.to_towers(devices) if net is not None else checkpoint.build(devices)
    return net.eval()


def from_checkpoint(
    checkpoint: Checkpoint, devices: tuple[torch.device, ...], net: GroupedAlexNet | None = None
) -> LoadedModel:
    """``net``: the checkpoint's weights already built (saves building them a second time)."""
    provenance = checkpoint.provenance
    identity = ModelIdentity(
        checkpoint=Path(checkpoint.path).name if checkpoint.path else None,
        path=checkpoint.path,
        sha256=checkpoint.sha256,
        format_version=FORMAT_VERSION if checkpoint.path else None,  # load_checkpoint reads only this version
        trained=checkpoint.trained,
        epoch=_number(provenance.get("epoch"), int),
        val_top1_error=_number(provenance.get("val_top1_error"), float),
        val_top5_error=_number(provenance.get("val_top5_error"), float),
    )
    model = LoadedModel(
        net=_build(checkpoint, devices, net),
        preprocessor=checkpoint.preprocessor(),
        classes=tuple(checkpoint.classes),
        identity=identity,
        devices=devices,
        metadata={k: v for k, v in checkpoint.metadata().items() if k != "classes"},
    )
    model.warm_up()
    return model


def load(path: str | Path, devices: tuple[torch.device, ...]) -> LoadedModel:
    """Read a checkpoint (CheckpointError if it is unusable), build it on ``devices`` and warm it up."""
    return from_checkpoint(load_checkpoint(path), devices)


# The untrained fallback's weights are drawn from this seed, so that they, and the answer to a given photo,
# are the same on every start (its labels are noise all the same). Recorded in /model's provenance.
UNTRAINED_SEED = 0


def untrained(devices: tuple[torch.device, ...]) -> LoadedModel:
    """The paper's net, freshly initialised (N(0, 0.01²) weights) from ``UNTRAINED_SEED``: what the service
    answers with until a checkpoint exists. The process's random state is left exactly as it was: the seed
    is set on a fork of the CPU generator (the net is initialised on the CPU), restored on return."""
    provenance = {
        "trained": False,
        "source": "fresh initialisation (no checkpoint found)",
        "init_seed": UNTRAINED_SEED,
    }
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(UNTRAINED_SEED)
        net = GroupedAlexNet(AlexNetConfig())  # the paper's initialisation
        # Inside the fork too: laying the net out for the CPU builds modules whose (discarded) default
        # initialisation draws from the generator.
        return from_checkpoint(Checkpoint.from_model(net, provenance=provenance), devices, net)


def _number(value, kind):
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None
