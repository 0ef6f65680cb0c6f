"""The 2012 network, as two towers (one per GPU) or as one grouped net (Caffe's and ONNX's layout).

``LAYERS`` is the paper's Fig. 2 as a table: the shapes, the checkpoint's geometry and the parameter count
come from it. The forward passes are written out below as plain code, layer by layer, as in Fig. 2.
conv1's padding ("overhang", "symmetric", "none") and LRN's reach across towers are explained in
docs/network.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import (  # noqa: F401 (re-exported: the table's names have always been importable from here)
    CONV1_INPUT_SIZE,
    CONV1_PADDING,
    FEATURE_LAYERS,
    LAYER_NAMES,
    LAYERS,
    LAYERS_BY_NAME,
    OPTIONAL_IN_FILES,
    PAPER_CHANNELS,
    POOL_SIZE,
    POOL_STRIDE,
    AlexNetConfig,
    Layer,
    LayerShape,
    check_feature_layer,
)
from .devices import check_present
from .lrn import LocalResponseNorm

# Layers whose bias starts at 1 (paper §5: "to give the ReLUs positive inputs early"); the rest at 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
INIT_STD = 0.01


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


class _Layers(nn.Module):
    """conv1 … fc8 built from ``shapes``, with the LRN, max-pool and dropout that follow them."""

    def __init__(self, config: AlexNetConfig, shapes: dict[str, LayerShape]):
        super().__init__()
        self.config = config
        for name, shape in shapes.items():
            setattr(self, name, shape.module())
        self.lrn = LocalResponseNorm(config.lrn)
        self.dropout = nn.Dropout(config.dropout)

    def layers(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in LAYER_NAMES}


def _relu(x: torch.Tensor) -> torch.Tensor:
    # In place, on a layer's fresh output: it saves a buffer and a pass over memory.
    return F.relu(x, inplace=True)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=POOL_SIZE, stride=POOL_STRIDE)


class Tower(_Layers):
    """Half of every layer: what one of the paper's GPUs held (``tower`` 0 or 1).

    Each method below is one stretch between two exchanges, run on this tower's device alone.
    ``AlexNet._run`` calls them in order and does the exchanges between them.
    """

    # The stretches, in the order AlexNet runs them (training compiles each on its own).
    STRETCHES = (
        "conv1_to_pool2",
        "conv1_relu",
        "pool1_to_conv2",
        "pool2",
        "conv3_to_pool5",
        "fc6_relu_dropout",
        "fc7_relu_dropout",
        "fc8_logits",
    )

    def __init__(self, config: AlexNetConfig, tower: int):
        super().__init__(config, config.layer_shapes(tower))

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def conv1_to_pool2(self, image: torch.Tensor) -> torch.Tensor:
        """The paper's LRN, over this tower's own maps: no exchange before conv3."""
        x = _relu(self.conv1(pad_image(image, self.config)))
        x = _pool(self.lrn(x))
        x = _relu(self.conv2(x))  # reads this tower's maps only
        return _pool(self.lrn(x))

    # The same stretch cut at each LRN, for Caffe's LRN across both towers (AlexNet._lrn_across).
    def conv1_relu(self, image: torch.Tensor) -> torch.Tensor:
        return _relu(self.conv1(pad_image(image, self.config)))

    def pool1_to_conv2(self, x: torch.Tensor) -> torch.Tensor:
        return _relu(self.conv2(_pool(x)))

    def pool2(self, x: torch.Tensor) -> torch.Tensor:
        return _pool(x)

    def conv3_to_pool5(self, both: torch.Tensor) -> torch.Tensor:
        """conv3 reads both towers' maps; conv4 and conv5 read this tower's own."""
        x = _relu(self.conv3(both))
        x = _relu(self.conv4(x))
        return _pool(_relu(self.conv5(x)))

    def fc6_relu_dropout(self, both: torch.Tensor) -> torch.Tensor:
        return self.dropout(_relu(self.fc6(both.flatten(1))))

    def fc7_relu_dropout(self, both: torch.Tensor) -> torch.Tensor:
        return self.dropout(_relu(self.fc7(both)))

    def fc8_logits(self, both: torch.Tensor) -> torch.Tensor:
        return self.fc8(both)  # the softmax is in the loss


class AlexNet(nn.Module):
    """The paper's two-tower net. ``devices`` places tower 0 and tower 1 (e.g. "cuda:0", "cuda:1").

    ``AlexNet(config)``, or ``AlexNet(10, width=0.25)``: the config's fields (num_classes first).
    Activations cross towers only at the inputs of conv3, fc6, fc7 and fc8.
    Both towers concatenate in the same order, tower 0's maps first.
    That order is what makes the grouped form a pure reshuffle.
    Nothing in forward() waits on a device: with two GPUs, the towers' kernels run concurrently.
    """

    def __init__(self, config: AlexNetConfig | int | None = None, /, *, devices=None, **config_fields):
        super().__init__()
        self.config = _config(config, config_fields)
        self.towers = nn.ModuleList(Tower(self.config, i) for i in range(2))
        for tower in self.towers:
            init_paper_(tower.layers())
        if devices is not None:
            self.place(devices)

    def place(self, devices) -> AlexNet:
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

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """images: [n, 3, h, w] anywhere, or [tower 0's copy, tower 1's copy]; logits on tower 0's device."""
        return self._run(images, "fc8")

    def features(self, images: torch.Tensor | list[torch.Tensor], layer: str = "fc7") -> torch.Tensor:
        """The activations of hidden layer ``layer`` (fc6 or fc7, after the ReLU), on tower 0's device.

        Both towers' halves sit side by side, tower 0's first: 4096 values at full width.
        The paper's Fig. 4 compares images by the Euclidean distance between their fc7 activations.
        In training mode they are taken after dropout.
        """
        return self._run(images, check_feature_layer(layer))

    def _run(self, images, last: str) -> torch.Tensor:
        """Fig. 2: each tower runs its stretch, then the towers exchange activations."""
        x = self._per_tower(images)
        x = self._conv1_to_pool2(x)
        x = self._each("conv3_to_pool5", self._exchange(x))  # conv3 reads both towers
        x = self._each("fc6_relu_dropout", self._exchange(x))  # fc6 reads both towers
        if last != "fc6":
            x = self._each("fc7_relu_dropout", self._exchange(x))  # fc7 reads both towers
        if last == "fc8":
            x = self._each("fc8_logits", self._exchange(x))  # fc8 reads both towers
        return self._both(x, self.devices[0])

    def _conv1_to_pool2(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.config.lrn_across_towers:  # the paper's: each tower normalises its own maps
            return self._each("conv1_to_pool2", x)
        # Caffe's: the LRN windows reach across the tower boundary, an exchange at each LRN.
        x = self._lrn_across(self._each("conv1_relu", x))
        x = self._lrn_across(self._each("pool1_to_conv2", x))
        return self._each("pool2", x)

    def _each(self, stretch: str, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tower's ``stretch`` on its own input, on its own device."""
        return [getattr(tower, stretch)(h) for tower, h in zip(self.towers, x)]

    def _exchange(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        """Both towers' activations on each tower's device, for a layer that reads both."""
        return [self._both(x, device) for device in self.devices]

    @staticmethod
    def _both(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Both towers' activations on one device, tower 0's first: a cross-GPU exchange."""
        return torch.cat([p.to(device, non_blocking=True) for p in parts], dim=1)

    def _lrn_across(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Caffe's LRN over all maps, computed per tower.

        Each tower borrows the few maps beside the boundary that its windows reach (2 each way for n=5).
        The paper's net has no such exchange.
        """
        (a, b), (device_a, device_b) = parts, self.devices
        size = self.config.lrn.size
        below, above = size // 2, (size - 1) // 2  # the window of map c is [c - below, c + above]
        a_ext = torch.cat([a, b[:, :above].to(device_a, non_blocking=True)], dim=1)
        b_ext = torch.cat([a[:, a.shape[1] - below :].to(device_b, non_blocking=True), b], dim=1)
        return [self.towers[0].lrn(a_ext)[:, : a.shape[1]], self.towers[1].lrn(b_ext)[:, below:]]

    def _per_tower(self, images) -> list[torch.Tensor]:
        """The input on each tower's device: one tensor (copied to each), or a pair already placed.

        Training augments the uint8 batch on both GPUs rather than send float32 across.
        """
        if isinstance(images, (list, tuple)):
            return list(images)
        return [images.to(d, non_blocking=True) for d in self.devices]

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

    def to_grouped(self) -> GroupedAlexNet:
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, "fc8")

    def features(self, images: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Hidden layer ``layer`` (fc6 or fc7, after the ReLU): the same numbers as ``AlexNet.features``."""
        return self._run(images, check_feature_layer(layer))

    def _run(self, images: torch.Tensor, last: str) -> torch.Tensor:
        """Fig. 2 on one device: a groups=2 layer reads each tower's own maps, a dense one reads both."""
        x = _relu(self.conv1(pad_image(images, self.config)))
        x = _pool(self._lrn(x))
        x = _relu(self.conv2(x))  # groups=2: each tower's half reads its own maps
        x = _pool(self._lrn(x))
        x = _relu(self.conv3(x))  # dense: reads both towers
        x = _relu(self.conv4(x))  # groups=2
        x = _pool(_relu(self.conv5(x)))  # groups=2
        x = self.dropout(_relu(self.fc6(x.flatten(1))))
        if last == "fc6":
            return x
        x = self.dropout(_relu(self.fc7(x)))
        if last == "fc7":
            return x
        return self.fc8(x)

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.lrn_across_towers:
            return self.lrn(x)
        # Each tower's half on its own, as in the paper: the halves become two batch items, a free view.
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * 2, c // 2, h, w)).view(n, c, h, w)

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
