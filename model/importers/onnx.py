"""The ONNX model zoo's ``bvlcalexnet-12.onnx`` (Caffe → Caffe2 → ONNX): a ModelProto whose graph
initializers are named ``conv1_w_0``, ``conv1_b_0``, … ``fc8_b_0``. The field numbers are onnx.proto's,
named below.
"""

from __future__ import annotations

import torch

from ..lrn import LRNConfig
from ..network import LAYER_NAMES
from .common import (
    CONV_GEOMETRY,
    Imported,
    WeightsError,
    check_geometry,
    check_lrn_before_pool,
    le_array,
    one_lrn,
    shortest,
    tensor_of,
)
from .wire import Message


class ModelProto:
    IR_VERSION, GRAPH = 1, 7


class GraphProto:
    NODE, INITIALIZER = 1, 5


class TensorProto:
    DIMS, DATA_TYPE, FLOAT_DATA, NAME, RAW_DATA, DOUBLE_DATA, EXTERNAL_DATA, DATA_LOCATION = 1, 2, 4, 8, 9, 10, 13, 14
    EXTERNAL = 1  # a data_location value


class NodeProto:
    INPUT, OP_TYPE, ATTRIBUTE = 1, 4, 5


class AttributeProto:
    NAME, F, I, INTS = 1, 2, 3, 8


ONNX_FLOAT, ONNX_FLOAT16, ONNX_DOUBLE = 1, 10, 11


def read_onnx(top: Message) -> Imported:
    graph = top.message(ModelProto.GRAPH)
    if graph is None:
        raise WeightsError("no graph: not an ONNX model")
    initializers = {}
    for tensor in graph.messages(GraphProto.INITIALIZER):
        initializers[tensor.string(TensorProto.NAME, "")] = tensor
    nodes = graph.messages(GraphProto.NODE)
    op_types = [node.string(NodeProto.OP_TYPE, "") for node in nodes]
    check_lrn_before_pool(op_types, "MaxPool")

    tensors = {}
    for name in LAYER_NAMES:
        for kind, suffix in (("weight", "w"), ("bias", "b")):
            tensor = initializers.get(f"{name}_{suffix}_0")
            if tensor is not None:
                tensors[f"{name}.{kind}"] = _onnx_tensor(tensor, f"{name}_{suffix}_0")

    lrns, notes = [], []
    for node, op_type in zip(nodes, op_types):
        attributes = {a.string(AttributeProto.NAME, ""): a for a in node.messages(NodeProto.ATTRIBUTE)}
        inputs = node.strings(NodeProto.INPUT)
        layer = inputs[1][: -len("_w_0")] if len(inputs) > 1 and inputs[1].endswith("_w_0") else None
        if op_type == "LRN":
            lrns.append(_onnx_lrn(attributes))
        elif op_type == "Conv" and layer in CONV_GEOMETRY:
            stride, pad, groups = CONV_GEOMETRY[layer]
            strides = _ints(attributes.get("strides")) or [1]
            pads = _ints(attributes.get("pads")) or [0]
            group = _int(attributes.get("group"), 1)
            check_geometry(layer, strides, pads, group, stride, pad, groups)
        elif op_type == "Gemm" and layer in LAYER_NAMES and f"{layer}.weight" in tensors:
            if _int(attributes.get("transA"), 0) or _float(attributes.get("alpha"), 1.0) != 1.0:
                raise WeightsError(f"{layer}: Gemm with transA or alpha != 1 is not a plain fully connected layer")
            if _float(attributes.get("beta"), 1.0) != 1.0:
                raise WeightsError(f"{layer}: Gemm with beta != 1 is not a plain fully connected layer")
            if not _int(attributes.get("transB"), 0):  # weights stored [in, out]
                tensors[f"{layer}.weight"] = tensors[f"{layer}.weight"].t().contiguous()
                notes.append(f"{layer} weights transposed (Gemm transB=0)")
    return Imported(tensors, one_lrn(lrns), "onnx", notes)


def _onnx_tensor(tensor: Message, name: str) -> torch.Tensor:
    if TensorProto.EXTERNAL_DATA in tensor or tensor.varint(TensorProto.DATA_LOCATION, 0) == TensorProto.EXTERNAL:
        raise WeightsError(f"initializer {name} is stored in an external file; only self-contained models are read")
    shape, data_type = tensor.varints(TensorProto.DIMS), tensor.varint(TensorProto.DATA_TYPE, 0)
    raw = tensor.bytes(TensorProto.RAW_DATA)
    if data_type == ONNX_FLOAT:
        values = le_array(raw, "f", name) if raw is not None else tensor.floats(TensorProto.FLOAT_DATA)
    elif data_type == ONNX_DOUBLE:
        values = le_array(raw, "d", name) if raw is not None else tensor.doubles(TensorProto.DOUBLE_DATA)
    elif data_type == ONNX_FLOAT16 and raw is not None:
        return tensor_of(le_array(raw, "H", name), shape, name, torch.float16)
    else:
        raise WeightsError(f"initializer {name} has ONNX data type {data_type}; expected float32, float16 or double")
    return tensor_of(values, shape, name)


def _onnx_lrn(attributes: dict[str, Message]) -> LRNConfig:
    size = _int(attributes.get("size"), None)
    if size is None:
        raise WeightsError("an LRN node has no size attribute")
    return LRNConfig(
        size=size,
        alpha=shortest(_float(attributes.get("alpha"), 1e-4)),
        beta=shortest(_float(attributes.get("beta"), 0.75)),
        k=shortest(_float(attributes.get("bias"), 1.0)),
        alpha_over_size=True,  # ONNX divides α by the window size, as Caffe does
    )


def _int(attribute: Message | None, default):
    return default if attribute is None else attribute.varint(AttributeProto.I, default)


def _float(attribute: Message | None, default: float) -> float:
    return default if attribute is None else attribute.float32(AttributeProto.F, default)


def _ints(attribute: Message | None) -> list[int]:
    return [] if attribute is None else attribute.varints(AttributeProto.INTS)
