"""The checkpoint artifact: one safetensors file that training writes and the service loads.

Tensors are in the grouped single-device layout (Caffe's; float32), named conv1.weight … fc8.bias, plus a
mean_image when the preprocessing subtracts one. The header's metadata holds the format, its version and
one JSON object: architecture, classes, preprocessing, pca, provenance, training.
safetensors holds no code, so loading never executes anything. docs/checkpoint-format.md has the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .classes import ImageClass, imagenet_classes
from .devices import check_present
from .files import write_safetensors
from .network import AlexNet, AlexNetConfig, GroupedAlexNet
from .preprocessing import IMAGENET_RGB_MEAN, Preprocessing, Preprocessor

FORMAT_NAME = "alexnet-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path or '<checkpoint>'}: {problem}")


@dataclass
class Checkpoint:
    config: AlexNetConfig
    state_dict: dict[str, torch.Tensor]  # grouped layout, on CPU
    classes: tuple[ImageClass, ...] = field(default_factory=imagenet_classes)
    preprocessing: Preprocessing = field(default_factory=lambda: Preprocessing(mean=IMAGENET_RGB_MEAN))
    mean_image: torch.Tensor | None = None  # [3, resize, resize], in the preprocessing's order and scale
    pca: dict | None = None  # colour PCA used in training: eigenvalues, eigenvectors (columns), alpha_std
    provenance: dict = field(default_factory=dict)  # trained, epoch, val errors, dataset, created, code …
    training: dict | None = None  # the hyper-parameters the weights were trained with
    path: str | None = None  # set by load_checkpoint
    sha256: str | None = None  # of the file, set by load_checkpoint

    @property
    def trained(self) -> bool:
        return bool(self.provenance.get("trained", False))

    @classmethod
    def from_model(cls, model: AlexNet | GroupedAlexNet, **fields) -> "Checkpoint":
        """Capture a model's weights (either form) with the given metadata (see the field list)."""
        if isinstance(model, AlexNet):
            state = model.grouped_state_dict()
        else:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        fields.setdefault("classes", imagenet_classes() if model.config.num_classes == 1000 else None)
        if fields["classes"] is None:
            raise ValueError(f"a {model.config.num_classes}-class model needs its classes")
        return cls(config=model.config, state_dict=state, **fields)

    def build(self, devices=None) -> AlexNet:
        """The two-tower net with these weights, towers on ``devices`` (default: both on CPU)."""
        net = AlexNet(self.config)
        net.load_grouped_state_dict(self.state_dict)
        return net.place(devices) if devices is not None else net

    def build_grouped(self, device: str | torch.device = "cpu") -> GroupedAlexNet:
        """The single-device grouped net with these weights (the faster form for inference)."""
        check_present(device)  # as AlexNet.place: a missing GPU in one line
        net = GroupedAlexNet(self.config)
        net.load_state_dict(self.state_dict)
        return net.to(device)

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocessing, self.mean_image)

    def metadata(self) -> dict:
        return {
            "architecture": {"name": "alexnet-2012", **self.config.to_dict()},
            "classes": [{"wnid": c.wnid, "name": c.name} for c in self.classes],
            "preprocessing": self.preprocessing.to_dict(),
            "pca": self.pca,
            "provenance": self.provenance,
            "training": self.training,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash or a full disk leaves the previous file at ``path`` intact."""
        self.validate(path)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict.items()}
        if self.mean_image is not None:
            tensors["mean_image"] = self.mean_image.detach().to("cpu", torch.float32).contiguous()
        provenance = {"created": _now(), "code_version": code_version(), **self.provenance}
        meta = {**self.metadata(), "provenance": provenance}
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "alexnet": json.dumps(meta, separators=(",", ":")),
        }
        write_safetensors(path, tensors, header)
        return Path(path)

    def validate(self, path=None) -> None:
        """Raise CheckpointError if the parts do not fit together."""
        try:
            check_grouped_shapes(self.state_dict, self.config, "tensors")
        except ValueError as e:
            raise CheckpointError(path, str(e)) from None
        extra = sorted(set(self.state_dict) - set(self.config.grouped_shapes()))
        if extra:
            raise CheckpointError(path, f"unexpected tensors {extra}")
        if len(self.classes) != self.config.num_classes:
            raise CheckpointError(path, f"{len(self.classes)} classes listed for a {self.config.num_classes}-way net")
        if self.preprocessing.crop != self.config.input_size:
            raise CheckpointError(
                path,
                f"preprocessing crops {self.preprocessing.crop} px but conv1 padding "
                f"{self.config.conv1_padding!r} expects {self.config.input_size} px",
            )
        try:
            self.preprocessor()
        except ValueError as e:
            raise CheckpointError(path, str(e)) from None


def check_grouped_shapes(state: dict[str, torch.Tensor], config: AlexNetConfig, source: str = "weights") -> None:
    """Raise ValueError naming every missing or mis-shaped tensor of the grouped layout."""
    expected = config.grouped_shapes()
    problems = [f"missing {k} (expected shape {list(s)})" for k, s in expected.items() if k not in state]
    problems += [
        f"{k} has shape {list(state[k].shape)}, expected {list(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != s
    ]
    if problems:
        raise ValueError(f"{source} do not fit {describe(config)}: " + "; ".join(problems))


def describe(config: AlexNetConfig) -> str:
    return f"AlexNet(num_classes={config.num_classes}, width={config.width})"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint. Every problem is a CheckpointError naming the file; nothing is pickled.

    The file is read once into memory, so the weights and the sha256 describe the same bytes even if the
    file is replaced meanwhile (as training does after every epoch). Its header is read and checked first:
    a file whose size is not what its header describes (any large file that is not a checkpoint) is refused
    without being read into memory.
    """
    path = Path(path)
    header, data = _read_file(path)
    meta_strings = header.get("__metadata__") or {}
    _check_format(path, meta_strings)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # SafetensorError: bad dtype, overlapping offsets, …
        raise CheckpointError(path, f"corrupt tensor data: {e}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    del data

    try:
        meta = json.loads(meta_strings["alexnet"])
        config = AlexNetConfig.from_dict(meta["architecture"])
        classes = tuple(ImageClass(str(c["wnid"]), str(c["name"])) for c in meta["classes"])
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(path, f"metadata is incomplete or invalid: {type(e).__name__}: {e}") from None

    _check_tensors(path, tensors)
    mean_image = tensors.pop("mean_image", None)
    checkpoint = Checkpoint(
        config=config,
        state_dict={k: v.float() for k, v in tensors.items()},
        classes=classes,
        preprocessing=preprocessing,
        mean_image=None if mean_image is None else mean_image.float(),
        pca=meta.get("pca"),
        provenance=meta.get("provenance") or {},
        training=meta.get("training"),
        path=str(path),
        sha256=sha256,
    )
    checkpoint.validate(path)
    return checkpoint


def _read_file(path: Path) -> tuple[dict, bytes]:
    """The file's safetensors header (checked against its size) and then all of its bytes."""
    try:
        with open(path, "rb") as f:
            header = _read_header(path, f, os.fstat(f.fileno()).st_size)
            f.seek(0)
            return header, f.read()
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a directory, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None


def _check_format(path: Path, meta_strings: dict) -> None:
    if meta_strings.get("format") != FORMAT_NAME:
        raise CheckpointError(
            path, f"a safetensors file, but not an AlexNet checkpoint (no format={FORMAT_NAME!r} in its metadata)"
        )
    try:
        version = int(meta_strings.get("format_version", ""))
    except ValueError:
        raise CheckpointError(path, f"bad format_version {meta_strings.get('format_version')!r}") from None
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            path, f"format version {version} is not supported (this code reads {list(SUPPORTED_VERSIONS)})"
        )


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(path, f"tensor {name} has dtype {tensor.dtype}, expected a float type")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(path, f"tensor {name} holds NaN or infinite values")


def _read_header(path: Path, f, size: int) -> dict:
    """Parse and sanity-check the safetensors header ourselves (reading only the header from ``f``, a file
    of ``size`` bytes), to say clearly what is wrong."""
    if size < 8:
        raise CheckpointError(path, f"too short to be a checkpoint ({size} bytes)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(
            path,
            f"not a safetensors file, or truncated: header claims {header_len:,} bytes, file has {size:,}",
        )
    try:
        header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(path, "not a safetensors file (its header is not JSON)") from None
    try:
        entries = [t for k, t in header.items() if k != "__metadata__"]
        ends = [int(t["data_offsets"][1]) for t in entries]
    except (KeyError, IndexError, TypeError, ValueError, OverflowError):
        raise CheckpointError(path, "not a safetensors file (a tensor entry without valid data_offsets)") from None
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "not a safetensors file (its __metadata__ is not a map of strings)")
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise CheckpointError(path, f"truncated: {size:,} bytes, the header describes {expected:,}")
    if size > expected:
        raise CheckpointError(
            path, f"{size - expected:,} bytes more than its header describes: damaged, or not a checkpoint"
        )
    return header


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when run from a checkout (for provenance)."""
    from . import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__
