"""What the Caffe and ONNX readers share: the result, the errors, and checks against the paper's net."""

from __future__ import annotations

import math
import struct
import sys
from array import array
from dataclasses import dataclass, field

import torch

from ..lrn import LRNConfig
from ..network import LAYERS

# Stride, padding and groups of each convolution in the paper's net (kernel sizes follow from the shapes);
# conv1's padding 0 is Caffe's geometry (227 crops).
CONV_GEOMETRY = {layer.name: (layer.stride, layer.padding, layer.groups) for layer in LAYERS if layer.is_conv}


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


def tensor_of(values: array, shape: list[int], what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if any(d < 0 for d in shape):
        raise WeightsError(f"{what} has a negative dimension in its shape {shape}")
    if len(values) != math.prod(shape):
        raise WeightsError(f"{what} holds {len(values):,} values, but its shape {shape} needs {math.prod(shape):,}")
    if not len(values):
        return torch.zeros(shape)
    dtype = dtype or {"f": torch.float32, "d": torch.float64}[values.typecode]
    # frombuffer shares the array's memory (and keeps it alive): no further copy of 244 MB.
    return torch.frombuffer(values, dtype=dtype).reshape(shape).float()


def le_array(raw, typecode: str, what: str) -> array:
    values = array(typecode)
    if len(raw) % values.itemsize:
        raise WeightsError(f"{what}: raw data of {len(raw)} bytes is not a whole number of {values.itemsize}-byte values")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def check_geometry(name, strides, pads, group, stride, pad, groups) -> None:
    found = (sorted(set(strides)), sorted(set(pads)), group)
    if found != ([stride], [pad], groups):
        raise WeightsError(
            f"{name} has stride {strides}, padding {pads}, {group} group(s); the paper's {name} has stride "
            f"{stride}, padding {pad}, {groups} group(s)"
        )


def check_lrn_before_pool(layer_types: list[str], pool_type: str) -> None:
    """AlexNet normalises, then pools; CaffeNet (bvlc_reference_caffenet, same names and shapes) pools first."""
    if "LRN" in layer_types and pool_type in layer_types:
        if layer_types.index(pool_type) < layer_types.index("LRN"):
            raise WeightsError(
                "this net pools before it normalises (CaffeNet's order, as in bvlc_reference_caffenet); "
                "AlexNet normalises first. The weights would not work in this network"
            )


def one_lrn(lrns: list[LRNConfig]) -> LRNConfig | None:
    if len(set(lrns)) > 1:
        raise WeightsError(f"the two LRN layers differ ({sorted(set(lrns), key=str)}); this network has one setting")
    return lrns[0] if lrns else None


def shortest(value: float) -> float:
    """The shortest decimal that is the same float32 (1e-4, not 9.99999974737875e-05)."""
    bits = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == bits:
            return candidate
    return value
