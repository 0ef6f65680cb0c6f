"""Import the published BVLC AlexNet weights: real ImageNet predictions from the paper's net, no training.

    python -m model.import_weights SOURCE --out checkpoints/bvlc_alexnet.safetensors

SOURCE is a path or an http(s) URL of either file (both hold the same weights):
  - Caffe's ``bvlc_alexnet.caffemodel``: a protobuf NetParameter. Old files list their layers in the
    V1 ``layers`` field, newer ones in ``layer``; blob shapes are num/channels/height/width or ``shape``.
  - the ONNX model zoo's ``bvlcalexnet-12.onnx`` (Caffe → Caffe2 → ONNX): a ModelProto whose graph
    initializers are named ``conv1_w_0``, ``conv1_b_0``, … ``fc8_b_0``.

Both are the paper's grouped net in exactly our checkpoint layout: conv weights [out, in/groups, kh, kw]
with conv2, conv4, conv5 in two groups, fully connected weights [out, in] with fc6 reading pool5
flattened as channel, row, column. No tensor is transposed or reordered.

What the weights expect is recorded in the checkpoint, so that model/ and service/ need no special case:
  - 227×227 crops and no conv1 padding (Caffe's geometry; ``conv1_padding="none"``), from the central
    256×256 square of the image;
  - BGR channel order (conv1's input channel 0 is blue), pixels 0–255 minus the per-channel mean
    (B, G, R) = (104.007, 116.669, 122.679), the average of Caffe's ILSVRC-2012 mean image (Caffe trained
    with the full per-pixel mean image; its own examples subtract this average);
  - Caffe's LRN: k=1, α=1e-4 in the α/n convention, n=5, β=0.75, read from the file where it says;
    its windows span all maps of a layer, across the boundary between the groups (towers).

Files are parsed with model/protobuf_wire.py (about a hundred lines) rather than the protobuf and onnx
packages: we need a dozen fields of two schemas, and the field numbers are written down below.
Downloads stream to a temporary file with a progress bar and are checked against the published
checksum; the checkpoint is written atomically, so an error never leaves a partial file at ``--out``.
An existing ``--out`` is replaced only when it is an earlier import: a checkpoint from training (the
default ``--out`` of both is checkpoints/best.safetensors) or any other file is refused, exit status 2,
unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
import sys
import struct
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

import torch

from .checkpoint import Checkpoint, CheckpointError, check_grouped_shapes, load_checkpoint
from .classes import ImageClass, imagenet_classes, parse_synset_words
from .download import ChecksumMismatch, Digests, DownloadError, download, is_url, read_file
from .lrn import CAFFE_LRN, LRNConfig
from .network import LAYER_NAMES, AlexNetConfig
from .preprocessing import Preprocessing
from .protobuf_wire import I64, LEN, VARINT, Message, WireError

# Per-channel mean of Caffe's ilsvrc_2012_mean.npy (the 256×256 ILSVRC-2012 training mean image), in
# B, G, R order: what Caffe's classification example prints and subtracts.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
CAFFE_PREPROCESSING = Preprocessing(
    resize=256, crop=227, channel_order="BGR", pixel_scale=255.0, mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0)
)


@dataclass(frozen=True)
class PublishedFile:
    name: str
    format: str  # "caffe" or "onnx"
    url: str
    size: int
    checksum: tuple[str, str]  # (algorithm, hex digest) as published
    description: str


# The checksums are the publishers' own: the sha1 in Caffe's models/bvlc_alexnet/readme.md, and the
# sha256 that the ONNX model zoo's git-lfs pointer records for the file.
PUBLISHED = (
    PublishedFile(
        "bvlc_alexnet.caffemodel",
        "caffe",
        "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
        243_862_414,
        ("sha1", "9116a64c0fbe4459d18f4bb6b56d647b63920377"),
        "BVLC AlexNet (Caffe model zoo, bvlc_alexnet.caffemodel, iteration 360,000)",
    ),
    PublishedFile(
        "bvlcalexnet-12.onnx",
        "onnx",
        "https://github.com/onnx/models/raw/main/validated/vision/classification/alexnet/model/bvlcalexnet-12.onnx",
        243_863_787,
        ("sha256", "6b0da9510f27f234ee96a85dc3809dd210150fdefad87f6850f9788513216945"),
        "BVLC AlexNet (ONNX model zoo, bvlcalexnet-12.onnx, converted from Caffe via Caffe2)",
    ),
    PublishedFile(
        "bvlcalexnet-9.onnx",
        "onnx",
        "https://github.com/onnx/models/raw/main/validated/vision/classification/alexnet/model/bvlcalexnet-9.onnx",
        243_863_542,
        ("sha256", "ef3c82dad5c512f969dbf701fe35c0b3feb1585687d541f765eb68730c0a8af7"),
        "BVLC AlexNet (ONNX model zoo, bvlcalexnet-9.onnx, converted from Caffe via Caffe2)",
    ),
)
PUBLISHED_BY_NAME = {p.name: p for p in PUBLISHED}

# Caffe's published figures for bvlc_alexnet (ILSVRC-2012 val, single centre crop): 57.1% / 80.2% accuracy.
PUBLISHED_VAL_ERRORS = {"val_top1_error": 0.429, "val_top5_error": 0.198}
PUBLISHED_VAL_NOTE = (
    "Caffe's published figures for bvlc_alexnet: ILSVRC-2012 val, single centre 227 crop, images warped "
    "to 256x256 minus the per-pixel mean image; not measured by this project"
)

# Stride, padding and groups of each convolution in the paper's net (kernel sizes follow from the shapes).
CONV_GEOMETRY = {
    "conv1": (4, 0, 1),
    "conv2": (1, 2, 2),
    "conv3": (1, 1, 1),
    "conv4": (1, 1, 2),
    "conv5": (1, 1, 2),
}


class WeightsError(ValueError):
    """The source is readable but is not the AlexNet we can import (format, layers, shapes, settings)."""


class OverwriteRefused(Exception):
    """--out already holds something that importing must not silently replace (a trained checkpoint)."""


@dataclass
class Imported:
    """What a parser found: grouped-layout tensors named conv1.weight … fc8.bias, and settings."""

    tensors: dict[str, torch.Tensor]
    lrn: LRNConfig | None  # None when the file does not record it
    format: str  # e.g. "caffe (V1 layers)"
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Caffe: NetParameter { layer = 100 (LayerParameter); layers = 2 (V1LayerParameter) }
#   LayerParameter   { name = 1; type = 2 (string); blobs = 7; convolution_param = 106; lrn_param = 118 }
#   V1LayerParameter { name = 4; type = 5 (enum); blobs = 6; convolution_param = 10; lrn_param = 18 }
#   BlobProto  { num = 1; channels = 2; height = 3; width = 4; data = 5 (float); shape = 7; double_data = 8 }
#   BlobShape  { dim = 1 (int64) }
#   ConvolutionParameter { pad = 3; kernel_size = 4; group = 5; stride = 6; pad_h = 9; pad_w = 10;
#                          stride_h = 13; stride_w = 14 }
#   LRNParameter { local_size = 1 (5); alpha = 2 (1.0); beta = 3 (0.75); norm_region = 4 (0); k = 5 (1.0) }
# ---------------------------------------------------------------------------------------------------

V1_LAYER_TYPES = {4: "Convolution", 14: "InnerProduct", 15: "LRN", 17: "Pooling"}  # the V1 enum values we use


@dataclass
class _CaffeLayer:
    name: str
    type: str
    blobs: list[Message]
    conv: Message | None
    lrn: Message | None


def read_caffemodel(top: Message) -> Imported:
    layers = [
        _CaffeLayer(m.string(1, ""), m.string(2, ""), m.messages(7), m.message(106), m.message(118))
        for m in top.messages(100)
    ]
    v1 = [
        _CaffeLayer(
            m.string(4, ""), V1_LAYER_TYPES.get(m.varint(5, 0), f"V1 type {m.varint(5, 0)}"),
            m.messages(6), m.message(10), m.message(18),
        )
        for m in top.messages(2)
    ]
    if not layers and not v1:
        raise WeightsError("no layers (neither 'layer' nor the old 'layers' field): not a Caffe model")
    kind = "layer" if layers and not v1 else "V1 layers" if v1 and not layers else "layer + V1 layers"
    all_layers = layers + v1
    _check_lrn_before_pool([layer.type for layer in all_layers], "Pooling")

    tensors = {}
    for name in LAYER_NAMES:
        found = [layer for layer in all_layers if layer.name == name and layer.blobs]
        if not found:
            continue  # reported with every other missing tensor by the shape check
        if len(found) > 1:
            raise WeightsError(f"layer {name} appears {len(found)} times with weights")
        layer = found[0]
        expected_type = "Convolution" if name.startswith("conv") else "InnerProduct"
        if layer.type != expected_type:
            raise WeightsError(f"layer {name} is a {layer.type} layer, expected {expected_type}")
        if len(layer.blobs) != 2:
            raise WeightsError(f"layer {name} has {len(layer.blobs)} blobs, expected 2 (weights and bias)")
        weight_rank = 4 if name.startswith("conv") else 2
        tensors[f"{name}.weight"] = _squeeze_to(_blob(layer.blobs[0], f"{name} weights"), weight_rank)
        tensors[f"{name}.bias"] = _squeeze_to(_blob(layer.blobs[1], f"{name} bias"), 1)
        if layer.conv is not None:
            _check_caffe_conv(name, layer.conv)

    lrns = [_caffe_lrn(layer) for layer in all_layers if layer.type == "LRN" and layer.lrn is not None]
    return Imported(tensors, _one_lrn(lrns), f"caffe ({kind})")


def _blob(blob: Message, what: str) -> torch.Tensor:
    shape_message = blob.message(7)
    if shape_message is not None:
        shape = shape_message.varints(1)
    else:  # the 4-D form of older files; Caffe pads missing leading axes with 1
        shape = [blob.varint(number, 0) for number in (1, 2, 3, 4)]
    if blob.count(5):
        values = blob.floats(5)
    elif blob.count(8, I64):
        values = blob.doubles(8)
    else:
        values = array("f")
    return _tensor(values, shape, what)


def _squeeze_to(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Drop leading axes of size 1 (old Caffe stores fc weights as 1×1×out×in, biases as 1×1×1×n)."""
    while tensor.dim() > rank and tensor.shape[0] == 1:
        tensor = tensor[0]
    return tensor


