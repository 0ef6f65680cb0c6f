"""Caffe and ONNX files with the published AlexNet's layer names, field numbers and blob shapes (random
weights), for the weight-import and export tests, and the reference logits they must give.

The small protobuf *writer* here is written from caffe.proto / onnx.proto independently of the importer's
reader, so a wrong field number on either side makes the tests fail rather than cancel out. The expected
logits come from a plain torch.nn.functional forward pass with Caffe's preprocessing done by hand.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from model import importers as iw

# ----------------------------------------------------------------------------------------- protobuf writer


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64: ten-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Chunks(tuple):
    """Serialized protobuf as a tuple of byte strings: nesting a 151 MB fc6 blob copies nothing."""

    def __add__(self, other):
        return cat(self, other)

    def __radd__(self, other):
        return cat(other, self)

    @property
    def size(self) -> int:
        return sum(map(len, self))

    def encode(self) -> bytes:
        return b"".join(self)


def cat(*parts) -> Chunks:
    return Chunks(c for part in parts for c in (part if isinstance(part, Chunks) else (part,)))


def f_varint(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def f_bytes(number: int, payload: bytes | str | Chunks) -> Chunks:
    payload = payload.encode() if isinstance(payload, str) else payload
    size = payload.size if isinstance(payload, Chunks) else len(payload)
    return cat(varint(number << 3 | 2) + varint(size), payload)


def f_float(number: int, value: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", value)


def f_packed_varints(number: int, values) -> bytes:
    return f_bytes(number, b"".join(varint(v) for v in values))


def f32_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().float().numpy().tobytes()  # little-endian on our machines


# ----------------------------------------------------------------------------------------- the net's shapes

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
PAPER_WIDTHS = (96, 256, 384, 384, 256, 4096, 4096)


def alexnet_shapes(scale: int = 1, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Weight shapes of Caffe's bvlc_alexnet (scale=1), or with every width divided by ``scale``."""
    c1, c2, c3, c4, c5, f6, f7 = (c // scale for c in PAPER_WIDTHS)
    return {
        "conv1": (c1, 3, 11, 11),
        "conv2": (c2, c1 // 2, 5, 5),  # groups=2
        "conv3": (c3, c2, 3, 3),
        "conv4": (c4, c3 // 2, 3, 3),  # groups=2
        "conv5": (c5, c4 // 2, 3, 3),  # groups=2
        "fc6": (f6, c5 * 6 * 6),
        "fc7": (f7, f6),
        "fc8": (classes, f7),
    }


def random_weights(shapes, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """He-scaled so that activations neither vanish nor explode through eight layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        fan_in = math.prod(shape[1:])
        weight = torch.randn(shape, generator=g).mul_(math.sqrt(2.0 / fan_in))
        bias = torch.randn(shape[0], generator=g).mul_(0.1)
        out[name] = (weight, bias)
    return out


GEOMETRY = {"conv1": (4, 0, 1), "conv2": (1, 2, 2), "conv3": (1, 1, 1), "conv4": (1, 1, 2), "conv5": (1, 1, 2)}
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # Caffe's ilsvrc_2012_mean.npy averaged per channel


def reference_logits(weights, image_rgb_uint8: torch.Tensor) -> torch.Tensor:
    """Caffe's bvlc_alexnet forward, by hand: BGR, minus the mean, centre 227 crop, groups=2, Caffe LRN."""
    x = image_rgb_uint8.float()[[2, 1, 0]]  # RGB → BGR
    x = x - torch.tensor(BGR_MEAN).view(3, 1, 1)
    top = (x.shape[-1] - 227) // 2  # Caffe's test-time crop offset: (256 - 227) / 2 = 14
    x = x[:, top : top + 227, top : top + 227].unsqueeze(0)

    def conv(x, name):
        stride, pad, groups = GEOMETRY[name]
        return F.relu(F.conv2d(x, *weights[name], stride=stride, padding=pad, groups=groups))

    def lrn(x):  # Caffe: k + (alpha / n) * sum of squares, as F.local_response_norm computes it
        return F.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=1.0)

    def pool(x):
        return F.max_pool2d(x, kernel_size=3, stride=2)

    x = pool(lrn(conv(x, "conv1")))
    x = pool(lrn(conv(x, "conv2")))
    x = pool(conv(conv(conv(x, "conv3"), "conv4"), "conv5"))
    x = F.relu(F.linear(x.flatten(1), *weights["fc6"]))
    x = F.relu(F.linear(x, *weights["fc7"]))
    return F.linear(x, *weights["fc8"])


# ----------------------------------------------------------------------------------------- Caffe files

# V1LayerParameter.LayerType values (caffe.proto)
V1 = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14, "Dropout": 6,
      "SoftmaxWithLoss": 21, "Accuracy": 1}


def caffe_layer_list(weights, pool_first=False):
    """bvlc_alexnet's train_val layers in order: (name, type, blobs or None, params)."""
    layers = [("data", "Data", None)]
    for i, name in enumerate(LAYERS[:5], 1):
        layers += [(name, "Convolution", weights.get(name)), (f"relu{i}", "ReLU", None)]
        if i in (1, 2):
            norm_pool = [(f"norm{i}", "LRN", None), (f"pool{i}", "Pooling", None)]
            layers += norm_pool[::-1] if pool_first else norm_pool
        if i == 5:
            layers.append(("pool5", "Pooling", None))
    for i, name in ((6, "fc6"), (7, "fc7"), (8, "fc8")):
        layers.append((name, "InnerProduct", weights.get(name)))
        if i < 8:
            layers += [(f"relu{i}", "ReLU", None), (f"drop{i}", "Dropout", None)]
    layers += [("accuracy", "Accuracy", None), ("loss", "SoftmaxWithLoss", None)]
    return layers


def blob_4d(tensor: torch.Tensor) -> bytes:
    """BlobProto in the old num/channels/height/width form: fc weights 1×1×out×in, biases 1×1×1×n."""
    dims = [1] * (4 - tensor.dim()) + list(tensor.shape)
    fields = b"".join(f_varint(number, d) for number, d in zip((1, 2, 3, 4), dims))
    return fields + f_bytes(5, f32_bytes(tensor))


def blob_shape(tensor: torch.Tensor) -> bytes:
    """BlobProto with BlobShape (field 7, dims packed int64)."""
    return f_bytes(7, f_packed_varints(1, tensor.shape)) + f_bytes(5, f32_bytes(tensor))


def conv_param(name: str, num_output: int) -> bytes:
    stride, pad, group = GEOMETRY[name]
    kernel = {"conv1": 11, "conv2": 5}.get(name, 3)
    out = f_varint(1, num_output) + f_varint(4, kernel)
    if pad:
        out += f_varint(3, pad)
    if group != 1:
        out += f_varint(5, group)
    if stride != 1:
        out += f_varint(6, stride)
    return out


LRN_PARAM = f_varint(1, 5) + f_float(2, 1e-4) + f_float(3, 0.75)  # k left at its default, 1


def caffemodel(weights, *, v1: bool, blob=blob_4d, pool_first=False) -> bytes:
    """A NetParameter: V1 ``layers`` (field 2) or ``layer`` (field 100), real names, types and params."""
    out = [f_bytes(1, "AlexNet")]
    for name, kind, params in caffe_layer_list(weights, pool_first):
        if v1:  # V1LayerParameter: name 4, type 5 (enum), blobs 6, convolution_param 10, lrn_param 18
            fields = f_bytes(4, name) + f_varint(5, V1[kind])
            conv_field, lrn_field, blobs_field = 10, 18, 6
        else:  # LayerParameter: name 1, type 2, blobs 7, convolution_param 106, lrn_param 118
            fields = f_bytes(1, name) + f_bytes(2, kind)
            conv_field, lrn_field, blobs_field = 106, 118, 7
        if params is not None:
            fields += cat(*(f_bytes(blobs_field, blob(t)) for t in params))
            if kind == "Convolution":
                fields += f_bytes(conv_field, conv_param(name, params[0].shape[0]))
        if kind == "LRN":
            fields += f_bytes(lrn_field, LRN_PARAM)
        out.append(f_bytes(2 if v1 else 100, fields))
    return cat(*out).encode()


# ----------------------------------------------------------------------------------------- ONNX files


def onnx_attribute(name: str, *, i=None, f=None, ints=None) -> bytes:
    # AttributeProto: name 1, f 2, i 3, ints 8, type 20 (FLOAT 1, INT 2, INTS 7)
    out = f_bytes(1, name)
    if f is not None:
        out += f_float(2, f) + f_varint(20, 1)
    if i is not None:
        out += f_varint(3, i) + f_varint(20, 2)
    if ints is not None:
        out += b"".join(f_varint(8, v) for v in ints) + f_varint(20, 7)  # unpacked, as onnx writes proto2
    return out


def onnx_node(op_type: str, inputs, outputs, **attributes) -> bytes:
    # NodeProto: input 1, output 2, name 3, op_type 4, attribute 5
    out = cat(*(f_bytes(1, s) for s in inputs), *(f_bytes(2, s) for s in outputs), f_bytes(4, op_type))
    return out + cat(*(f_bytes(5, onnx_attribute(k, **v)) for k, v in attributes.items()))


def onnx_initializer(name: str, tensor: torch.Tensor, raw: bool = True) -> bytes:
    # TensorProto: dims 1, data_type 2 (FLOAT = 1), float_data 4 (packed), name 8, raw_data 9
    out = b"".join(f_varint(1, d) for d in tensor.shape) + f_varint(2, 1) + f_bytes(8, name)
    return out + (f_bytes(9, f32_bytes(tensor)) if raw else f_bytes(4, f32_bytes(tensor)))


def onnx_model(weights, *, raw=True, fc7_transposed=False) -> bytes:
    """bvlcalexnet-12.onnx's structure: Caffe2-converted graph, initializers conv1_w_0 … fc8_b_0."""
    nodes, x = [], "data_0"
    for i, name in enumerate(LAYERS[:5], 1):
        stride, pad, group = GEOMETRY[name]
        attrs = {"strides": {"ints": [stride] * 2}, "pads": {"ints": [pad] * 4}}
        if group != 1:
            attrs["group"] = {"i": group}
        nodes.append(onnx_node("Conv", [x, f"{name}_w_0", f"{name}_b_0"], [f"{name}_1"], **attrs))
        nodes.append(onnx_node("Relu", [f"{name}_1"], [f"{name}_2"]))
        x = f"{name}_2"
        if i in (1, 2):
            nodes.append(onnx_node("LRN", [x], [f"norm{i}_1"], size={"i": 5}, alpha={"f": 1e-4},
                                   beta={"f": 0.75}, bias={"f": 1.0}))
        if i in (1, 2, 5):
            nodes.append(onnx_node("MaxPool", [f"norm{i}_1" if i < 5 else x], [f"pool{i}_1"],
                                   kernel_shape={"ints": [3, 3]}, strides={"ints": [2, 2]}))
            x = f"pool{i}_1"
    for name in ("fc6", "fc7", "fc8"):
        trans_b = 0 if (fc7_transposed and name == "fc7") else 1
        nodes.append(onnx_node("Gemm", [x, f"{name}_w_0", f"{name}_b_0"], [f"{name}_1"], transB={"i": trans_b}))
        x = f"{name}_1"
    nodes.append(onnx_node("Softmax", [x], ["prob_1"]))

    inits = []
    for name, (weight, bias) in weights.items():
        stored = weight.t() if (fc7_transposed and name == "fc7") else weight
        inits += [onnx_initializer(f"{name}_w_0", stored, raw), onnx_initializer(f"{name}_b_0", bias, raw)]
    graph = cat(*(f_bytes(1, n) for n in nodes), f_bytes(2, "bvlc_alexnet"), *(f_bytes(5, t) for t in inits))
    # ModelProto: ir_version 1, producer_name 2, graph 7, opset_import 8 (version = 2)
    return cat(f_varint(1, 7), f_bytes(2, "onnx-caffe2"), f_bytes(7, graph), f_bytes(8, f_varint(2, 12))).encode()


# ----------------------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(source: Path, out: Path, *extra: str) -> int:
    """The CLI on a local file, with its checksum given (as a user with their own file would)."""
    return iw.main([str(source), "--out", str(out), "--quiet", "--expected-sha256", sha256(source), *extra])
