"""The net laid out by hand for CPU inference: the same function as AlexNet, arranged for oneDNN.

    fast = CPUInferenceNet(net)   # net: AlexNet or GroupedAlexNet; a frozen copy of its weights
    logits = fast(images)         # NCHW float32 images, exactly what AlexNet takes

What it changes, each measured with bench/model_throughput.py on a 2-core AVX2 machine:
- Activations stay channels-last (NHWC) from conv1 to pool5. oneDNN's convolutions run their fastest
  kernels on NHWC, and PyTorch's NHWC max-pool is vectorised across channels while its NCHW one is
  scalar code; no layout copies are left between layers.
- LRN works on rows of one tower's channels (in NHWC a pixel's channels are contiguous), and conv1 to
  pool2 run over a few images at a time, so that LRN's elementwise passes hit the cache instead of main
  memory.
- fc6, fc7 and fc8 use oneDNN's inner product on weights kept in oneDNN's own layout, well ahead of the
  general matmul for a batch of a few dozen rows (1.5-1.8× for fc6 at batch 32 here).
- Each convolution and its ReLU are one oneDNN call, on weights reordered into oneDNN's layout once
  (ConvReLU): +12 % at batch 1, +4 % at batch 8.
- conv2 and conv3 use Winograd's minimal filtering (winograd.py), which does 5.8× (conv2, 5×5 on 27×27
  maps) and 2.6× (conv3, 3×3 on 13×13, where 4×4 tiles overhang the maps) fewer multiply-adds than the
  direct convolution for the price of memory passes over the transformed tiles: +8-13 % for the whole net
  at batch 8 and 32. conv4 and conv5 (grouped, 192 input channels per group) gained nothing from it, so
  they stay direct.
- Building one calls malloc.keep_freed_memory(): the process then reuses the pages its last forward pass
  freed instead of faulting fresh ones in (see malloc.py).
Training does not use this path: it keeps network.py's modules and their autograd. Tests check that both
give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lrn import LRNConfig, lrn_inference
from .malloc import keep_freed_memory
from .network import CONV1_PADDING, AlexNet, AlexNetConfig, GroupedAlexNet, check_feature_layer
from .winograd import WinogradConvReLU

CHANNELS_LAST = torch.channels_last
CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_NAMES = ("fc6", "fc7", "fc8")
CHUNK = 8  # images per pass through conv1..pool2: their LRN buffers then stay in a 32 MiB L3 cache
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
    time, into oneDNN's blocked layout (otherwise every call reorders them again: ~2 ms of a batch-1 pass).

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
        keep_freed_memory()
        grouped = net.to_grouped() if isinstance(net, AlexNet) else net
        self.config: AlexNetConfig = grouped.config
        self.chunk = chunk
        self.conv1_padding = CONV1_PADDING[self.config.conv1_padding]
        self.lrn = NHWCLocalResponseNorm(self.config.lrn, groups=1 if self.config.lrn_across_towers else 2)
        size = self.config.input_size + sum(self.conv1_padding[:2])
        c1, c2, c3, c4, _, _, _ = self.config.channels
        input_sizes = {  # what each convolution reads; oneDNN picks its weight layout for this shape
            "conv1": [chunk or 1, 3, size, size], "conv2": [chunk or 1, c1, 27, 27],
            "conv3": [32, c2, 13, 13], "conv4": [32, c3, 13, 13], "conv5": [32, c4, 13, 13],
        }
        for name in CONV_NAMES:
            conv = getattr(grouped, name)
            if winograd and name in WINOGRAD:
                setattr(self, name, WinogradConvReLU(conv, *WINOGRAD[name]))
            else:
                setattr(self, name, ConvReLU(conv, input_sizes[name], fused))
        with torch.no_grad():
            for name in FC_NAMES:
                fc = getattr(grouped, name)
                self.register_buffer(f"{name}_weight", fc.weight.detach().cpu().to_mkldnn(), persistent=False)
                self.register_buffer(f"{name}_bias", fc.bias.detach().cpu().to_mkldnn(), persistent=False)
        self.eval()

    def _padded_nhwc(self, images: torch.Tensor) -> torch.Tensor:
        """The zero-padded conv1 input, channels-last, in one copy."""
        left, right, top, bottom = self.conv1_padding
        n, c, h, w = images.shape
        out = torch.empty((n, c, top + h + bottom, left + w + right), memory_format=CHANNELS_LAST)
        out[:, :, top : top + h, left : left + w] = images
        if any(self.conv1_padding):
            out[:, :, :top].zero_(), out[:, :, top + h :].zero_()
            out[:, :, :, :left].zero_(), out[:, :, :, left + w :].zero_()
        return out

    def _conv1_to_pool2(self, images: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.lrn(self.conv1(self._padded_nhwc(images))), kernel_size=3, stride=2)
        return F.max_pool2d(self.lrn(self.conv2(x)), kernel_size=3, stride=2)

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
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {list(images.shape)}")
        images = images.float()
        x = torch.cat([self._conv1_to_pool2(part) for part in images.split(self.chunk or len(images))])
        x = F.max_pool2d(self.conv5(self.conv4(self.conv3(x))), kernel_size=3, stride=2)  # each with its ReLU
        x = x.contiguous().flatten(1)  # NCHW order, which fc6's weights expect
        x = F.relu_(self._fc("fc6", x))
        if last == "fc6":
            return x
        x = F.relu_(self._fc("fc7", x))
        if last == "fc7":
            return x
        return self._fc("fc8", x)
