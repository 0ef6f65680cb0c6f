"""CPUInferenceNet is the same function as AlexNet, laid out for oneDNN: same logits, frozen weights."""

import platform
import resource

import pytest
import torch
from torch import nn

from model import AlexNet, CPUInferenceNet, LRNConfig
from model.cpu_inference import NHWCLocalResponseNorm
from model.malloc import keep_freed_memory


def scaled_weights_(net: AlexNet, seed: int) -> AlexNet:
    """Weights that keep activations O(1) layer after layer, so every layer shapes the logits."""
    torch.manual_seed(seed)
    for name, p in net.named_parameters():
        p.data.normal_(0, p[0].numel() ** -0.5 if name.endswith("weight") else 0.1)
    return net.eval()


@pytest.mark.slow
def test_paper_net_gives_the_towers_logits():
    net = scaled_weights_(AlexNet(), seed=1)
    x = torch.randn(10, 3, 224, 224)  # 10 = one full chunk of 8 and a partial one
    with torch.no_grad():
        expected = net(x)
    fast = CPUInferenceNet(net)
    got = fast(x)
    assert got.shape == (10, 1000) and got.dtype == torch.float32
    assert expected.std() > 0.1 and (expected[0] - expected[1]).abs().max() > 1e-2  # not a degenerate case
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The chunking of conv1..pool2 does not change any image's answer.
    torch.testing.assert_close(CPUInferenceNet(net, chunk=3)(x), got, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x[4:5]), got[4:5], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("padding", ["overhang", "symmetric", "none"])
def test_every_configuration_gives_the_same_logits(across, padding):
    """A strong LRN makes the window's reach (own tower or both) decide the logits."""
    strong = LRNConfig(alpha=1e-2)
    net = scaled_weights_(
        AlexNet(num_classes=10, width=0.25, lrn=strong, lrn_across_towers=across, conv1_padding=padding), seed=2
    )
    size = net.config.input_size
    x = torch.randn(3, 3, size, size) * 3
    with torch.no_grad():
        expected = net(x)
        other = AlexNet(num_classes=10, width=0.25, lrn=strong, lrn_across_towers=not across, conv1_padding=padding)
        other.load_grouped_state_dict(net.grouped_state_dict())
        assert (other.eval()(x) - expected).abs().max() > 1e-3
    for source in (net, net.to_grouped()):
        torch.testing.assert_close(CPUInferenceNet(source)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_weights_are_a_frozen_copy():
    net = scaled_weights_(AlexNet(num_classes=10, width=0.25), seed=3)
    fast = CPUInferenceNet(net)
    x = torch.randn(2, 3, 224, 224)
    before = fast(x)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    torch.testing.assert_close(fast(x), before)
    assert not any(p.requires_grad for p in fast.parameters())
    assert fast(x).requires_grad is False


@pytest.mark.parametrize("beta", [0.75, 0.6])  # 0.75 has its own arithmetic
@pytest.mark.parametrize("groups", [1, 2])
def test_nhwc_lrn_equals_torch_local_response_norm(groups, beta):
    torch.manual_seed(4)
    reference = nn.LocalResponseNorm(5, alpha=5e-4, beta=beta, k=2.0)
    for scale, tolerance in ((1, dict(atol=1e-6, rtol=0)), (30, dict(atol=0, rtol=1e-6))):  # 30: LRN bites
        x = torch.randn(3, 96, 9, 7) * scale
        expected = reference(x.view(3 * groups, 96 // groups, 9, 7)).view(3, 96, 9, 7)
        with torch.inference_mode():
            got = NHWCLocalResponseNorm(LRNConfig(beta=beta), groups)(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, **tolerance)
        if scale > 1:
            assert (expected - x).abs().max() > 0.5 * x.abs().max()  # the normalisation is strong here


def test_bad_input_shape_is_a_clear_error():
    fast = CPUInferenceNet(AlexNet(num_classes=10, width=0.25))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        fast(torch.randn(3, 224, 224))


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_forward_passes_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """Without keep_freed_memory a full-size pass at batch 8 faults in ~9,000 fresh pages every time
    (glibc hands its freed activations back to the kernel); with it, the freed pages are used again."""
    fast = CPUInferenceNet(AlexNet())  # the service and predict set the thresholds themselves, as here
    assert keep_freed_memory() is True
    x = torch.randn(8, 3, 224, 224)
    for _ in range(2):
        fast(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        fast(x)
    faults_per_pass = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults_per_pass < 1000


@pytest.mark.slow
def test_fused_convolutions_match_the_plain_ones():
    """ConvReLU's one-call oneDNN path (pre-reordered weights) and its fallback compute the same thing."""
    net = scaled_weights_(AlexNet(num_classes=10, width=0.25), seed=7)
    fused, plain = CPUInferenceNet(net, winograd=False), CPUInferenceNet(net, fused=False, winograd=False)
    assert all(getattr(fused, n).packed_weight is not None for n in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    assert all(getattr(plain, n).packed_weight is None for n in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    for batch in (1, 5, 17):  # batch sizes other than the one the weights were laid out for
        x = torch.randn(batch, 3, 224, 224)
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-5)
