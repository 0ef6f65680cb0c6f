"""A checkpoint → an ONNX file: the ModelProto built and checked, then written atomically.

The mean image, when there is one, goes beside the model; ``--verify`` runs the file before it is put
in place.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, code_version
from ..files import atomic_path, atomic_write
from .errors import require_onnx, require_onnxruntime
from .graph import BATCH_DIM, DEFAULT_OPSET, INPUT_NAME, OnnxGraph, check_exportable, check_opset, output_name
from .metadata import input_description, metadata_props
from .verify import verify_with_onnxruntime

MEAN_IMAGE_SUFFIX = ".mean_image.npy"


def build_model(
    checkpoint: Checkpoint,
    *,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    mean_image_file: dict | None = None,
):
    """The checkpoint's net as an ``onnx.ModelProto`` (checked with ``onnx.checker``), metadata included.

    ``mean_image_file``: {"name", "sha256", "shape", "dtype"} of the mean image written beside the model,
    recorded in the metadata (``export`` writes it; None when the preprocessing has no mean image)."""
    onnx = require_onnx()
    from onnx import TensorProto, helper

    check_opset(opset)
    check_exportable(checkpoint)
    config = checkpoint.config
    graph = OnnxGraph(checkpoint)
    graph.layers(softmax)
    size = config.input_size
    proto = helper.make_graph(
        graph.nodes,
        "alexnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, 3, size, size])],
        [helper.make_tensor_value_info(output_name(softmax), TensorProto.FLOAT, [BATCH_DIM, config.num_classes])],
        initializer=graph.initializers,
        doc_string=input_description(checkpoint.preprocessing, mean_image_file),
    )
    opset_imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        proto,
        opset_imports=opset_imports,
        producer_name="alexnet-reference (python -m model.export)",
        producer_version=code_version(),
        doc_string="AlexNet (Krizhevsky, Sutskever, Hinton 2012), the grouped two-tower net. "
        + input_description(checkpoint.preprocessing, mean_image_file),
    )
    # The oldest IR version that carries this opset (onnx's default is its newest, which older runtimes refuse).
    model.ir_version = max(4, helper.find_min_ir_version_for(opset_imports))
    helper.set_model_props(
        model, metadata_props(checkpoint, softmax=softmax, opset=opset, mean_image_file=mean_image_file)
    )
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass
class Exported:
    path: Path
    mean_image_path: Path | None
    opset: int
    input_shape: list
    output_name: str
    max_difference: float | None = None  # with verify: the largest |Δ probability| against our net


def mean_image_path(out: str | os.PathLike) -> Path:
    """Where the mean image goes beside ``out``: alexnet.onnx → alexnet.mean_image.npy."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix else out.name) + MEAN_IMAGE_SUFFIX)


def export(
    checkpoint: Checkpoint,
    out: str | os.PathLike,
    *,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
) -> Exported:
    """Write ``checkpoint`` as ONNX to ``out`` (atomically), and its mean image, if any, beside it."""
    out = Path(out)
    require_onnx()
    if verify:
        require_onnxruntime()
    check_opset(opset)
    check_exportable(checkpoint)  # before writing anything
    mean_path, mean_file, mean_bytes = None, None, None
    if checkpoint.mean_image is not None and checkpoint.preprocessing.mean == "image":
        mean_path = mean_image_path(out)
        array = checkpoint.mean_image.detach().to("cpu", torch.float32).contiguous().numpy()
        buffer = io.BytesIO()
        np.save(buffer, array)
        mean_bytes = buffer.getvalue()
        mean_file = {
            "name": mean_path.name,
            "sha256": hashlib.sha256(mean_bytes).hexdigest(),
            "shape": list(array.shape),
            "dtype": "float32",
            "format": "npy",
        }
    model = build_model(checkpoint, softmax=softmax, opset=opset, mean_image_file=mean_file)
    data = model.SerializeToString()
    del model
    difference = None
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        del data
        if verify:
            difference = verify_with_onnxruntime(tmp, checkpoint)
        if mean_bytes is not None:  # last, so that a failed export writes neither file
            atomic_write(mean_path, mean_bytes)
    size = checkpoint.config.input_size
    return Exported(out, mean_path, opset, [BATCH_DIM, 3, size, size], output_name(softmax), difference)
