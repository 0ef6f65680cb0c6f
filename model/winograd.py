"""Winograd's minimal filtering for stride-1 convolutions (Lavin & Gray 2016), channels-last, for CPU inference.

F(m×m, r×r) gets an m×m tile of an r×r convolution's output from an (m+r-1)×(m+r-1) tile of its input:

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

For conv2 (5×5) F(4×4, 5×5) does 64 multiplies per tile and channel pair where the direct one does 400.
The matrices come from Toom-Cook interpolation; float32 outputs stay within a few 1e-6 of the direct
convolution's. docs/model-internals.md has the derivation and the costs.
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST = torch.channels_last


def winograd_matrices(m: int, r: int, points: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Aᵀ (m×n), G (n×r) and Bᵀ (n×n), float64, n = m+r-1, for F(m, r) at ``points`` (n-1 of them) and ∞.

    Correlating an n-sample input d with an r-tap filter g is Aᵀ[(G g) ⊙ (Bᵀ d)]: the transpose of
    multiplying polynomials by evaluating both at n points and interpolating. With V_k the Vandermonde
    matrix of the points for polynomials of k coefficients (∞'s row picks the leading one), Aᵀ = V_mᵀ,
    G = V_r and Bᵀ = V_n⁻ᵀ. Each row of Bᵀ is then scaled to a largest entry of 1 and the scale moved to
    G's row, where it is applied once to the weights instead of to every input tile.
    """
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")

    def vandermonde(columns: int) -> torch.Tensor:
        """Row j: the powers 0..columns-1 of point j; the last row (∞) picks the leading coefficient."""
        rows = [[float(point) ** k for k in range(columns)] for point in points] + [[0.0] * (columns - 1) + [1.0]]
        return torch.tensor(rows, dtype=torch.float64)

    a_t = vandermonde(m).T.contiguous()
    g = vandermonde(r)
    b_t = torch.linalg.inv(vandermonde(n)).T.contiguous()
    scale = b_t.abs().amax(dim=1, keepdim=True)
    return a_t, g * scale, b_t / scale


class WinogradConvReLU(nn.Module):
    """ReLU(conv(x)) for a stride-1 ``nn.Conv2d`` by F(tile×tile, r×r), on channels-last batches.

    Takes and gives what ConvReLU does: [N, C, H, W] tensors laid out channels-last. ``chunk`` images go
    through the transforms at a time, so that the transformed tiles (several times the input) stay in the
    cache.
    """

    def __init__(self, conv: nn.Conv2d, tile: int, points: tuple[float, ...], chunk: int = 8):
        super().__init__()
        r = conv.kernel_size[0]
        if (conv.kernel_size[1] != r or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.padding[0] != conv.padding[1] or conv.padding_mode != "zeros"):
            raise ValueError(f"Winograd needs a square, stride-1, undilated, zero-padded convolution, got {conv}")
        a_t, g, b_t = winograd_matrices(tile, r, points)
        self.tile, self.kernel, self.padding, self.chunk = tile, r, conv.padding[0], chunk
        self.groups, self.out_channels = conv.groups, conv.out_channels
        self.register_buffer("a_t", a_t.float(), persistent=False)
        self.register_buffer("b_t", b_t.float(), persistent=False)
        # The filters transformed once, in float64: [α·α·groups, in/group, out/group], one matrix per
        # point pair (α = tile + r - 1) and group, ready for the batched product.
        weight = conv.weight.detach().cpu().double()
        out_per_group, in_per_group = weight.shape[0] // conv.groups, weight.shape[1]
        alpha = tile + r - 1
        u = torch.einsum("ak,oikl,bl->aboi", g, weight, g)
        u = u.reshape(alpha, alpha, conv.groups, out_per_group, in_per_group).transpose(3, 4)
        self.register_buffer("u", u.reshape(-1, in_per_group, out_per_group).float().contiguous(), persistent=False)
        self.register_buffer("bias", conv.bias.detach().cpu().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        size = (h + 2 * self.padding - self.kernel + 1, w + 2 * self.padding - self.kernel + 1)
        out = torch.empty((n, self.out_channels, *size), device=x.device, memory_format=CHANNELS_LAST)
        for start in range(0, n, self.chunk):
            self._forward_chunk(x[start : start + self.chunk], out[start : start + self.chunk])
        return out

    def _forward_chunk(self, x: torch.Tensor, out: torch.Tensor) -> None:
        n, channels, h, w = x.shape
        m, alpha, pad, groups = self.tile, self.tile + self.kernel - 1, self.padding, self.groups
        out_h, out_w = out.shape[2:]
        tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
        # Zero-padded input, large enough for whole tiles: [n, H', W', C].
        padded = x.new_zeros((n, m * tiles_h + self.kernel - 1, m * tiles_w + self.kernel - 1, channels))
        padded[:, pad : pad + h, pad : pad + w] = x.permute(0, 2, 3, 1)
        # Every tile's α×α window, gathered as [α, α, group, n, tile row, tile column, channel in group].
        s = padded.stride()
        per_group = channels // groups
        windows = padded.as_strided(
            (alpha, alpha, groups, n, tiles_h, tiles_w, per_group),
            (s[1], s[2], per_group, s[0], m * s[1], m * s[2], 1),
        )
        # Names are reused so that each buffer is freed as soon as the next is made: the process's peak,
        # and glibc's handing back of freed memory, stay small.
        t = windows.reshape(alpha, -1)
        del padded, windows
        t = torch.matmul(self.b_t, (self.b_t @ t).view(alpha, alpha, -1))  # Bᵀ d B for every tile
        t = torch.bmm(t.view(alpha * alpha * groups, -1, per_group), self.u)  # the products, summed over channels
        y = torch.matmul(self.a_t, (self.a_t @ t.view(alpha, -1)).view(m, alpha, -1))  # Aᵀ · A
        del t
        # y is [i, j, group, n, tile row, tile column, out channel]: output pixel (m·row + i, m·column + j).
        y = y.view(m, m, groups, n, tiles_h, tiles_w, -1).permute(3, 4, 0, 5, 1, 2, 6)
        if (out_h, out_w) == (m * tiles_h, m * tiles_w):
            whole = out.permute(0, 2, 3, 1).view(n, tiles_h, m, tiles_w, m, groups, -1)
            torch.add(y, self.bias.view(groups, -1), out=whole)
            out.relu_()
        else:  # the last tiles overhang the output: add the bias on whole tiles, crop while taking the ReLU
            whole = x.new_empty((n, tiles_h, m, tiles_w, m, groups, self.out_channels // groups))
            torch.add(y, self.bias.view(groups, -1), out=whole)
            torch.clamp(whole.view(n, m * tiles_h, m * tiles_w, -1)[:, :out_h, :out_w], min=0,
                        out=out.permute(0, 2, 3, 1))
