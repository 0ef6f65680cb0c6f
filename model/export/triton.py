"""A Triton model repository: config.pbtxt, labels.txt and the exported model in a version directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..checkpoint import Checkpoint
from ..files import atomic_path
from .graph import DEFAULT_OPSET, INPUT_NAME, LOGITS_NAME, output_name
from .metadata import EXPORTED_BY, input_description
from .onnx_file import Exported, export

TRITON_PLATFORM = "onnxruntime_onnx"
TRITON_MODEL_FILE = "model.onnx"
TRITON_LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH_SIZE = 32
_TRITON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def triton_config(
    *,
    name: str,
    input_size: int,
    num_classes: int,
    output: str = LOGITS_NAME,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    labels: str | None = TRITON_LABELS_FILE,
    comment: str = "",
) -> str:
    """Triton's config.pbtxt for an exported model (ONNX Runtime backend). With max_batch_size > 0 the dims
    leave out the batch dimension: Triton adds it, and the model's own is dynamic ("batch")."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    label = f'\n    label_filename: "{labels}"' if labels else ""
    return (
        f"{header}"
        f'name: "{name}"\n'
        f'platform: "{TRITON_PLATFORM}"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ 3, {input_size}, {input_size} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{output}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]{label}\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


def write_triton_repository(
    checkpoint: Checkpoint,
    repository: str | os.PathLike,
    *,
    name: str = "alexnet",
    version: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
) -> Exported:
    """REPOSITORY/NAME/{config.pbtxt, labels.txt, VERSION/model.onnx (+ model.mean_image.npy)}."""
    check_triton_name(name)
    if version < 1:
        raise ValueError(f"--model-version must be at least 1, got {version}")
    triton_config(name=name, input_size=224, num_classes=2, max_batch_size=max_batch_size)  # check it first
    model_dir = Path(repository) / name
    path = model_dir / str(version) / TRITON_MODEL_FILE
    exported = export(checkpoint, path, softmax=softmax, opset=opset, verify=verify)
    mean_file = None if exported.mean_image_path is None else f"{version}/{exported.mean_image_path.name}"
    config = triton_config(
        name=name,
        input_size=checkpoint.config.input_size,
        num_classes=checkpoint.config.num_classes,
        output=output_name(softmax),
        max_batch_size=max_batch_size,
        comment=_triton_comment(checkpoint, mean_file),
    )
    labels = "".join(f"{c.wnid} {c.name}\n" for c in checkpoint.classes)  # line i: class i (output index)
    with atomic_path(model_dir / TRITON_LABELS_FILE) as tmp:
        tmp.write_text(labels, encoding="utf-8")
    with atomic_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(config, encoding="utf-8")
    return exported


def check_triton_name(name: str) -> None:
    if not _TRITON_NAME.fullmatch(name):
        raise ValueError(f"--triton-name must be a plain directory name (letters, digits, _ . -), got {name!r}")


def _triton_comment(checkpoint: Checkpoint, mean_image_file: str | None) -> str:
    source = os.path.basename(checkpoint.path) if checkpoint.path else "a checkpoint"
    sha = f" (sha256 {checkpoint.sha256[:12]}…)" if checkpoint.sha256 else ""
    mean = None if mean_image_file is None else {"name": mean_image_file}
    return f"Written by python -m {EXPORTED_BY} from {source}{sha}.\n" + _wrap(
        input_description(checkpoint.preprocessing, mean)
    )


def _wrap(text: str, width: int = 100) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])