def _check_caffe_conv(name: str, conv: Message) -> None:
    stride, pad, groups = CONV_GEOMETRY[name]
    strides = [conv.varint(13), conv.varint(14)] if 13 in conv or 14 in conv else conv.varints(6) or [1]
    pads = [conv.varint(9, 0), conv.varint(10, 0)] if 9 in conv or 10 in conv else conv.varints(3) or [0]
    _check_geometry(name, strides, pads, conv.varint(5, 1), stride, pad, groups)


def _caffe_lrn(layer: _CaffeLayer) -> LRNConfig:
    p = layer.lrn
    if p.varint(4, 0) != 0:
        raise WeightsError(f"layer {layer.name} normalises within channels; AlexNet's LRN is across channels")
    return LRNConfig(
        size=p.varint(1, 5),
        alpha=_shortest(p.float32(2, 1.0)),
        beta=_shortest(p.float32(3, 0.75)),
        k=_shortest(p.float32(5, 1.0)),
        alpha_over_size=True,  # Caffe divides α by the window size
    )


# ---------------------------------------------------------------------------------------------------
# ONNX: ModelProto { ir_version = 1; graph = 7 }   GraphProto { node = 1; initializer = 5 }
#   TensorProto { dims = 1; data_type = 2; float_data = 4; name = 8; raw_data = 9 (little-endian);
#                 double_data = 10; external_data = 13; data_location = 14 }   data_type FLOAT = 1,
#                 FLOAT16 = 10, DOUBLE = 11
#   NodeProto { input = 1; op_type = 4; attribute = 5 }
#   AttributeProto { name = 1; f = 2; i = 3; ints = 8 }
# ---------------------------------------------------------------------------------------------------

