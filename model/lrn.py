"""Local response normalisation across channels (paper §3.3).

    b[c] = a[c] / (k + coefficient · Σ_{c' in window(c)} a[c']²) ** β

The paper writes the coefficient as α; PyTorch, ONNX and Caffe write it as α/n. ``LRNConfig`` keeps α and
its convention, so both the paper's constants and Caffe's round-trip through a checkpoint unchanged.
The window sum is n shifted adds of the squares: the same numbers as ``nn.LocalResponseNorm``, faster.
LRN always computes in float32, because half precision overflows or loses the denominator.
docs/model-internals.md has the details.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn


@dataclass(frozen=True)
class LRNConfig:
    size: int = 5  # n: channels in the window
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    alpha_over_size: bool = False  # False: paper's k + α·Σa²;  True: PyTorch/Caffe's k + (α/n)·Σa²

    @property
    def coefficient(self) -> float:
        """What multiplies the window sum of squares."""
        return self.alpha / self.size if self.alpha_over_size else self.alpha

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LRNConfig":
        return cls(**{f.name: type(f.default)(d[f.name]) for f in fields(cls)})


PAPER_LRN = LRNConfig()
CAFFE_LRN = LRNConfig(size=5, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True)


def channel_window_sum(x: torch.Tensor, size: int, transpose: bool = False) -> torch.Tensor:
    """Sum of x over a window of ``size`` channels around each channel, zero outside (dim 1).

    The window of channel c is [c - size//2, c + (size-1)//2], as in ``nn.LocalResponseNorm``;
    ``transpose`` mirrors it (the same for odd sizes).
    """
    channels = x.shape[1]
    below, above = (size // 2, (size - 1) // 2) if not transpose else ((size - 1) // 2, size // 2)
    out = x.clone()
    for offset in range(1, below + 1):  # channels below c
        if offset < channels:
            out[:, offset:] += x[:, : channels - offset]
    for offset in range(1, above + 1):  # channels above c
        if offset < channels:
            out[:, : channels - offset] += x[:, offset:]
    return out


class _LRNFunction(torch.autograd.Function):
    """b = x · d^-β with d = k + c·W(x²); W sums a channel window.

    Hand-written backward (as Caffe's): grad_x = g·d^-β − 2cβ·x·Wᵀ(g·b/d). It saves x and d instead of
    autograd's half-dozen intermediates, and every step works in place on few buffers: on CPU the cost
    of this layer is memory traffic and page faults, not arithmetic.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, coefficient: float, beta: float, k: float) -> torch.Tensor:
        d = _denominator_base(x, size, coefficient, k)
        out = d.pow(-beta).mul_(x)
        ctx.save_for_backward(x, d, out)
        ctx.lrn = (size, coefficient, beta)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, d, out = ctx.saved_tensors
        size, coefficient, beta = ctx.lrn
        ratio = (grad_out * out).div_(d)
        # Wᵀ is the window mirrored: [c - (size-1)//2, c + size//2].
        spread = channel_window_sum(ratio, size, transpose=True)
        grad_x = d.pow(-beta).mul_(grad_out).sub_(spread.mul_(x).mul_(2 * coefficient * beta))
        return grad_x, None, None, None, None


def _denominator_base(x: torch.Tensor, size: int, coefficient: float, k: float) -> torch.Tensor:
    """k + coefficient · W(x²), in one fresh buffer."""
    return channel_window_sum(x * x, size).mul_(coefficient).add_(k)


HALF_PRECISION = (torch.float16, torch.bfloat16)


def lrn_inference(x: torch.Tensor, config: LRNConfig) -> torch.Tensor:
    """b = x · d^-β over dim 1, with nothing kept for backward: the denominator's buffer becomes the output."""
    if x.dtype in HALF_PRECISION:  # see the module docstring: float32 inside, the input's dtype outside
        return lrn_inference(x.float(), config).to(x.dtype)
    c = config
    d = _denominator_base(x, c.size, c.coefficient, c.k)
    if c.beta == 0.75:  # the paper's and Caffe's: d^-3/4 = r·√r with r = 1/√d, cheaper than exp and log
        r = d.rsqrt_()
        return r.sqrt().mul_(r).mul_(x)
    # d^-β as exp(-β·log d): on CPU these vectorised passes beat pow's one
    return d.log_().mul_(-c.beta).exp_().mul_(x)


class LocalResponseNorm(nn.Module):
    def __init__(self, config: LRNConfig = PAPER_LRN):
        super().__init__()
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dtype in HALF_PRECISION:  # float32 inside (module docstring); the casts are differentiable
            return self.forward(x.float()).to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _LRNFunction.apply(x, c.size, c.coefficient, c.beta, c.k)
        return lrn_inference(x, c)

    def extra_repr(self) -> str:
        c = self.config
        return f"size={c.size}, coefficient={c.coefficient:g}, beta={c.beta}, k={c.k}"
