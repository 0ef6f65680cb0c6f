"""Export a checkpoint's network to ONNX, for ONNX Runtime, Triton or any other ONNX runtime.

    python -m model.export CHECKPOINT OUT.onnx [--softmax] [--opset N] [--verify]
    python -m model.export CHECKPOINT --triton-repository DIR [--triton-name alexnet] [--max-batch-size 32]

One idea per module: graph (the nodes), metadata (what the file says about itself), onnx_file (building and
writing it), verify (ONNX Runtime against our net), triton (a model repository), cli (the command line).
docs/onnx-format.md describes the file. Needs the ``onnx`` package; ``--verify`` also needs ``onnxruntime``.
"""

from .cli import main
from .errors import ExportError, MissingDependency
from .graph import DEFAULT_OPSET, INPUT_NAME, LOGITS_NAME, MIN_OPSET, PROBABILITIES_NAME, check_opset
from .metadata import FORMAT_NAME, FORMAT_VERSION, input_description, metadata_props, read_metadata
from .onnx_file import Exported, build_model, export, mean_image_path
from .triton import triton_config, write_triton_repository
from .verify import onnxruntime_session, verify_with_onnxruntime

__all__ = [
    "DEFAULT_OPSET",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INPUT_NAME",
    "LOGITS_NAME",
    "MIN_OPSET",
    "PROBABILITIES_NAME",
    "ExportError",
    "Exported",
    "MissingDependency",
    "build_model",
    "check_opset",
    "export",
    "input_description",
    "main",
    "mean_image_path",
    "metadata_props",
    "onnxruntime_session",
    "read_metadata",
    "triton_config",
    "verify_with_onnxruntime",
    "write_triton_repository",
]