ONNX_FLOAT, ONNX_FLOAT16, ONNX_DOUBLE = 1, 10, 11


def read_onnx(top: Message) -> Imported:
    graph = top.message(7)
    if graph is None:
        raise WeightsError("no graph: not an ONNX model")
    initializers = {}
    for tensor in graph.messages(5):
        initializers[tensor.string(8, "")] = tensor
    nodes = graph.messages(1)
    op_types = [node.string(4, "") for node in nodes]
    _check_lrn_before_pool(op_types, "MaxPool")

    tensors = {}
    for name in LAYER_NAMES:
        for kind, suffix in (("weight", "w"), ("bias", "b")):
            tensor = initializers.get(f"{name}_{suffix}_0")
            if tensor is not None:
                tensors[f"{name}.{kind}"] = _onnx_tensor(tensor, f"{name}_{suffix}_0")

    lrns, notes = [], []
    for node, op_type in zip(nodes, op_types):
        attributes = {a.string(1, ""): a for a in node.messages(5)}
        inputs = node.strings(1)
        layer = inputs[1][: -len("_w_0")] if len(inputs) > 1 and inputs[1].endswith("_w_0") else None
        if op_type == "LRN":
            lrns.append(_onnx_lrn(attributes))
        elif op_type == "Conv" and layer in CONV_GEOMETRY:
            stride, pad, groups = CONV_GEOMETRY[layer]
            strides = _ints(attributes.get("strides")) or [1]
            pads = _ints(attributes.get("pads")) or [0]
            group = _int(attributes.get("group"), 1)
            _check_geometry(layer, strides, pads, group, stride, pad, groups)
        elif op_type == "Gemm" and layer in LAYER_NAMES and f"{layer}.weight" in tensors:
            if _int(attributes.get("transA"), 0) or _float(attributes.get("alpha"), 1.0) != 1.0:
                raise WeightsError(f"{layer}: Gemm with transA or alpha != 1 is not a plain fully connected layer")
            if _float(attributes.get("beta"), 1.0) != 1.0:
                raise WeightsError(f"{layer}: Gemm with beta != 1 is not a plain fully connected layer")
            if not _int(attributes.get("transB"), 0):  # weights stored [in, out]
                tensors[f"{layer}.weight"] = tensors[f"{layer}.weight"].t().contiguous()
                notes.append(f"{layer} weights transposed (Gemm transB=0)")
    return Imported(tensors, _one_lrn(lrns), "onnx", notes)


