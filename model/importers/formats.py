"""Which kind of model file a source is (Caffe or ONNX), and what it appears to be when it is neither."""

from __future__ import annotations

from pathlib import Path

from .caffe import NetParameter, read_caffemodel
from .common import Imported, WeightsError
from .onnx import ModelProto, read_onnx
from .wire import LEN, VARINT, Message, WireError

# What each accepted format looks like, for the message when a file is neither.
FORMATS_EXPECTED = (
    "a Caffe .caffemodel is a protobuf NetParameter (its first byte is usually 0x0a, the net's name, or "
    "0x12, its layers; bvlc_alexnet.caffemodel is 243,862,414 bytes), an ONNX model a protobuf ModelProto "
    "(first byte 0x08, its ir_version; bvlcalexnet-12.onnx is 243,863,787 bytes)"
)
# First bytes of the top-level fields a model file starts with: Caffe name = 1, layers = 2, layer = 100
# (tag 802, varint a2 06); ONNX ir_version = 1 (varint).
PROTOBUF_STARTS = (b"\x0a", b"\x12", b"\xa2\x06", b"\x08")


def describe_content(data: bytes | bytearray | memoryview) -> str | None:
    """What a file that is not a model file appears to be, from its first bytes (None: no idea)."""
    head = bytes(data[:512])
    magic = [
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"GIF8", "a GIF image"),
        (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth file is one: it is not importable)"),
        (b"\x1f\x8b", "gzip-compressed (unpack it first)"),
        (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. a Keras .h5 model)"),
        (b"version https://git-lfs", "a Git LFS pointer, not the file itself (git lfs pull, or download the URL)"),
    ]
    for prefix, what in magic:
        if head.startswith(prefix):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (e.g. a PyTorch state dict: it is not importable)"
    if len(head) > 10 and head[8:10] == b'{"':
        return "a safetensors file (if it is a checkpoint already, serve it: ALEXNET_CHECKPOINT=…)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith("<"):
        return "an HTML or XML text (a web page saved instead of the file?)"
    return "a text file" if text.strip() else None


def _not_a_model(data, problem: str) -> str:
    what = describe_content(data)
    return (
        f"neither a Caffe .caffemodel nor an ONNX model ({f'it looks like {what}' if what else problem}): "
        + FORMATS_EXPECTED
    )


def detect_format(top: Message, name: str) -> str:
    """"caffe" or "onnx", by extension, else by which top-level fields are present."""
    suffix = Path(name).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".caffemodel", ".binaryproto"):
        return "caffe"
    wire_type = {number: entries[0][0] for number, entries in top.fields.items()}
    # ONNX: ir_version (varint), graph (message). Caffe: name = 1 (a string: LEN), layers, layer.
    if wire_type.get(ModelProto.GRAPH) == LEN or wire_type.get(ModelProto.IR_VERSION) == VARINT:
        return "onnx"
    if NetParameter.LAYER in top or NetParameter.LAYERS in top:
        return "caffe"
    raise WeightsError(
        _not_a_model(top.buf, "a protobuf message without the fields of either") + "; pass --format if it is one"
    )


def parse(data: bytes | bytearray | memoryview, format: str = "auto", name: str = "") -> Imported:
    """Parse a Caffe or ONNX file's bytes into grouped-layout tensors (not yet checked against a config)."""
    try:
        top = Message(data)
        format = detect_format(top, name) if format == "auto" else format
        imported = read_caffemodel(top) if format == "caffe" else read_onnx(top)
    except WireError as e:
        if not bytes(data[:2]).startswith(PROTOBUF_STARTS):  # not even the start of either kind of file
            problem = str(e).removesuffix(": not a protobuf message")
            raise WeightsError(_not_a_model(data, f"its bytes are not a protobuf message: {problem}")) from None
        if format == "auto":
            suffix = Path(name).suffix.lower()
            format = "onnx" if suffix == ".onnx" else "caffe" if suffix in (".caffemodel", ".binaryproto") else format
        what = {"caffe": "Caffe .caffemodel", "onnx": "ONNX model"}.get(format, "Caffe or ONNX model")
        raise WeightsError(
            f"not a readable {what} ({e}): the file is cut short or damaged; download it again"
        ) from None
    return imported
