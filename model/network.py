"""The 2012 network, as two towers (one per GPU) or as one grouped net (Caffe's / ONNX's layout).

``LAYERS`` below is the paper's Fig. 2 as a table, and the only place the architecture is written down:
``Tower``, ``GroupedAlexNet`` (and so ``CPUInferenceNet``), the parameter shapes, the spatial sizes and
the parameter count are all derived from it and from an ``AlexNetConfig`` (width, classes, conv1 padding,
LRN, dropout).

conv1 padding: 224 does not divide for an 11×11 stride-4 kernel. The default, "overhang", is what the
paper's own code (cuda-convnet) did: 1 + ceil((224 - 11) / 4) = 55 outputs, the last window reaching 3
pixels past the right and bottom edge into zeros. "symmetric" pads 2 on every side (torchvision's
choice); "none" expects Caffe's 227×227 crops. All three give 55×55 maps.

LRN and the towers: in the paper's code (cuda-convnet: rnorm1a reads conv1a, rnorm1b reads conv1b) each
GPU normalises over its own kernel maps only; Caffe's bvlc_alexnet normalises over all 96 (or 256) maps,
so the windows of the 2 maps on either side of the tower boundary reach into the other tower.
``lrn_across_towers`` says which: False (the paper's) or True (Caffe-trained weights). Both forms of the
net honour it, so they stay the same function.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .devices import check_present
from .lrn import PAPER_LRN, LocalResponseNorm, LRNConfig


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
# The net as one sequence of steps: (layer, "layer") for the layer itself, then (layer, op) for each op after it.
STEPS = tuple((layer, op) for layer in LAYERS for op in ("layer", *layer.after))
# Layers whose bias starts at 1 (paper §5: "to give the ReLUs positive inputs early"); the rest at 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
INIT_STD = 0.01
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


def init_paper_(layers: dict[str, nn.Module]) -> None:
    """Weights N(0, 0.01²); biases 1 in conv2, conv4, conv5, fc6, fc7, 0 elsewhere (paper §5)."""
    for name, layer in layers.items():
        nn.init.normal_(layer.weight, mean=0.0, std=INIT_STD)
        nn.init.constant_(layer.bias, 1.0 if name in BIAS_ONE_LAYERS else 0.0)


def pad_image(images: torch.Tensor, config: AlexNetConfig, memory_format=None) -> torch.Tensor:
    """conv1's input: ``images`` zero-padded as ``config.conv1_padding`` says, in one copy (none when there
    is nothing to pad and the layout is already ``memory_format``; default: the images' own layout)."""
    left, right, top, bottom = CONV1_PADDING[config.conv1_padding]
    if memory_format is None:
        nhwc = images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
        memory_format = torch.channels_last if nhwc else torch.contiguous_format
    if not any((left, right, top, bottom)):
        return images.contiguous(memory_format=memory_format)
    n, c, h, w = images.shape
    out = torch.empty(
        (n, c, top + h + bottom, left + w + right), dtype=images.dtype, device=images.device, memory_format=memory_format
    )
    out[:, :, top : top + h, left : left + w] = images
    out[:, :, :top].zero_(), out[:, :, top + h :].zero_()
    out[:, :, :, :left].zero_(), out[:, :, :, left + w :].zero_()
    return out


def _split(n: int) -> tuple[int, int]:
    """Split n units between the two towers (the first gets the odd one out)."""
    return n - n // 2, n // 2


class _Layers(nn.Module):
    """conv1 … fc8 built from ``shapes``, and ``run``, which applies a stretch of ``STEPS`` to a batch."""

    def __init__(self, config: AlexNetConfig, shapes: dict[str, LayerShape]):
        super().__init__()
        self.config = config
        for name, shape in shapes.items():
            setattr(self, name, shape.module())
        self.lrn = LocalResponseNorm(config.lrn)
        self.dropout = nn.Dropout(config.dropout)

    def layers(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in LAYER_NAMES}

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrn(x)

    def run(self, steps, x: torch.Tensor) -> torch.Tensor:
        for layer, op in steps:
            if op == "layer":
                if layer.reads == "image":
                    x = pad_image(x, self.config)
                elif not layer.is_conv:
                    x = x.flatten(1)
                x = getattr(self, layer.name)(x)
            elif op == "relu":
                x = F.relu(x, inplace=True)  # on a layer's fresh output: saves a buffer and a pass over memory
            elif op == "lrn":
                x = self._lrn(x)
            elif op == "pool":
                x = F.max_pool2d(x, kernel_size=POOL_SIZE, stride=POOL_STRIDE)
            elif op == "dropout":
                x = self.dropout(x)
            else:
                raise ValueError(f"unknown step {op!r} after {layer.name}")
        return x


