"""A checkpoint made ready to serve: the network on its device(s), its preprocessing, classes and identity.

A ``LoadedModel`` is immutable once built. Hot reload builds a new one and swaps the reference, so a request
that started on one model finishes on it, and what is cached on a model (its conv1 picture, the net
Grad-CAM runs) goes with it. What a forward pass computes is chosen per request (``Task``): probabilities
over one or ten crops (/classify) or a hidden layer's activations (/embed). Requests of every kind share a
batch; ``LoadedModel.run`` runs one pass per layer the batch's requests stop at."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from model import (
    FORMAT_VERSION,
    AlexNet,
    AlexNetConfig,
    Checkpoint,
    CheckpointError,
    CPUInferenceNet,
    GroupedAlexNet,
    ImageClass,
    Preprocessor,
    check_feature_layer,
    load_checkpoint,
)
from model.preprocessing import Crops, crop_offsets
from model.ten_crop import mean_over_crops, rows_per_image, run_in_chunks
from model.visualize import filters_image, grad_cam, overlay

from .schemas import FeatureLayer, ModelIdentity

log = logging.getLogger("service")

LOGITS = "fc8"  # the layer a classifying forward pass stops at


@dataclass(frozen=True)
class Task:
    """What one request wants from the forward pass: where it stops (``fc8``: the logits, turned into
    softmax probabilities; ``fc6``/``fc7``: that layer's activations after the ReLU), over which crops, and
    whether features are scaled to unit L2 norm. Build one with ``Task.probabilities``, ``Task.features`` or
    ``Task.probabilities_of_inputs``. ``preprocessed``: the request's tensors are network inputs already
    (float32 [3, crop, crop], normalised as ``Preprocessor.from_uint8`` does), not uint8 images."""

    layer: str = LOGITS
    crops: Crops = "center"
    normalize: bool = False
    preprocessed: bool = False

    @classmethod
    def probabilities(cls, crops: Crops = "center") -> Task:
        """/classify: softmax probabilities [n, classes]; ten crops are averaged after the softmax."""
        return cls(LOGITS, crops)

    @classmethod
    def probabilities_of_inputs(cls) -> Task:
        """/v2 FP32 tensors: softmax probabilities [n, classes] of n network inputs the client preprocessed."""
        return cls(LOGITS, "center", preprocessed=True)

    @classmethod
    def features(cls, layer: FeatureLayer = "fc7", normalize: bool = False) -> Task:
        """/embed: hidden layer ``layer``'s activations [n, units] of the centre crop (L2-normalised if asked)."""
        return cls(check_feature_layer(layer), "center", normalize)

    @property
    def rows_per_image(self) -> int:
        return rows_per_image(self.crops)


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM for one image: the map [crop, crop] in [0, 1] over the centre crop the net saw."""

    heat: torch.Tensor
    crop: Image.Image  # the centre crop, as the net saw it (before the mean subtraction)
    class_index: int
    probability: float  # softmax probability of the class, centre crop

    def png(self, opacity: float = 0.5) -> bytes:
        buffer = io.BytesIO()
        overlay(self.crop, self.heat, opacity).save(buffer, format="PNG")
        return buffer.getvalue()

    def rounded(self, decimals: int = 3) -> list[list[float]]:
        scale = 10.0**decimals  # in float64, so that each value prints as its few decimals
        return self.heat.double().mul(scale).round().div(scale).tolist()


class WeightsUnavailable(RuntimeError):
    """The served model's weights cannot be read again for Grad-CAM (its checkpoint file was rewritten in
    place since it was loaded); a reload to the new file is on its way."""


class Explainer:
    """The two-tower ``AlexNet`` that Grad-CAM needs (it runs with autograd, which the inference nets do
    not), built on first use on the model's devices (one device: both towers there). It belongs to one
    ``LoadedModel`` and is freed with it when a reload replaces it.

    Until then it costs no second copy of the weights: ``source`` makes the checkpoint again when asked —
    from the file the model was loaded from (held open, so that a checkpoint renamed over it or deleted does
    not matter; its sha256 is checked against the served model's), or from the untrained net's seed."""

    def __init__(self, source: Callable[[], Checkpoint], devices: tuple[torch.device, ...]):
        self._source: Callable[[], Checkpoint] | None = source
        self._devices = devices if len(devices) == 2 else (devices[0], devices[0])
        self._net: AlexNet | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._net is not None

    def net(self) -> AlexNet:
        with self._lock:  # two explain threads must not build it twice
            if self._net is None:
                self._net = self._source().build(self._devices).eval()
                self._source = None  # (closes the file it held)
            return self._net


class _OpenCheckpoint:
    """The checkpoint file a model was loaded from, held open; read again on call, if it is still the same
    bytes (by sha256)."""

    def __init__(self, path: str, sha256: str):
        self.path, self.sha256 = path, sha256
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None  # gone already: read by path (the sha256 check still holds)
        else:
            weakref.finalize(self, os.close, self._fd)

    def __call__(self) -> Checkpoint:
        fd_path = f"/proc/self/fd/{self._fd}"
        source = fd_path if self._fd is not None and os.path.exists(fd_path) else self.path
        try:
            checkpoint = load_checkpoint(source)
        except CheckpointError as e:
            raise WeightsUnavailable(f"cannot read the served checkpoint again: {e.problem}") from None
        if checkpoint.sha256 != self.sha256:
            raise WeightsUnavailable(f"{self.path} was rewritten since the model being served was loaded from it")
        return checkpoint


@dataclass(frozen=True, eq=False)
class LoadedModel:
    net: nn.Module
    preprocessor: Preprocessor
    classes: tuple[ImageClass, ...]
    identity: ModelIdentity
    devices: tuple[torch.device, ...]
    metadata: dict  # architecture, preprocessing, provenance, training (as stored in the checkpoint)
    conv1_weight: torch.Tensor  # [K, 3, 11, 11], grouped layout (tower 0's first), on the CPU: for filters_png
    explainer: Explainer
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def input_device(self) -> torch.device:
        return self.devices[0]

    @functools.cached_property
    def wnids(self) -> dict[str, int]:
        return {c.wnid: i for i, c in enumerate(self.classes)}

    @functools.cached_property
    def filters_png(self) -> bytes:
        """conv1's kernels as the paper's Fig. 3 draws them (tower 0 above tower 1), as a PNG; made once."""
        buffer = io.BytesIO()
        filters_image(self.conv1_weight, self.preprocessor.config.channel_order).save(buffer, format="PNG")
        return buffer.getvalue()

    @functools.cached_property
    def filters_etag(self) -> str:
        """Keyed by the checkpoint's sha256 (the untrained net, which has none: by the picture's own)."""
        key = self.identity.sha256 or "untrained-" + hashlib.sha256(self.filters_png).hexdigest()[:32]
        return f'"conv1-{key}"'

    def predict(self, requests: list[list[torch.Tensor]], crops: list[Crops], max_batch: int) -> list[torch.Tensor]:
        """Softmax probabilities [n, classes] for each request's n uint8 images [3, S, S] (see ``run``)."""
        return self.run(requests, [Task.probabilities(c) for c in crops], max_batch)

    @torch.inference_mode()
    def run(self, requests: list[list[torch.Tensor]], tasks: list[Task], max_batch: int) -> list[torch.Tensor]:
        """What each request's task asks for its n uint8 images [3, S, S] (or, for a ``preprocessed`` task, n
        float32 network inputs [3, crop, crop]): probabilities [n, classes] or features [n, units] (float32,
        on the CPU).

        Requests are grouped by the layer they stop at (one forward pass per layer present, in chunks of at
        most ``max_batch`` rows). Ten-crop requests contribute 10 rows per image, averaged after the softmax
        (the paper's 10-patch prediction). Everything tensor-sized happens here, in the caller's (inference)
        thread."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        by_layer: dict[str, list[int]] = {}
        for position, task in enumerate(tasks):
            by_layer.setdefault(task.layer, []).append(position)
        for layer, positions in by_layer.items():
            answers = self._run_layer(layer, [requests[i] for i in positions], [tasks[i] for i in positions], max_batch)
            for position, answer in zip(positions, answers):
                out[position] = answer
        return out

    def _run_layer(
        self, layer: str, requests: list[list[torch.Tensor]], tasks: list[Task], max_batch: int
    ) -> list[torch.Tensor]:
        counts = [len(images) for images in requests]
        x = self._inputs(requests, tasks)
        if layer == LOGITS:
            outputs = run_in_chunks(self.net, x, max_batch).softmax(dim=1).cpu()
        else:
            outputs = run_in_chunks(functools.partial(self.net.features, layer=layer), x, max_batch).cpu()
        out, start = [], 0
        for n, task in zip(counts, tasks):
            rows = n * task.rows_per_image
            y = mean_over_crops(outputs[start : start + rows], task.crops)  # the paper's 10-patch average
            if task.normalize:
                y = F.normalize(y, p=2.0, dim=1)  # unit L2 norm (an all-zero vector stays zero)
            out.append(y)
            start += rows
        return out

    def _inputs(self, requests: list[list[torch.Tensor]], tasks: list[Task]) -> torch.Tensor:
        """The batch's network inputs, request after request (ten-crop images: 10 rows each)."""
        if all(task.crops == "center" and not task.preprocessed for task in tasks):  # the usual batch: one pass
            images = torch.stack([image for request in requests for image in request])
            return self.preprocessor.from_uint8(images.to(self.input_device, non_blocking=True), "center")
        parts = []
        for images, task in zip(requests, tasks):
            # uint8 [3, S, S] images and preprocessed [3, crop, crop] tensors cannot share one stack
            batch = torch.stack(images).to(self.input_device, non_blocking=True)
            if task.preprocessed:
                parts.append(batch)
            else:
                part = self.preprocessor.from_uint8(batch, task.crops)
                parts.append(part.flatten(0, 1) if task.crops == "ten" else part)
        return torch.cat(parts)

    def explain(self, image: torch.Tensor, class_index: int | None = None) -> Explanation:
        """Grad-CAM of the centre crop of one uint8 image [3, S, S], for ``class_index`` (default: the top
        class). Runs the two-tower net with autograd in the calling thread (never under inference mode)."""
        net = self.explainer.net()
        crop = self.preprocessor.config.crop
        x = self.preprocessor.from_uint8(image.unsqueeze(0), "center")
        heat, class_index, probability = grad_cam(net, x, class_index)
        (top, left), size = crop_offsets(image.shape[-1], crop, "center")[0], crop
        pixels = image[:, top : top + size, left : left + size].permute(1, 2, 0).contiguous()
        picture = Image.frombytes("RGB", (size, size), pixels.numpy().tobytes())
        return Explanation(heat, picture, class_index, probability)

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


