"""Winograd's F(m×m, r×r) gives the direct convolution's outputs, within float32 rounding."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import AlexNet, CPUInferenceNet
from model.cpu_inference import WINOGRAD
from model.winograd import WinogradConvReLU, winograd_matrices

POINTS_F4_3 = (0, 1, -1, 0.5, -2)
POINTS_F4_5 = (0, 1, -1, 2, -2, 0.5, -0.5)


@pytest.mark.parametrize("m, r, points", [(2, 3, (0, 1, -1)), (4, 3, POINTS_F4_3), (4, 5, POINTS_F4_5)])
def test_matrices_compute_the_correlation_exactly(m, r, points):
    """Aᵀ[(G g) ⊙ (Bᵀ d)] = Σ_k g[k] d[i+k] for every i < m: checked on the basis, so for every d and g."""
    a_t, g, b_t = winograd_matrices(m, r, points)
    n = m + r - 1
    assert a_t.shape == (m, n) and g.shape == (n, r) and b_t.shape == (n, n)
    for k in range(r):
        for j in range(n):
            # filter e_k, input e_j: output i is 1 exactly where j = i + k
            got = a_t @ (g[:, k] * b_t[:, j])
            want = torch.tensor([1.0 if j == i + k else 0.0 for i in range(m)], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_known_matrices_for_f2_3():
    """Lavin & Gray's F(2, 3) at 0, 1, -1 (their Bᵀ; A and G up to the sign of the point at ∞)."""
    a_t, g, b_t = winograd_matrices(2, 3, (0, 1, -1))
    torch.testing.assert_close(b_t.abs(), torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]],
                                                       dtype=torch.float64))
    assert a_t[0].tolist() == [1, 1, 1, 0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel, padding, groups, size, tile, points",
    [
        (96, 256, 5, 2, 2, 27, 4, POINTS_F4_5),  # conv2
        (256, 384, 3, 1, 1, 13, 4, POINTS_F4_3),  # conv3
        (16, 8, 3, 1, 2, 12, 4, POINTS_F4_3),  # output a whole number of tiles
        (6, 4, 3, 0, 1, 9, 2, (0, 1, -1)),  # no padding
    ],
)
def test_convolution_matches_the_direct_one(in_channels, out_channels, kernel, padding, groups, size, tile, points):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding, groups=groups)
    fast = WinogradConvReLU(conv, tile, points, chunk=4)
    for batch in (1, 5, 11):  # a partial chunk, chunks and a remainder
        x = torch.randn(batch, in_channels, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():  # the exact answer, in float64
            weight, bias = conv.weight.double(), conv.bias.double()
            want = F.relu(F.conv2d(x.double(), weight, bias, padding=padding, groups=groups))
        got = fast(x)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert (want > 0).float().mean() > 0.3  # the ReLU leaves plenty to compare
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error < 2e-5, error


def test_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="stride-1"):
        WinogradConvReLU(nn.Conv2d(3, 8, 3, stride=2), 4, POINTS_F4_3)
    with pytest.raises(ValueError, match="distinct finite points"):
        winograd_matrices(4, 3, (0, 1, -1, 2))


@pytest.mark.slow
def test_inference_net_gives_the_same_logits_with_and_without_winograd():
    assert set(WINOGRAD) == {"conv2", "conv3"}
    torch.manual_seed(4)
    net = AlexNet(num_classes=10, width=0.5)
    for name, p in net.named_parameters():  # activations O(1) in every layer, so every layer counts
        p.data.normal_(0, p[0].numel() ** -0.5 if name.endswith("weight") else 0.1)
    fast, direct = CPUInferenceNet(net.eval()), CPUInferenceNet(net, winograd=False)
    assert isinstance(fast.conv2, WinogradConvReLU) and isinstance(fast.conv3, WinogradConvReLU)
    assert not isinstance(direct.conv2, WinogradConvReLU)
    x = torch.randn(3, 3, 224, 224)
    want = direct(x)
    assert want.std() > 0.1
    torch.testing.assert_close(fast(x), want, atol=1e-5, rtol=1e-5)
