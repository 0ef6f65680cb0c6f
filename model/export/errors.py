"""What can go wrong in an export that is not a bad checkpoint: errors and the optional dependencies."""

from __future__ import annotations

INSTALL_ONNX = "the ONNX export needs the onnx package: pip install -e '.[export]' (or: pip install onnx)"
INSTALL_ONNXRUNTIME = "--verify needs ONNX Runtime: pip install onnxruntime (it is in the dev extra)"


class ExportError(ValueError):
    """A readable checkpoint that this exporter cannot express in ONNX (or whose export did not verify)."""


class MissingDependency(RuntimeError):
    """onnx (or, for --verify, onnxruntime) is not installed; the message says how to install it."""


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependency(INSTALL_ONNX) from None
    return onnx


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency(INSTALL_ONNXRUNTIME) from None
    return onnxruntime