def _onnx_tensor(tensor: Message, name: str) -> torch.Tensor:
    if 13 in tensor or tensor.varint(14, 0) == 1:
        raise WeightsError(f"initializer {name} is stored in an external file; only self-contained models are read")
    shape, data_type = tensor.varints(1), tensor.varint(2, 0)
    raw = tensor.bytes(9)
    if data_type == ONNX_FLOAT:
        values = _le_array(raw, "f", name) if raw is not None else tensor.floats(4)
    elif data_type == ONNX_DOUBLE:
        values = _le_array(raw, "d", name) if raw is not None else tensor.doubles(10)
    elif data_type == ONNX_FLOAT16 and raw is not None:
        return _tensor(_le_array(raw, "H", name), shape, name, torch.float16)
    else:
        raise WeightsError(f"initializer {name} has ONNX data type {data_type}; expected float32, float16 or double")
    return _tensor(values, shape, name)


def _onnx_lrn(attributes: dict[str, Message]) -> LRNConfig:
    size = _int(attributes.get("size"), None)
    if size is None:
        raise WeightsError("an LRN node has no size attribute")
    return LRNConfig(
        size=size,
        alpha=_shortest(_float(attributes.get("alpha"), 1e-4)),
        beta=_shortest(_float(attributes.get("beta"), 0.75)),
        k=_shortest(_float(attributes.get("bias"), 1.0)),
        alpha_over_size=True,  # ONNX divides α by the window size, as Caffe does
    )


def _int(attribute: Message | None, default):
    return default if attribute is None else attribute.varint(3, default)


def _float(attribute: Message | None, default: float) -> float:
    return default if attribute is None else attribute.float32(2, default)


def _ints(attribute: Message | None) -> list[int]:
    return [] if attribute is None else attribute.varints(8)


# ---------------------------------------------------------------------------------------------------
# Shared checks and conversions
# ---------------------------------------------------------------------------------------------------