def _steps(first: str, last: str) -> tuple:
    names = [layer.name for layer, _ in STEPS]
    return STEPS[names.index(first) : len(names) - names[::-1].index(last)]


class Tower(_Layers):
    """Half of every layer: what one of the paper's GPUs held (``tower`` 0 or 1)."""

    def __init__(self, config: AlexNetConfig, tower: int):
        super().__init__(config, config.layer_shapes(tower))

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def conv1_to_pool2(self, image: torch.Tensor) -> torch.Tensor:
        """With LRN over this tower's own maps (the paper's); see AlexNet._lrn_across for Caffe's."""
        return self.run(_steps("conv1", "conv2"), image)

    def conv3_to_pool5(self, both: torch.Tensor) -> torch.Tensor:
        return self.run(_steps("conv3", "conv5"), both)


def _stretches(lrn_across_towers: bool) -> tuple[tuple[str | None, tuple], ...]:
    """``STEPS`` cut where the towers exchange activations: before each layer that reads both towers, and
    (Caffe's LRN) at each LRN. Each stretch: (the exchange before it, or None; its steps)."""
    out, exchange, steps = [], None, []
    for step in STEPS:
        layer, op = step
        if op == "layer" and layer.reads == "both" or op == "lrn" and lrn_across_towers:
            out.append((exchange, tuple(steps)))
            exchange, steps = ("both", [step]) if op == "layer" else ("lrn", [])
        else:
            steps.append(step)
    out.append((exchange, tuple(steps)))
    return tuple(out)


class AlexNet(nn.Module):
    """The paper's two-tower net. ``devices`` places tower 0 and tower 1 (e.g. "cuda:0", "cuda:1").

    ``AlexNet(config)``, or ``AlexNet(10, width=0.25)``: the config's fields (num_classes first).
    Activations cross towers only at the inputs of conv3, fc6, fc7 and fc8. Both towers concatenate in
    the same order (tower 0's maps first), which is what makes the grouped form a pure reshuffle.
    Nothing in forward() waits on a device: with two GPUs, the towers' kernels run concurrently.
    """

    def __init__(self, config: AlexNetConfig | int | None = None, /, *, devices=None, **config_fields):
        super().__init__()
        self.config = _config(config, config_fields)
        self.towers = nn.ModuleList(Tower(self.config, i) for i in range(2))
        for tower in self.towers:
            init_paper_(tower.layers())
        self._stretches = _stretches(self.config.lrn_across_towers)
        if devices is not None:
            self.place(devices)

    def place(self, devices) -> "AlexNet":
        """Put tower 0 on devices[0] and tower 1 on devices[1] (the same device twice is fine)."""
        if isinstance(devices, (str, torch.device)):
            devices = (devices, devices)
        if len(devices) != 2:
            raise ValueError(f"need two devices (one per tower), got {devices!r}")
        for device in devices:
            check_present(device)  # a missing GPU: one line saying so, not torch's AssertionError from .to()
        for tower, device in zip(self.towers, devices):
            tower.to(torch.device(device))
        return self

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        return (self.towers[0].device, self.towers[1].device)

    @staticmethod
    def _both(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Both towers' activations on one device, tower 0's first: a cross-GPU exchange."""
        return torch.cat([p.to(device, non_blocking=True) for p in parts], dim=1)

    def _lrn_across(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Caffe's LRN over all maps, computed per tower: each tower borrows the few maps beside the
        boundary that its windows reach (2 each way for n=5), an exchange the paper's net does not have."""
        (a, b), (device_a, device_b) = parts, self.devices
        size = self.config.lrn.size
        below, above = size // 2, (size - 1) // 2  # the window of map c is [c - below, c + above]
        a_ext = torch.cat([a, b[:, :above].to(device_a, non_blocking=True)], dim=1)
        b_ext = torch.cat([a[:, a.shape[1] - below :].to(device_b, non_blocking=True), b], dim=1)
        return [self.towers[0].lrn(a_ext)[:, : a.shape[1]], self.towers[1].lrn(b_ext)[:, below:]]

    def _per_tower(self, images) -> list[torch.Tensor]:
        """The input on each tower's device: given as one tensor (copied to each), or as a pair already
        placed (training augments the uint8 batch on both GPUs rather than sending float32 across)."""
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images.to(d, non_blocking=True) for d in self.devices]

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """images: [n, 3, h, w] anywhere, or [tower 0's copy, tower 1's copy]; logits on tower 0's device."""
        return self._run(images, "fc8")

    def features(self, images: torch.Tensor | list[torch.Tensor], layer: str = "fc7") -> torch.Tensor:
        """The activations of hidden layer ``layer`` (fc6 or fc7: after the ReLU; 4096 at full width), both
        towers' halves side by side (tower 0's first), on tower 0's device. The paper's Fig. 4 compares
        images by the Euclidean distance between their fc7 activations. (In training mode, after dropout.)"""
        return self._run(images, check_feature_layer(layer))

    def _run(self, images, last: str) -> torch.Tensor:
        towers, devices = self.towers, self.devices
        x = self._per_tower(images)
        for exchange, steps in self._stretches:
            if exchange == "both":
                x = [self._both(x, d) for d in devices]
            elif exchange == "lrn":
                x = self._lrn_across(x)
            x = [t.run(steps, h) for t, h in zip(towers, x)]
            if steps and steps[-1][0].name == last:
                break
        return self._both(x, devices[0])

    # Conversion to and from the grouped single-device layout (the checkpoint format).

    def grouped_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the grouped layout (conv2/4/5 groups=2), on CPU, named conv1.weight … fc8.bias."""
        t0, t1 = self.towers
        return {
            f"{name}.{kind}": torch.cat(
                [getattr(getattr(t0, name), kind).detach().cpu(), getattr(getattr(t1, name), kind).detach().cpu()]
            )
            for name in LAYER_NAMES
            for kind in ("weight", "bias")
        }

    @torch.no_grad()
    def load_grouped_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of ``grouped_state_dict`` (model.checkpoint checks a file's shapes before this)."""
        t0, t1 = self.towers
        for name in LAYER_NAMES:
            for kind in ("weight", "bias"):
                p0, p1 = getattr(getattr(t0, name), kind), getattr(getattr(t1, name), kind)
                first, second = state[f"{name}.{kind}"].split([p0.shape[0], p1.shape[0]])
                p0.copy_(first)
                p1.copy_(second)

    def to_grouped(self) -> "GroupedAlexNet":
        net = GroupedAlexNet(self.config)
        net.load_state_dict(self.grouped_state_dict())
        return net.to(self.devices[0])