def start_runtime(devices: tuple[torch.device, ...]) -> None:
    """On GPUs, initialise CUDA, cuBLAS and cuDNN (a matmul and a convolution on each device) before the
    model's load is measured: their host memory, hundreds of MiB, is paid once per process and belongs to
    the ready size, not to the model's load, which a hot reload and /explain's net are counted as costing
    again (service/memory.py). On the CPU there is nothing to start."""
    for device in devices:
        if device.type == "cuda":
            x = torch.ones(1, 1, 8, 8, device=device)
            F.conv2d(x, torch.ones(1, 1, 3, 3, device=device))
            x.flatten(1) @ x.flatten(1).T
            torch.cuda.synchronize(device)


def runs_cpu_inference_net(devices: tuple[torch.device, ...]) -> bool:
    """One CPU device: the net is served as ``CPUInferenceNet``, whose forward passes want the process's
    allocator to keep freed memory (model.keep_freed_memory, which the service sets at start-up)."""
    return devices == (torch.device("cpu"),)


def _build(checkpoint: Checkpoint, devices: tuple[torch.device, ...], net: GroupedAlexNet | None) -> nn.Module:
    if runs_cpu_inference_net(devices):
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
    checkpoint: Checkpoint,
    devices: tuple[torch.device, ...],
    net: GroupedAlexNet | None = None,
    weights: Callable[[], Checkpoint] | None = None,
) -> LoadedModel:
    """``net``: the checkpoint's weights already built (saves building them a second time). ``weights``:
    makes the checkpoint again for Grad-CAM's net (default: this one, kept in memory until then)."""
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
        conv1_weight=checkpoint.state_dict["conv1.weight"].detach().cpu().clone(),
        explainer=Explainer(weights or (lambda: checkpoint), devices),
    )
    model.warm_up()
    return model


def load(path: str | Path, devices: tuple[torch.device, ...]) -> LoadedModel:
    """Read a checkpoint (CheckpointError if it is unusable), build it on ``devices`` and warm it up."""
    checkpoint = load_checkpoint(path)
    return from_checkpoint(checkpoint, devices, weights=_OpenCheckpoint(str(path), checkpoint.sha256))


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

    def weights() -> Checkpoint:  # drawn again from the seed: the same weights
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(UNTRAINED_SEED)
            return Checkpoint.from_model(GroupedAlexNet(AlexNetConfig()), provenance=provenance)

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(UNTRAINED_SEED)
        net = GroupedAlexNet(AlexNetConfig())  # the paper's initialisation
        # Inside the fork too: laying the net out for the CPU builds modules whose (discarded) default
        # initialisation draws from the generator.
        return from_checkpoint(Checkpoint.from_model(net, provenance=provenance), devices, net, weights)


def _number(value, kind):
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None
