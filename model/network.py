"""The 2012 network, as two towers (one per GPU) or as one grouped net (Caffe's / ONNX's layout).

Layer table (Krizhevsky et al. 2012, Fig. 2; per tower = half of each layer):

    layer  kernels (per tower)  kernel     stride/pad  reads  after it
    conv1  96  (48)             11×11×3    4 / see CONV1_PADDING   image  ReLU, LRN, max-pool 3/2
    conv2  256 (128)            5×5×48     1 / 2       own    ReLU, LRN, max-pool 3/2
    conv3  384 (192)            3×3×256    1 / 1       both   ReLU
    conv4  384 (192)            3×3×192    1 / 1       own    ReLU
    conv5  256 (128)            3×3×192    1 / 1       own    ReLU, max-pool 3/2
    fc6    4096 (2048)          9216 →                 both   ReLU, dropout 0.5
    fc7    4096 (2048)          4096 →                 both   ReLU, dropout 0.5
    fc8    1000 (500)           4096 →                 both   (logits; softmax is in the loss)

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

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .lrn import PAPER_LRN, LocalResponseNorm, LRNConfig

# (left, right, top, bottom) zero padding of the image before conv1, and the crop size it expects.
CONV1_PADDING = {"overhang": (0, 3, 0, 3), "symmetric": (2, 2, 2, 2), "none": (0, 0, 0, 0)}
CONV1_INPUT_SIZE = {"overhang": 224, "symmetric": 224, "none": 227}

PAPER_CHANNELS = (96, 256, 384, 384, 256, 4096, 4096)  # conv1..conv5, fc6, fc7
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Layers whose bias starts at 1 (paper §5: "to give the ReLUs positive inputs early"); the rest at 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
INIT_STD = 0.01


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

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "width": self.width,
            "conv1_padding": self.conv1_padding,
            "lrn": self.lrn.to_dict(),
            "dropout": self.dropout,
            "lrn_across_towers": self.lrn_across_towers,
            "channels": list(self.channels),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AlexNetConfig":
        return cls(
            num_classes=int(d["num_classes"]),
            width=float(d["width"]),
            conv1_padding=str(d["conv1_padding"]),
            lrn=LRNConfig.from_dict(d["lrn"]),
            dropout=float(d.get("dropout", 0.5)),
            lrn_across_towers=bool(d.get("lrn_across_towers", False)),
        )

    def grouped_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of the grouped single-device net, the checkpoint layout (Caffe's)."""
        c1, c2, c3, c4, c5, f6, f7 = self.channels
        shapes = {
            "conv1": (c1, 3, 11, 11),
            "conv2": (c2, c1 // 2, 5, 5),
            "conv3": (c3, c2, 3, 3),
            "conv4": (c4, c3 // 2, 3, 3),
            "conv5": (c5, c4 // 2, 3, 3),
            "fc6": (f6, c5 * 6 * 6),
            "fc7": (f7, f6),
            "fc8": (self.num_classes, f7),
        }
        out = {}
        for name, shape in shapes.items():
            out[f"{name}.weight"] = shape
            out[f"{name}.bias"] = (shape[0],)
        return out


def init_paper_(layers: dict[str, nn.Module]) -> None:
    """Weights N(0, 0.01²); biases 1 in conv2, conv4, conv5, fc6, fc7, 0 elsewhere (paper §5)."""
    for name, layer in layers.items():
        nn.init.normal_(layer.weight, mean=0.0, std=INIT_STD)
        nn.init.constant_(layer.bias, 1.0 if name in BIAS_ONE_LAYERS else 0.0)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)  # on a layer's fresh output: saves a buffer and a pass over memory


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    """Overlapping pooling, paper §3.4: 3×3 windows, stride 2."""
    if x.device.type == "cpu" and x.is_contiguous():
        # PyTorch's NCHW max-pool on CPU is scalar code; its channels-last kernel is vectorised across
        # channels. Two layout copies and the fast kernel beat the slow one (bench/model_throughput.py).
        x = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(x, kernel_size=3, stride=2).contiguous()
    return F.max_pool2d(x, kernel_size=3, stride=2)


def _split(n: int) -> tuple[int, int]:
    """Split n units between the two towers (the first gets the odd one out)."""
    return n - n // 2, n // 2


class Tower(nn.Module):
    """Half of every layer: what one of the paper's GPUs held."""

    def __init__(self, config: AlexNetConfig, fc8_outputs: int):
        super().__init__()
        c1, c2, c3, c4, c5, f6, f7 = (c // 2 for c in config.channels)
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(2 * c2, c3, kernel_size=3, padding=1)  # reads both towers
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1)
        self.fc6 = nn.Linear(2 * c5 * 6 * 6, f6)  # reads both towers
        self.fc7 = nn.Linear(2 * f6, f7)  # reads both towers
        self.fc8 = nn.Linear(2 * f7, fc8_outputs)  # reads both towers
        self.lrn = LocalResponseNorm(config.lrn)
        self.dropout = nn.Dropout(config.dropout)
        self.conv1_padding = CONV1_PADDING[config.conv1_padding]

    def layers(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in LAYER_NAMES}

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def relu_conv1(self, image: torch.Tensor) -> torch.Tensor:
        x = F.pad(image, self.conv1_padding) if any(self.conv1_padding) else image
        return _relu(self.conv1(x))

    def conv1_to_pool2(self, image: torch.Tensor) -> torch.Tensor:
        """With LRN over this tower's own maps (the paper's); see AlexNet._lrn_across for Caffe's."""
        x = _max_pool(self.lrn(self.relu_conv1(image)))
        return _max_pool(self.lrn(_relu(self.conv2(x))))

    def conv3_to_pool5(self, both: torch.Tensor) -> torch.Tensor:
        x = _relu(self.conv3(both))
        x = _relu(self.conv4(x))
        return _max_pool(_relu(self.conv5(x)))

    def fc(self, layer: nn.Linear, both: torch.Tensor) -> torch.Tensor:
        return self.dropout(_relu(layer(both)))


class AlexNet(nn.Module):
    """The paper's two-tower net. ``devices`` places tower 0 and tower 1 (e.g. "cuda:0", "cuda:1").

    Activations cross towers only at the inputs of conv3, fc6, fc7 and fc8. Both towers concatenate in
    the same order (tower 0's maps first), which is what makes the grouped form a pure reshuffle.
    Nothing in forward() waits on a device: with two GPUs, the towers' kernels run concurrently.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        width: float = 1.0,
        conv1_padding: str = "overhang",
        lrn: LRNConfig = PAPER_LRN,
        dropout: float = 0.5,
        lrn_across_towers: bool = False,
        devices: tuple[str | torch.device, str | torch.device] | None = None,
    ):
        super().__init__()
        self.config = AlexNetConfig(num_classes, width, conv1_padding, lrn, dropout, lrn_across_towers)
        self.towers = nn.ModuleList(Tower(self.config, n) for n in _split(num_classes))
        for tower in self.towers:
            init_paper_(tower.layers())
        if devices is not None:
            self.place(devices)

    @classmethod
    def from_config(cls, config: AlexNetConfig, devices=None) -> "AlexNet":
        return cls(
            config.num_classes,
            width=config.width,
            conv1_padding=config.conv1_padding,
            lrn=config.lrn,
            dropout=config.dropout,
            lrn_across_towers=config.lrn_across_towers,
            devices=devices,
        )

    def place(self, devices) -> "AlexNet":
        """Put tower 0 on devices[0] and tower 1 on devices[1] (the same device twice is fine)."""
        if isinstance(devices, (str, torch.device)):
            devices = (devices, devices)
        if len(devices) != 2:
            raise ValueError(f"need two devices (one per tower), got {devices!r}")
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

    def _conv1_to_pool2(self, images) -> list[torch.Tensor]:
        towers = self.towers
        if not self.config.lrn_across_towers:
            return [t.conv1_to_pool2(x) for t, x in zip(towers, self._per_tower(images))]
        x = [t.relu_conv1(x) for t, x in zip(towers, self._per_tower(images))]
        x = [_relu(t.conv2(_max_pool(h))) for t, h in zip(towers, self._lrn_across(x))]
        return [_max_pool(h) for h in self._lrn_across(x)]

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
        x = self._conv1_to_pool2(images)
        x = [t.conv3_to_pool5(self._both(x, d)) for t, d in zip(towers, devices)]
        x = [t.fc(t.fc6, self._both(x, d).flatten(1)) for t, d in zip(towers, devices)]
        if last == "fc6":
            return self._both(x, devices[0])
        x = [t.fc(t.fc7, self._both(x, d)) for t, d in zip(towers, devices)]
        if last == "fc7":
            return self._both(x, devices[0])
        logits = [t.fc8(self._both(x, d)) for t, d in zip(towers, devices)]
        return self._both(logits, devices[0])

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
        check_grouped_shapes(state, self.config)
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


class GroupedAlexNet(nn.Module):
    """The same net on one device: conv2, conv4, conv5 as groups=2 convolutions (Caffe's layout).

    Its state_dict is the checkpoint's tensor layout. It is the faster form for single-device inference.
    """

    def __init__(self, config: AlexNetConfig | None = None):
        super().__init__()
        self.config = config = config or AlexNetConfig()
        c1, c2, c3, c4, c5, f6, f7 = config.channels
        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=2)
        self.fc6 = nn.Linear(c5 * 6 * 6, f6)
        self.fc7 = nn.Linear(f6, f7)
        self.fc8 = nn.Linear(f7, config.num_classes)
        self.lrn = LocalResponseNorm(config.lrn)
        self.dropout = nn.Dropout(config.dropout)
        self.conv1_padding = CONV1_PADDING[config.conv1_padding]
        init_paper_({name: getattr(self, name) for name in LAYER_NAMES})

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.lrn_across_towers:
            return self.lrn(x)
        # Each tower's half on its own (the paper's): the halves as two batch items, a free view.
        n, c, h, w = x.shape
        return self.lrn(x.reshape(n * 2, c // 2, h, w)).view(n, c, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, "fc8")

    def features(self, images: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Hidden layer ``layer`` (fc6 or fc7, after the ReLU): the same numbers as ``AlexNet.features``."""
        return self._run(images, check_feature_layer(layer))

    def _run(self, images: torch.Tensor, last: str) -> torch.Tensor:
        x = F.pad(images, self.conv1_padding) if any(self.conv1_padding) else images
        x = _max_pool(self._lrn(_relu(self.conv1(x))))
        x = _max_pool(self._lrn(_relu(self.conv2(x))))
        x = _relu(self.conv3(x))
        x = _relu(self.conv4(x))
        x = _max_pool(_relu(self.conv5(x)))
        x = self.dropout(_relu(self.fc6(x.flatten(1))))
        if last == "fc6":
            return x
        x = self.dropout(_relu(self.fc7(x)))
        if last == "fc7":
            return x
        return self.fc8(x)

    def to_towers(self, devices=None) -> AlexNet:
        net = AlexNet.from_config(self.config)
        net.load_grouped_state_dict(self.state_dict())
        return net.place(devices or (self.conv1.weight.device,) * 2)


FEATURE_LAYERS = ("fc6", "fc7")  # the hidden layers whose activations ``features`` returns


def check_feature_layer(layer: str) -> str:
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"layer must be one of {', '.join(FEATURE_LAYERS)}, got {layer!r}")
    return layer


def check_grouped_shapes(state: dict[str, torch.Tensor], config: AlexNetConfig, source: str = "weights") -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = config.grouped_shapes()
    problems = [f"missing {k} (expected shape {list(s)})" for k, s in expected.items() if k not in state]
    problems += [
        f"{k} has shape {list(state[k].shape)}, expected {list(s)}"
        for k, s in expected.items()
        if k in state and tuple(state[k].shape) != s
    ]
    if problems:
        raise ValueError(f"{source} do not fit {describe(config)}: " + "; ".join(problems))


def describe(config: AlexNetConfig) -> str:
    return f"AlexNet(num_classes={config.num_classes}, width={config.width})"
