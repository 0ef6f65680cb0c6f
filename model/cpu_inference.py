"""The net laid out by hand for CPU inference: the same function as AlexNet, arranged for oneDNN.

    fast = CPUInferenceNet(net)   # net: AlexNet or GroupedAlexNet; a frozen copy of its weights
    logits = fast(images)         # NCHW float32 images, exactly what AlexNet takes

Activations stay channels-last, each convolution and its ReLU are one oneDNN call, conv2 and conv3 use
Winograd's filtering, and conv1..pool2 run a few images at a time so that LRN stays in the cache.
docs/cpu-inference.md says why each change, BENCHMARKS.md what it bought. Training does not use this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lrn import LRNConfig, lrn_inference
from .network import POOL_SIZE, POOL_STRIDE, AlexNet, AlexNetConfig, GroupedAlexNet, check_feature_layer, pad_image
from .winograd import WinogradConvReLU

CHANNELS_LAST = torch.channels_last
CHUNK = 8  # images per pass through conv1..pool2: their LRN buffers then stay in a 32 MiB L3 cache
CHUNKED = ("conv1", "conv2")  # the layers run CHUNK images at a time: those followed by LRN
FULL_BATCH = 32  # the batch the other convolutions' weight layouts are chosen for
# Layers computed by Winograd's F(tile×tile, r×r): (output tile, interpolation points besides ∞). The
# points are the usual small ones; for conv3, 0, ±1, 1/2, -2 gave half the rounding error of 0, ±1, ±2.
WINOGRAD = {"conv2": (4, (0, 1, -1, 2, -2, 0.5, -0.5)), "conv3": (4, (0, 1, -1, 0.5, -2))}


class NHWCLocalResponseNorm(nn.Module):
    """LRN (lrn.py's formula) on a channels-last batch, each of ``groups`` channel groups on its own."""

    def __init__(self, config: LRNConfig, groups: int):
        super().__init__()
        self.config, self.groups = config, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels // self.groups)  # a view: one group, one pixel
        return lrn_inference(rows, self.config).view(n, h, w, channels).permute(0, 3, 1, 2)


class ConvReLU(nn.Module):
    """A convolution and its ReLU, channels-last, as one oneDNN call on weights reordered once, at build
    time, into oneDNN's blocked layout (otherwise every call reorders them again, a cost that matters most
    at batch 1).

    Those two ops are oneDNN bindings PyTorch keeps for its own compiler (torch.ops.mkldnn); where they
    are missing, or with ``fused=False``, it is the plain nn.Conv2d and an in-place ReLU.
    """

    def __init__(self, conv: nn.Conv2d, input_size: list[int], fused: bool = True):
        super().__init__()
        copy = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         groups=conv.groups)
        with torch.no_grad():
            copy.weight.copy_(conv.weight.detach().cpu())
            copy.bias.copy_(conv.bias.detach().cpu())
        self.conv = copy.to(memory_format=CHANNELS_LAST).requires_grad_(False)
        self.packed_weight = None
        if fused:
            try:
                self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
                    self.conv.weight, list(conv.padding), list(conv.stride), [1, 1], conv.groups, input_size
                )
            except (AttributeError, RuntimeError):
                pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            return F.relu_(self.conv(x))
        c = self.conv
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, c.bias, list(c.padding), list(c.stride), [1, 1], c.groups, "relu", [], ""
        )


class CPUInferenceNet(nn.Module):
    def __init__(self, net: AlexNet | GroupedAlexNet, chunk: int = CHUNK, fused: bool = True, winograd: bool = True):
        super().__init__()
        grouped = net.to_grouped() if isinstance(net, AlexNet) else net
        self.config: AlexNetConfig = grouped.config
        self.chunk = chunk
        self.lrn = NHWCLocalResponseNorm(self.config.lrn, groups=1 if self.config.lrn_across_towers else 2)
        for name, shape in self.config.layer_shapes().items():
            layer, module = shape.layer, getattr(grouped, name)
            if layer.is_conv:
                if layer.after[:1] != ("relu",):
                    raise ValueError(f"{name}: ConvReLU fuses a ReLU, but the table has {layer.after} after it")
                if winograd and name in WINOGRAD:
                    setattr(self, name, WinogradConvReLU(module, *WINOGRAD[name]))
                else:  # oneDNN picks its weight layout for the shape the convolution reads
                    batch = (chunk or 1) if name in CHUNKED else FULL_BATCH
                    size = [batch, shape.inputs, shape.input_size, shape.input_size]
                    setattr(self, name, ConvReLU(module, size, fused))
            else:
                with torch.no_grad():
                    weight, bias = module.weight.detach().cpu(), module.bias.detach().cpu()
                    self.register_buffer(f"{name}_weight", weight.to_mkldnn(), persistent=False)
                    self.register_buffer(f"{name}_bias", bias.to_mkldnn(), persistent=False)
        self.eval()

    def _fc(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
        return torch._C._nn.mkldnn_linear(x.to_mkldnn(), weight, bias).to_dense()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, "fc8")

    def features(self, images: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """Hidden layer ``layer`` (fc6 or fc7, after the ReLU), as ``AlexNet.features``."""
        return self._run(images, check_feature_layer(layer))

    @torch.inference_mode()
    def _run(self, images: torch.Tensor, last: str) -> torch.Tensor:
        """Fig. 2 on one device, as GroupedAlexNet; each ConvReLU holds its ReLU, dropout is the identity."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {list(images.shape)}")
        images = images.float()
        x = torch.cat([self._conv1_to_pool2(part) for part in images.split(self.chunk or len(images))])
        x = self.conv3(x)
        x = self.conv4(x)
        x = _pool(self.conv5(x))
        x = F.relu_(self._fc("fc6", x.contiguous().flatten(1)))  # pool5 in NCHW order, as fc6's weights expect
        if last == "fc6":
            return x
        x = F.relu_(self._fc("fc7", x))
        if last == "fc7":
            return x
        return self._fc("fc8", x)

    def _conv1_to_pool2(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pad_image(images, self.config, CHANNELS_LAST))  # the zero-padded input, in one copy
        x = _pool(self.lrn(x))
        return _pool(self.lrn(self.conv2(x)))


def _pool(x: torch.Tensor) -> torch.Tensor:
    """On channels-last maps: PyTorch's max-pool is vectorised across channels there."""
    return F.max_pool2d(x, kernel_size=POOL_SIZE, stride=POOL_STRIDE)