def _tensor(values: array, shape: list[int], what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if any(d < 0 for d in shape):
        raise WeightsError(f"{what} has a negative dimension in its shape {shape}")
    if len(values) != math.prod(shape):
        raise WeightsError(f"{what} holds {len(values):,} values, but its shape {shape} needs {math.prod(shape):,}")
    if not len(values):
        return torch.zeros(shape)
    dtype = dtype or {"f": torch.float32, "d": torch.float64}[values.typecode]
    # frombuffer shares the array's memory (and keeps it alive): no further copy of 244 MB.
    return torch.frombuffer(values, dtype=dtype).reshape(shape).float()


def _le_array(raw, typecode: str, what: str) -> array:
    values = array(typecode)
    if len(raw) % values.itemsize:
        raise WeightsError(f"{what}: raw data of {len(raw)} bytes is not a whole number of {values.itemsize}-byte values")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _check_geometry(name, strides, pads, group, stride, pad, groups) -> None:
    found = (sorted(set(strides)), sorted(set(pads)), group)
    if found != ([stride], [pad], groups):
        raise WeightsError(
            f"{name} has stride {strides}, padding {pads}, {group} group(s); the paper's {name} has stride "
            f"{stride}, padding {pad}, {groups} group(s)"
        )


def _check_lrn_before_pool(layer_types: list[str], pool_type: str) -> None:
    """AlexNet normalises, then pools; CaffeNet (bvlc_reference_caffenet, same names and shapes) pools first."""
    if "LRN" in layer_types and pool_type in layer_types:
        if layer_types.index(pool_type) < layer_types.index("LRN"):
            raise WeightsError(
                "this net pools before it normalises (CaffeNet's order, as in bvlc_reference_caffenet); "
                "AlexNet normalises first. The weights would not work in this network"
            )


def _one_lrn(lrns: list[LRNConfig]) -> LRNConfig | None:
    if len(set(lrns)) > 1:
        raise WeightsError(f"the two LRN layers differ ({sorted(set(lrns), key=str)}); this network has one setting")
    return lrns[0] if lrns else None


def _shortest(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-4, not 9.99999974737875e-05)."""
    bits = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == bits:
            return candidate
    return value


# What each accepted format looks like, for the message when a file is neither.
FORMATS_EXPECTED = (
    "a Caffe .caffemodel is a protobuf NetParameter (its first byte is usually 0x0a, the net's name, or "
    "0x12, its layers; bvlc_alexnet.caffemodel is 243,862,414 bytes), an ONNX model a protobuf ModelProto "
    "(first byte 0x08, its ir_version; bvlcalexnet-12.onnx is 243,863,787 bytes)"
)
# First bytes of the top-level fields a model file starts with: Caffe name = 1, layers = 2, layer = 100
# (tag 802, varint a2 06); ONNX ir_version = 1 (varint).
_PROTOBUF_STARTS = (b"\x0a", b"\x12", b"\xa2\x06", b"\x08")


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
    # ONNX: ir_version = 1 (varint), graph = 7 (message). Caffe: name = 1 (string), layers = 2, layer = 100.
    if wire_type.get(7) == LEN or wire_type.get(1) == VARINT:
        return "onnx"
    if 100 in top or 2 in top:
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
        if not bytes(data[:2]).startswith(_PROTOBUF_STARTS):  # not even the start of either kind of file
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


def to_checkpoint(
    imported: Imported,
    *,
    provenance: dict,
    classes: tuple[ImageClass, ...] | None = None,
) -> Checkpoint:
    """Fit the tensors to an AlexNetConfig (classes and width from fc8 and conv1) and wrap them up."""
    tensors = imported.tensors
    if "conv1.weight" not in tensors or "fc8.weight" not in tensors:
        missing = [k for k in ("conv1.weight", "fc8.weight") if k not in tensors]
        raise WeightsError(f"missing {', '.join(missing)}: not an AlexNet (expected layers {', '.join(LAYER_NAMES)})")
    num_classes = tensors["fc8.weight"].shape[0]
    width = tensors["conv1.weight"].shape[0] / 96
    try:
        # Caffe normalises over all of a layer's maps, across the boundary between the two groups.
        config = AlexNetConfig(num_classes, width, "none", imported.lrn or CAFFE_LRN, lrn_across_towers=True)
        check_grouped_shapes(tensors, config, "the weights")
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if classes is None:
        if num_classes != 1000:
            raise WeightsError(f"fc8 has {num_classes} outputs, not ImageNet's 1000: pass --classes")
        classes = imagenet_classes()
    if len(classes) != num_classes:
        raise WeightsError(f"{len(classes)} classes given for a net with {num_classes} outputs")
    for name, tensor in tensors.items():
        if not all(torch.isfinite(v) for v in torch.aminmax(tensor)):  # NaN propagates into min and max
            raise WeightsError(f"{name} holds NaN or infinite values")
    provenance = {
        **provenance,
        "source_format": imported.format,
        "lrn_from": "the file" if imported.lrn else "not recorded in the file; Caffe's constants assumed",
    }
    if imported.notes:
        provenance["import_notes"] = imported.notes
    return Checkpoint(
        config=config,
        state_dict={k: tensors[k].contiguous() for k in config.grouped_shapes()},
        classes=classes,
        preprocessing=CAFFE_PREPROCESSING,
        provenance=provenance,
    )


TRAINING_SOURCE = "python -m training train"  # a training checkpoint's provenance["source"]
IMPORTED_BY = "model.import_weights"  # an imported checkpoint's provenance["imported_by"]


def check_out(out: str | Path, force: bool = False) -> str | None:
    """May an import write ``out``? Nothing there, an earlier import, or ``force``: yes (returns what is
    replaced, None for nothing). A checkpoint from training, of unknown origin, or a file that is not a
    readable checkpoint: OverwriteRefused, naming the file, what it holds, and --force."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return None
    try:
        checkpoint = load_checkpoint(out)
    except CheckpointError as e:
        what = f"a file that is not a readable checkpoint ({e.problem})"
        try:
            with open(out, "rb") as f:
                looks = describe_content(f.read(512))
        except OSError:
            looks = None
        if looks:
            what += f"; it looks like {looks}"
    else:
        p = checkpoint.provenance
        if p.get("imported_by") == IMPORTED_BY:
            return f"an earlier import (of {p.get('source_name') or p.get('source')})"
        what = describe_checkpoint(p)
    if force:
        return what
    raise OverwriteRefused(
        f"{out} holds {what}; importing would replace it. Pass --force to overwrite it, or choose another --out "
        "(an earlier import is replaced without --force)"
    )


def describe_checkpoint(provenance: dict) -> str:
    """e.g. "a checkpoint trained by `python -m training train`, epoch 12, val top-1 error 41.2%"."""
    source = provenance.get("source")
    parts = [f"a checkpoint trained by `{source}`" if source == TRAINING_SOURCE else
             f"a checkpoint of unknown origin (source: {source})" if source else "a checkpoint of unknown origin"]
    if provenance.get("dataset"):
        parts[0] += f" on {provenance['dataset']}"
    if isinstance(provenance.get("epoch"), (int, float)):
        parts.append(f"epoch {provenance['epoch']:g}")
    if isinstance(provenance.get("val_top1_error"), (int, float)):
        parts.append(f"val top-1 error {provenance['val_top1_error']:.1%}")
    return ", ".join(parts)


def published_match(digests: Digests) -> PublishedFile | None:
    return next((p for p in PUBLISHED if getattr(digests, p.checksum[0]) == p.checksum[1]), None)


def import_weights(
    source: str,
    out: str | Path,
    *,
    format: str = "auto",
    expected: dict[str, str] | None = None,
    allow_unverified: bool = False,
    classes: tuple[ImageClass, ...] | None = None,
    progress: TextIO | None = sys.stderr,
    timeout: float = 60.0,
    force: bool = False,
) -> Checkpoint:
    """Convert ``source`` (path or URL) into a checkpoint at ``out``; return it.

    ``expected`` ({"sha1"|"sha256": hex}) is checked when given; otherwise a file named like a published
    one (bvlc_alexnet.caffemodel, bvlcalexnet-12.onnx) is checked against the published checksum, and a
    download of any other file is refused unless ``allow_unverified``. Raises DownloadError (network),
    ChecksumMismatch, FileNotFoundError or WeightsError; ``out`` is written only on success.

    An existing ``out`` is replaced only when it is an earlier import, or with ``force``: a checkpoint from
    training (or anything else) raises OverwriteRefused, before anything is downloaded (see ``check_out``).
    """
    check_out(out, force)
    url = source if is_url(source) else None
    name = Path(unquote(urlsplit(source).path) if url else source).name
    known = PUBLISHED_BY_NAME.get(name)
    if expected:
        verify_with, verified_by = expected, "checksum given on the command line"
    elif known is not None:
        verify_with, verified_by = dict([known.checksum]), f"published {known.checksum[0]}"
    elif url and not allow_unverified:
        raise ChecksumMismatch(
            f"{source}: no published checksum is known for {name!r}; pass --expected-sha256 or --expected-sha1 "
            "(or --allow-unverified)"
        )
    else:
        verify_with, verified_by = {}, None

    if url:
        with tempfile.TemporaryDirectory(prefix="alexnet-import-") as tmp:
            path = Path(tmp) / (name or "download")
            digests = download(url, path, progress=progress, timeout=timeout)
            digests.verify(verify_with, name)
            data = path.read_bytes()
    else:
        data, digests = read_file(source)
        digests.verify(verify_with, name)

    try:
        imported = parse(data, format, name)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    del data  # the tensors own copies; free the file's 244 MB before writing the checkpoint

    match = published_match(digests)
    provenance = {
        "trained": True,
        "source": source if url else str(Path(source).resolve()),
        "source_name": match.description if match else name,
        "source_bytes": digests.size,
        "source_sha1": digests.sha1,
        "source_sha256": digests.sha256,
        "source_verified": verified_by or "not verified (no checksum known or given)",
        "imported_by": "model.import_weights",
    }
    if match:
        provenance.update(
            dataset="ILSVRC-2012", dataset_size=1_281_167, **PUBLISHED_VAL_ERRORS, val_errors_note=PUBLISHED_VAL_NOTE
        )
    try:
        checkpoint = to_checkpoint(imported, provenance=provenance, classes=classes)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    replaced = check_out(out, force)  # again: training may have written it meanwhile
    checkpoint.save(out)
    if replaced and progress is not None:
        print(f"replaced {out}: {replaced}", file=progress)
    checkpoint.path = str(out)
    return checkpoint


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m model.import_weights",
        description="Convert the published BVLC AlexNet weights (Caffe .caffemodel or ONNX model zoo .onnx) "
        "into this project's checkpoint format.",
        epilog="Published sources: "
        + "; ".join(f"{p.url} ({p.checksum[0]} {p.checksum[1][:12]}…)" for p in PUBLISHED)
        + ". Exit status: 0 written, 1 the source is unusable (checksum, format, shapes), 2 usage, or --out "
        "holds a checkpoint that is not an earlier import (see --force), 3 download failed (network).",
    )
    parser.add_argument("source", help="path or http(s) URL of bvlc_alexnet.caffemodel or bvlcalexnet-12.onnx")
    parser.add_argument("--out", required=True, type=Path,
                        help="checkpoint to write (.safetensors), atomically. An existing file there is replaced "
                        "only when it is an earlier import; a checkpoint from training (e.g. "
                        "checkpoints/best.safetensors after `python -m training train`) or any other file is "
                        "refused (exit status 2) unless --force")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even when it holds a trained checkpoint or another file")
    parser.add_argument("--format", choices=("auto", "caffe", "onnx"), default="auto",
                        help="source format (default: from the extension, else from the content)")
    parser.add_argument("--expected-sha1", metavar="HEX", help="check the source against this sha1")
    parser.add_argument("--expected-sha256", metavar="HEX", help="check the source against this sha256")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="download a URL even when no checksum is known or given")
    parser.add_argument("--classes", type=Path, metavar="FILE",
                        help="class list, 'wnid names' per line (default: the 1000 ImageNet classes)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    expected = {k: v for k, v in (("sha1", args.expected_sha1), ("sha256", args.expected_sha256)) if v}
    try:
        classes = parse_synset_words(args.classes.read_text(encoding="utf-8")) if args.classes else None
        checkpoint = import_weights(
            args.source,
            args.out,
            format=args.format,
            expected=expected or None,
            allow_unverified=args.allow_unverified,
            classes=classes,
            progress=None if args.quiet else sys.stderr,
            timeout=args.timeout,
            force=args.force,
        )
    except OverwriteRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DownloadError as e:
        print(f"error: download failed: {e}", file=sys.stderr)
        return 3
    except (ChecksumMismatch, WeightsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    p = checkpoint.provenance
    parameters = sum(t.numel() for t in checkpoint.state_dict.values())
    print(
        f"wrote {args.out}: AlexNet, {checkpoint.config.num_classes} classes, {parameters:,} parameters, "
        f"from {p['source_name']} ({p['source_format']}; sha256 {p['source_sha256'][:12]}…, {p['source_verified']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
