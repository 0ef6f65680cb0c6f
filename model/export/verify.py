"""An exported model run in ONNX Runtime against the checkpoint's own net."""

from __future__ import annotations

import os

import torch

from ..checkpoint import Checkpoint
from .errors import ExportError, require_onnxruntime
from .graph import INPUT_NAME, PROBABILITIES_NAME

VERIFY_TOLERANCE = 1e-4  # on probabilities; on logits relative to the largest


def onnxruntime_session(model: str | os.PathLike | bytes):
    """An ONNX Runtime CPU session on an exported model (a path or the serialised bytes)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def verify_with_onnxruntime(model: str | os.PathLike | bytes, checkpoint: Checkpoint, batch: int = 2) -> float:
    """Run the exported model and the checkpoint's net on the same pseudo-random batch (pixel-like values,
    zero-mean, as after the mean is subtracted); raise ExportError if they differ. Returns max |Δp|."""
    session = onnxruntime_session(model)
    size = checkpoint.config.input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).mul_(60.0)
    expected = checkpoint.build_grouped().eval()(x)
    (got,) = session.run(None, {INPUT_NAME: x.numpy()})
    got = torch.from_numpy(got)
    softmax = session.get_outputs()[0].name == PROBABILITIES_NAME
    expected_p = expected.softmax(1)
    got_p = got if softmax else got.softmax(1)
    difference = (got_p - expected_p).abs().max().item()
    problems = []
    if not difference <= VERIFY_TOLERANCE:
        problems.append(f"probabilities differ by up to {difference:.2e}")
    if not softmax:
        relative = ((got - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
        if not relative <= VERIFY_TOLERANCE:
            problems.append(f"logits differ by up to {relative:.2e} of the largest")
    if problems:
        raise ExportError(f"ONNX Runtime's output does not match the net's: {'; '.join(problems)}")
    return difference
