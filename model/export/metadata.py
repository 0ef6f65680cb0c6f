"""What an exported model says about itself: its input in words and its ``metadata_props``.

docs/onnx-format.md lists the keys.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from ..checkpoint import Checkpoint, code_version
from ..preprocessing import Preprocessing
from .graph import BATCH_DIM, INPUT_NAME, conv1_pads, onnx_lrn_attributes, output_name

FORMAT_NAME = "alexnet-onnx"
FORMAT_VERSION = 1
EXPORTED_BY = "model.export"


def input_description(p: Preprocessing, mean_image_file: dict | None = None) -> str:
    """What the input tensor must be, in one paragraph (the model's doc_string and metadata "input")."""
    if p.mean == "image":
        where = f"the file {mean_image_file['name']}" if mean_image_file else "a separate file"
        mean = f"minus the mean image ({where}: float32 [3, {p.resize}, {p.resize}], same order and scale)"
    else:
        mean = "minus the per-channel mean (" + ", ".join(f"{v:g}" for v in p.mean) + f") in {p.channel_order} order"
    std = "" if tuple(p.std) == (1.0, 1.0, 1.0) else ", divided by (" + ", ".join(f"{v:g}" for v in p.std) + ")"
    return (
        f"Input {INPUT_NAME!r}: float32 [batch, 3, {p.crop}, {p.crop}] (NCHW), the image preprocessed as the "
        f"checkpoint's training did: the shorter side scaled to {p.resize} ({p.resample}, Pillow, antialiased), "
        f"the central {p.resize}x{p.resize} square, channels in {p.channel_order} order, "
        f"pixel values 0-{p.pixel_scale:g}, "
        f"{mean}{std}, then the central {p.crop}x{p.crop} crop (transparent pixels composited onto RGB "
        f"{tuple(p.background)}). Metadata 'preprocessing' holds these values; "
        "model.Preprocessor.from_bytes computes exactly this tensor."
    )


def metadata_props(checkpoint: Checkpoint, *, softmax: bool, opset: int, mean_image_file: dict | None) -> dict:
    meta = checkpoint.metadata()  # architecture, classes, preprocessing, pca, provenance, training
    config = checkpoint.config
    size = config.input_size
    export = {
        "exported_by": EXPORTED_BY,
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": None if checkpoint.path is None else os.path.basename(checkpoint.path),
        "checkpoint_sha256": checkpoint.sha256,
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, 3, size, size], "dtype": "float32"},
        "output": {
            "name": output_name(softmax),
            "shape": [BATCH_DIM, config.num_classes],
            "dtype": "float32",
            "softmax": softmax,
        },
        "lrn": {**onnx_lrn_attributes(config.lrn), "per_tower": not config.lrn_across_towers},
        "conv1_pads": conv1_pads(config.conv1_padding),
        "mean_image_file": mean_image_file,
    }
    props = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    for key in ("classes", "preprocessing", "architecture", "provenance", "pca", "training"):
        props[key] = json.dumps(meta[key], separators=(",", ":"), ensure_ascii=False)
    props["export"] = json.dumps(export, separators=(",", ":"), ensure_ascii=False)
    props["input"] = input_description(checkpoint.preprocessing, mean_image_file)
    return props


def read_metadata(model) -> dict:
    """An exported model's ``metadata_props``, the JSON values parsed (the inverse of ``metadata_props``)."""
    props = {p.key: p.value for p in model.metadata_props}
    return {k: (v if k in ("format", "format_version", "input") else json.loads(v)) for k, v in props.items()}
