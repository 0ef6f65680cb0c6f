"""Caffe's ``.caffemodel``: a protobuf NetParameter. Old files list their layers in the V1 ``layers`` field,
newer ones in ``layer``; blob shapes are num/channels/height/width or ``shape``. The field numbers are
caffe.proto's, named below.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from ..lrn import LRNConfig
from ..network import LAYER_NAMES
from .common import (
    CONV_GEOMETRY,
    Imported,
    WeightsError,
    check_geometry,
    check_lrn_before_pool,
    one_lrn,
    shortest,
    tensor_of,
)
from .wire import I64, Message


class NetParameter:
    LAYERS = 2  # V1LayerParameter (old files)
    LAYER = 100  # LayerParameter


class LayerParameter:
    NAME, TYPE, BLOBS, CONVOLUTION_PARAM, LRN_PARAM = 1, 2, 7, 106, 118  # type: a string


class V1LayerParameter:
    NAME, TYPE, BLOBS, CONVOLUTION_PARAM, LRN_PARAM = 4, 5, 6, 10, 18  # type: an enum (V1_LAYER_TYPES)


class BlobProto:
    NUM, CHANNELS, HEIGHT, WIDTH, DATA, SHAPE, DOUBLE_DATA = 1, 2, 3, 4, 5, 7, 8  # data: float


class BlobShape:
    DIM = 1  # int64


class ConvolutionParameter:
    PAD, KERNEL_SIZE, GROUP, STRIDE, PAD_H, PAD_W, STRIDE_H, STRIDE_W = 3, 4, 5, 6, 9, 10, 13, 14


class LRNParameter:  # defaults: local_size 5, alpha 1.0, beta 0.75, norm_region 0 (across channels), k 1.0
    LOCAL_SIZE, ALPHA, BETA, NORM_REGION, K = 1, 2, 3, 4, 5


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
        _CaffeLayer(
            m.string(LayerParameter.NAME, ""), m.string(LayerParameter.TYPE, ""), m.messages(LayerParameter.BLOBS),
            m.message(LayerParameter.CONVOLUTION_PARAM), m.message(LayerParameter.LRN_PARAM),
        )
        for m in top.messages(NetParameter.LAYER)
    ]
    v1 = [
        _CaffeLayer(
            m.string(V1LayerParameter.NAME, ""), V1_LAYER_TYPES.get(m.varint(V1LayerParameter.TYPE, 0), f"V1 type {m.varint(V1LayerParameter.TYPE, 0)}"),
            m.messages(V1LayerParameter.BLOBS), m.message(V1LayerParameter.CONVOLUTION_PARAM), m.message(V1LayerParameter.LRN_PARAM),
        )
        for m in top.messages(NetParameter.LAYERS)
    ]
    if not layers and not v1:
        raise WeightsError("no layers (neither 'layer' nor the old 'layers' field): not a Caffe model")
    kind = "layer" if layers and not v1 else "V1 layers" if v1 and not layers else "layer + V1 layers"
    all_layers = layers + v1
    check_lrn_before_pool([layer.type for layer in all_layers], "Pooling")

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
    return Imported(tensors, one_lrn(lrns), f"caffe ({kind})")


def _blob(blob: Message, what: str) -> torch.Tensor:
    shape_message = blob.message(BlobProto.SHAPE)
    if shape_message is not None:
        shape = shape_message.varints(BlobShape.DIM)
    else:  # the 4-D form of older files; Caffe pads missing leading axes with 1
        shape = [blob.varint(number, 0) for number in (BlobProto.NUM, BlobProto.CHANNELS, BlobProto.HEIGHT, BlobProto.WIDTH)]
    if blob.count(BlobProto.DATA):
        values = blob.floats(BlobProto.DATA)
    elif blob.count(BlobProto.DOUBLE_DATA, I64):
        values = blob.doubles(BlobProto.DOUBLE_DATA)
    else:
        values = array("f")
    return tensor_of(values, shape, what)


def _squeeze_to(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Drop leading axes of size 1 (old Caffe stores fc weights as 1×1×out×in, biases as 1×1×1×n)."""
    while tensor.dim() > rank and tensor.shape[0] == 1:
        tensor = tensor[0]
    return tensor


def _check_caffe_conv(name: str, conv: Message) -> None:
    stride, pad, groups = CONV_GEOMETRY[name]
    c = ConvolutionParameter
    if c.STRIDE_H in conv or c.STRIDE_W in conv:
        strides = [conv.varint(c.STRIDE_H), conv.varint(c.STRIDE_W)]
    else:
        strides = conv.varints(c.STRIDE) or [1]
    if c.PAD_H in conv or c.PAD_W in conv:
        pads = [conv.varint(c.PAD_H, 0), conv.varint(c.PAD_W, 0)]
    else:
        pads = conv.varints(c.PAD) or [0]
    check_geometry(name, strides, pads, conv.varint(c.GROUP, 1), stride, pad, groups)


def _caffe_lrn(layer: _CaffeLayer) -> LRNConfig:
    p = layer.lrn
    if p.varint(LRNParameter.NORM_REGION, 0) != 0:
        raise WeightsError(f"layer {layer.name} normalises within channels; AlexNet's LRN is across channels")
    return LRNConfig(
        size=p.varint(LRNParameter.LOCAL_SIZE, 5),
        alpha=shortest(p.float32(LRNParameter.ALPHA, 1.0)),
        beta=shortest(p.float32(LRNParameter.BETA, 0.75)),
        k=shortest(p.float32(LRNParameter.K, 1.0)),
        alpha_over_size=True,  # Caffe divides α by the window size
    )
