"""The paper's Fig. 2 as a table, and the geometry derived from it.

``LAYERS`` is the only place the architecture is written down. ``AlexNetConfig`` (width, classes, conv1
padding, LRN, dropout) and the table give every layer's shape, the checkpoint's tensor shapes and the
parameter count. The modules that run it are in network.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from .lrn import PAPER_LRN, LRNConfig


@dataclass(frozen=True)
class Layer:
    """One row of the layer table. ``kernels`` counts both towers (None: as many as there are classes);
    ``size`` is the kernel's side (None: a fully connected layer). ``reads``: "image"; "own", this tower's
    maps of the layer below only (a groups=2 convolution in the grouped net); "both", both towers' maps
    (where activations cross GPUs). ``after``: what follows the layer, in order."""

    name: str
    kernels: int | None
    size: int | None
    stride: int
    padding: int
    reads: str
    after: tuple[str, ...]

    @property
    def is_conv(self) -> bool:
        return self.size is not None

    @property
    def groups(self) -> int:
        """Groups of the layer in the grouped single-device net."""
        return 2 if self.reads == "own" else 1


# Krizhevsky et al. 2012, Fig. 2. conv1's padding depends on the crop: see CONV1_PADDING.
LAYERS = (
    #     name     kernels  size  stride  pad  reads    after it
    Layer("conv1",    96,    11,    4,     0,  "image", ("relu", "lrn", "pool")),
    Layer("conv2",   256,     5,    1,     2,  "own",   ("relu", "lrn", "pool")),
    Layer("conv3",   384,     3,    1,     1,  "both",  ("relu",)),
    Layer("conv4",   384,     3,    1,     1,  "own",   ("relu",)),
    Layer("conv5",   256,     3,    1,     1,  "own",   ("relu", "pool")),
    Layer("fc6",    4096,  None,    1,     0,  "both",  ("relu", "dropout")),
    Layer("fc7",    4096,  None,    1,     0,  "both",  ("relu", "dropout")),
    Layer("fc8",    None,  None,    1,     0,  "both",  ()),  # logits; softmax is in the loss
)  # fmt: skip
POOL_SIZE, POOL_STRIDE = 3, 2  # overlapping max-pooling (paper §3.4)

# (left, right, top, bottom) zero padding of the image before conv1, and the crop size it expects.
CONV1_PADDING = {"overhang": (0, 3, 0, 3), "symmetric": (2, 2, 2, 2), "none": (0, 0, 0, 0)}
CONV1_INPUT_SIZE = {"overhang": 224, "symmetric": 224, "none": 227}

LAYER_NAMES = tuple(layer.name for layer in LAYERS)
LAYERS_BY_NAME = {layer.name: layer for layer in LAYERS}
PAPER_CHANNELS = tuple(layer.kernels for layer in LAYERS if layer.kernels is not None)  # conv1..fc7
FEATURE_LAYERS = ("fc6", "fc7")  # the hidden layers whose activations ``features`` returns
# Fields a checkpoint's "architecture" may lack (added after the first checkpoints): their defaults apply.
OPTIONAL_IN_FILES = ("dropout", "lrn_across_towers")


@dataclass(frozen=True)
class LayerShape:
    """One layer as built: what it reads and writes (channels or features) and the side of its input."""

    layer: Layer
    inputs: int
    outputs: int
    groups: int
    input_size: int  # side of the maps it reads (conv1: after padding); 1 for fully connected layers

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.layer.is_conv:
            return (self.outputs, self.inputs // self.groups, self.layer.size, self.layer.size)
        return (self.outputs, self.inputs)

    def module(self) -> nn.Module:
        layer = self.layer
        if layer.is_conv:
            return nn.Conv2d(self.inputs, self.outputs, layer.size, layer.stride, layer.padding, groups=self.groups)
        return nn.Linear(self.inputs, self.outputs)


@dataclass(frozen=True)
class AlexNetConfig:
    num_classes: int = 1000
    width: float = 1.0  # multiplies every layer's width (tests train scaled-down nets on CPU)
    conv1_padding: str = "overhang"
    lrn: LRNConfig = field(default_factory=lambda: PAPER_LRN)
    dropout: float = 0.5
    lrn_across_towers: bool = False  # True: LRN windows span both towers (Caffe); False: each its own (paper)

    def __post_init__(self):
        if self.conv1_padding not in CONV1_PADDING:
            raise ValueError(f"conv1_padding must be one of {sorted(CONV1_PADDING)}, got {self.conv1_padding!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Output widths of conv1..conv5, fc6, fc7 (each even, so that it splits into two towers)."""
        return tuple(max(2, 2 * round(c * self.width / 2)) for c in PAPER_CHANNELS)

    @property
    def input_size(self) -> int:
        return CONV1_INPUT_SIZE[self.conv1_padding]

    def outputs(self, layer: Layer) -> int:
        """Kernels (or units) of ``layer`` in both towers together, at this width."""
        return self.num_classes if layer.kernels is None else self.channels[LAYERS.index(layer)]

    def layer_shapes(self, tower: int | None = None) -> dict[str, LayerShape]:
        """Every layer's geometry, walked down the table: of the grouped net (``tower`` None), or of tower
        0 or 1, which holds half of every layer (the first gets the odd one out) and reads its own half
        of the layer below, or all of it."""
        left, right, _, _ = CONV1_PADDING[self.conv1_padding]
        side, below, out = self.input_size + left + right, 3, {}
        for layer in LAYERS:
            if layer.is_conv:
                total_in, input_side = below, side
                side = (side + 2 * layer.padding - layer.size) // layer.stride + 1
            else:  # reads the maps below flattened
                total_in, input_side, side = below * side * side, 1, 1
            for op in layer.after:
                if op == "pool":
                    side = (side - POOL_SIZE) // POOL_STRIDE + 1
            outputs = self.outputs(layer)
            if tower is None:
                out[layer.name] = LayerShape(layer, total_in, outputs, layer.groups, input_side)
            else:
                inputs = _split(total_in)[tower] if layer.reads == "own" else total_in
                out[layer.name] = LayerShape(layer, inputs, _split(outputs)[tower], 1, input_side)
            below = outputs
        return out

    def grouped_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of the grouped single-device net, the checkpoint layout (Caffe's)."""
        out = {}
        for name, shape in self.layer_shapes().items():
            out[f"{name}.weight"] = shape.weight_shape
            out[f"{name}.bias"] = (shape.outputs,)
        return out

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.grouped_shapes().values())

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> AlexNetConfig:
        """The inverse of ``to_dict`` (``channels`` is derived, so ignored); KeyError for a missing field."""
        values = {}
        for f in fields(cls):
            if f.name in d or f.name not in OPTIONAL_IN_FILES:
                value = d[f.name]
                values[f.name] = LRNConfig.from_dict(value) if f.name == "lrn" else type(f.default)(value)
        return cls(**values)


def _split(n: int) -> tuple[int, int]:
    """Split n units between the two towers (the first gets the odd one out)."""
    return n - n // 2, n // 2


def check_feature_layer(layer: str) -> str:
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"layer must be one of {', '.join(FEATURE_LAYERS)}, got {layer!r}")
    return layer