class GroupedAlexNet(_Layers):
    """The same net on one device: conv2, conv4, conv5 as groups=2 convolutions (Caffe's layout).

    Its state_dict is the checkpoint's tensor layout. ``GroupedAlexNet(config)`` or keywords, as AlexNet.
    """

    def __init__(self, config: AlexNetConfig | int | None = None, /, **config_fields):
        config = _config(config, config_fields)
        super().__init__(config, config.layer_shapes())
        init_paper_(self.layers())

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.lrn_across_towers:
            return self.lrn(x)
        # Each tower's half on its own (the paper's): the halves as two batch items, a free view.
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * 2, c // 2, h, w)).view(n, c, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(STEPS, images)

    def features(self, images: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Hidden layer ``layer`` (fc6 or fc7, after the ReLU): the same numbers as ``AlexNet.features``."""
        return self.run(_steps("conv1", check_feature_layer(layer)), images)

    def to_towers(self, devices=None) -> AlexNet:
        net = AlexNet(self.config)
        net.load_grouped_state_dict(self.state_dict())
        return net.place(devices or (self.conv1.weight.device,) * 2)


def _config(config: AlexNetConfig | int | None, config_fields: dict) -> AlexNetConfig:
    """What the nets' constructors take: a config, or its fields as keywords (num_classes also first)."""
    if isinstance(config, int) and not isinstance(config, bool):
        config, config_fields = None, {"num_classes": config, **config_fields}
    if config is None:
        return AlexNetConfig(**config_fields)
    if not isinstance(config, AlexNetConfig):
        raise TypeError(f"expected an AlexNetConfig or a number of classes, got {type(config).__name__}")
    if config_fields:
        raise TypeError("pass an AlexNetConfig or its fields as keywords, not both")
    return config


def check_feature_layer(layer: str) -> str:
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"layer must be one of {', '.join(FEATURE_LAYERS)}, got {layer!r}")
    return layer
