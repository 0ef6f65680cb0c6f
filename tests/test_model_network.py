"""The network against the paper's layer table: sizes, parameters, initialisation, towers, grouped form."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import PAPER_LRN, AlexNet, AlexNetConfig, GroupedAlexNet, LRNConfig
from model.lrn import LocalResponseNorm
from model.network import LAYER_NAMES

PAPER_PARAMETERS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


@pytest.fixture(scope="module")
def paper_net():
    torch.manual_seed(0)
    return AlexNet()


def layer_parameters(net: AlexNet, name: str) -> int:
    return sum(p.numel() for t in net.towers for p in getattr(t, name).parameters())


@pytest.mark.slow
def test_parameter_count_is_the_papers(paper_net):
    assert sum(p.numel() for p in paper_net.parameters()) == 60_965_224
    assert {name: layer_parameters(paper_net, name) for name in LAYER_NAMES} == PAPER_PARAMETERS
    assert sum(p.numel() for p in GroupedAlexNet().parameters()) == 60_965_224


def test_each_tower_holds_half_of_every_layer(paper_net):
    t0, t1 = paper_net.towers
    for name in LAYER_NAMES:
        assert getattr(t0, name).weight.shape == getattr(t1, name).weight.shape
    # Kernels per tower, and what each layer reads: "own" = half the previous layer, "both" = all of it.
    expected_in = {"conv1": 3, "conv2": 48, "conv3": 256, "conv4": 192, "conv5": 192, "fc6": 9216, "fc7": 4096, "fc8": 4096}
    expected_out = {"conv1": 48, "conv2": 128, "conv3": 192, "conv4": 192, "conv5": 128, "fc6": 2048, "fc7": 2048, "fc8": 500}
    for name in LAYER_NAMES:
        w = getattr(t0, name).weight
        assert w.shape[1] == expected_in[name], name
        assert w.shape[0] == expected_out[name], name


@pytest.mark.slow
def test_spatial_sizes_for_every_conv1_padding():
    sizes = {}
    for padding in ("overhang", "symmetric", "none"):
        net = GroupedAlexNet(AlexNetConfig(conv1_padding=padding)).eval()
        seen = {}
        for name in ("conv1", "conv2", "conv5"):
            getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[-1]))
        with torch.no_grad():
            net(torch.zeros(1, 3, net.config.input_size, net.config.input_size))
        sizes[padding] = seen
    for padding, seen in sizes.items():
        assert seen == {"conv1": 55, "conv2": 27, "conv5": 13}, padding


def test_overhang_padding_is_cuda_convnets_right_and_bottom_zeros():
    """The last conv1 window starts at 216 and reaches pixel 226: 3 zeros past the right/bottom edge."""
    net = GroupedAlexNet(AlexNetConfig(width=0.1)).eval()
    x = torch.randn(1, 3, 224, 224)
    expected = F.conv2d(F.pad(x, (0, 3, 0, 3)), net.conv1.weight, net.conv1.bias, stride=4)
    seen = {}
    net.conv1.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))  # clone: ReLU is in place
    with torch.no_grad():
        net(x)
    torch.testing.assert_close(seen["out"], expected)
    # The first window sees no padding: it is the image's top-left 11×11 patch.
    torch.testing.assert_close(
        seen["out"][0, :, 0, 0], (net.conv1.weight * x[0, :, :11, :11]).sum((1, 2, 3)) + net.conv1.bias
    )


@pytest.mark.slow
def test_paper_initialisation_per_layer(paper_net):
    bias_one = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for net_name, layers in (
        ("towers", {n: [getattr(t, n) for t in paper_net.towers] for n in LAYER_NAMES}),
        ("grouped", {n: [getattr(GroupedAlexNet(), n)] for n in LAYER_NAMES}),
    ):
        for name, modules in layers.items():
            w = torch.cat([m.weight.detach().flatten() for m in modules])
            b = torch.cat([m.bias.detach() for m in modules])
            # N(0, 0.01²): the sample std of ≥34k draws is within 3% of 0.01, the mean within 5 std errors.
            assert abs(w.std().item() - 0.01) < 0.0003, (net_name, name, w.std().item())
            assert abs(w.mean().item()) < 5 * 0.01 / w.numel() ** 0.5, (net_name, name)
            assert torch.all(b == (1.0 if name in bias_one else 0.0)), (net_name, name)


@pytest.mark.slow
def test_towers_and_grouped_form_give_the_same_logits():
    torch.manual_seed(1)
    net = AlexNet().eval()
    for p in net.parameters():  # random weights well away from the init, so every path matters
        p.data.normal_(0, 0.02)
    x = torch.randn(3, 3, 224, 224)
    grouped = net.to_grouped().eval()
    with torch.no_grad():
        towers_logits, grouped_logits = net(x), grouped(x)
    assert towers_logits.shape == (3, 1000)
    torch.testing.assert_close(towers_logits, grouped_logits, atol=1e-5, rtol=1e-5)
    # Not a degenerate comparison: logits spread well beyond the tolerance, and differ between images.
    assert towers_logits.std() > 0.05
    assert (towers_logits[0] - towers_logits[1]).abs().max() > 1e-2

    back = grouped.to_towers().eval()
    for a, b in zip(net.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert set(grouped.state_dict()) == {f"{n}.{k}" for n in LAYER_NAMES for k in ("weight", "bias")}
    assert grouped.state_dict()["conv2.weight"].shape == (256, 48, 5, 5)
    assert grouped.state_dict()["conv4.weight"].shape == (384, 192, 3, 3)
    assert grouped.state_dict()["conv5.weight"].shape == (256, 192, 3, 3)
    assert grouped.state_dict()["fc6.weight"].shape == (4096, 9216)


@pytest.mark.slow
def test_own_tower_layers_do_not_read_the_other_tower():
    """conv2/4/5 read their own tower only: tower 1's conv1 cannot change tower 0's pool2 maps,
    while conv3 (which reads both) sees it."""
    torch.manual_seed(2)
    net = AlexNet(width=0.25).eval()
    t0, t1 = net.towers
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before0, before1 = t0.conv1_to_pool2(x), t1.conv1_to_pool2(x)
        t1.conv1.weight.mul_(-3.0)
        after0, after1 = t0.conv1_to_pool2(x), t1.conv1_to_pool2(x)
        assert torch.equal(before0, after0)
        assert not torch.equal(before1, after1)
        conv3_before = t0.conv3_to_pool5(torch.cat([before0, before1], 1))
        conv3_after = t0.conv3_to_pool5(torch.cat([after0, after1], 1))
        assert not torch.equal(conv3_before, conv3_after)


@pytest.mark.slow
def test_forward_does_not_synchronise(monkeypatch):
    net = AlexNet(width=0.25).eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("forward() must not synchronise the device")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_towers_can_be_placed_on_the_same_device_twice():
    net = AlexNet(width=0.25, devices=("cpu", "cpu"))
    assert net.devices == (torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="two devices"):
        net.place(("cpu", "cpu", "cpu"))


@pytest.mark.slow
def test_dropout_only_in_training_and_no_relu_after_fc8():
    torch.manual_seed(3)
    net = AlexNet(width=0.25)
    x = torch.randn(2, 3, 224, 224)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    assert (a < 0).any()  # logits, not ReLU outputs
    net.train()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert not torch.equal(c, d)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


@pytest.mark.slow
def test_width_multiplier_scales_every_layer():
    config = AlexNetConfig(num_classes=10, width=0.25)
    assert config.channels == (24, 64, 96, 96, 64, 1024, 1024)
    net = AlexNet(num_classes=10, width=0.25).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    odd = AlexNet(num_classes=7, width=0.0625)
    assert [t.fc8.out_features for t in odd.towers] == [4, 3]
    with torch.no_grad():
        torch.testing.assert_close(odd.eval()(torch.randn(1, 3, 224, 224)).shape, torch.Size([1, 7]))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="conv1_padding"):
        AlexNetConfig(conv1_padding="same")
    with pytest.raises(ValueError, match="num_classes"):
        AlexNetConfig(num_classes=1)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4, 96, 55, 55), (2, 256, 27, 27), (1, 3, 5, 5)])
def test_lrn_equals_torch_local_response_norm(shape):
    torch.manual_seed(4)
    x = torch.randn(shape)  # 1e-6 absolute is a few float32 ulps at this scale
    reference = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    torch.testing.assert_close(LocalResponseNorm()(x.requires_grad_()), reference(x), atol=1e-6, rtol=0)
    with torch.inference_mode():  # the inference path computes in place, differently
        torch.testing.assert_close(LocalResponseNorm()(x), reference(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [3, 4, 5, 6])
def test_lrn_conventions_and_gradient(size):
    torch.manual_seed(5)
    x = (torch.randn(2, 9, 4, 4, dtype=torch.float64) * 20).requires_grad_()
    ours = LocalResponseNorm(LRNConfig(size=size, alpha=1e-3, beta=0.75, k=1.0, alpha_over_size=True))
    reference = nn.LocalResponseNorm(size, alpha=1e-3, beta=0.75, k=1.0)
    torch.testing.assert_close(ours(x), reference(x))
    g = torch.randn_like(x)
    (grad_ours,) = torch.autograd.grad(ours(x), x, g)
    (grad_reference,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(grad_ours, grad_reference)
    # The paper's convention: coefficient α multiplies the sum itself.
    paper = LocalResponseNorm(LRNConfig(size=size, alpha=1e-3 / size, beta=0.75, k=1.0))
    torch.testing.assert_close(paper(x), reference(x))


@pytest.mark.slow
@pytest.mark.parametrize("across", [False, True])
def test_towers_and_grouped_agree_when_lrn_matters(across):
    """A strong LRN (α=0.01) makes the normalisation window's reach decisive: the paper normalises
    within each tower, Caffe across both; both forms must compute the same one."""
    torch.manual_seed(6)
    strong = LRNConfig(alpha=1e-2)
    net = AlexNet(num_classes=10, width=0.25, lrn=strong, lrn_across_towers=across).eval()
    for name, p in net.named_parameters():  # weights that keep activations O(1) layer after layer
        p.data.normal_(0, p[0].numel() ** -0.5 if name.endswith("weight") else 0.1)
    x = torch.randn(2, 3, 224, 224) * 3
    with torch.no_grad():
        towers_logits = net(x)
        grouped_logits = net.to_grouped().eval()(x)
        other = AlexNet(num_classes=10, width=0.25, lrn=strong, lrn_across_towers=not across).eval()
        other.load_grouped_state_dict(net.grouped_state_dict())
        other_logits = other(x)
    torch.testing.assert_close(towers_logits, grouped_logits, atol=1e-5, rtol=1e-5)
    assert (towers_logits - other_logits).abs().max() > 1e-3  # the window's reach is visible in the logits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lrn_under_autocast_computes_in_float32(dtype):
    """Activations of a few hundred (common after conv1's ReLU early in training) square to more than
    fp16's 65504: computed in fp16, the denominator is inf and LRN outputs 0 with a zero gradient."""
    torch.manual_seed(6)
    x32 = torch.rand(2, 16, 5, 5) * 200 + 150  # every map ≥ 150: Σ of 5 squares ≥ 112,500
    reference = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    expected = reference(x32)
    g = torch.randn_like(x32)
    tolerance = {"atol": 0, "rtol": 1e-2 if dtype == torch.float16 else 2e-2}  # the output's own rounding
    lrn = LocalResponseNorm()
    for inference in (False, True):
        x = x32.detach().to(dtype).requires_grad_(not inference)
        with torch.autocast("cpu", dtype=dtype), torch.set_grad_enabled(not inference):
            out = lrn(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected.detach(), **tolerance)
        if not inference:
            (grad,) = torch.autograd.grad(out, x, g.to(dtype))
            # against float32 at the same (rounded) input: the gradient has cancellations, so judge its error
            # against its scale
            rounded = x.detach().float().requires_grad_()
            (expected_grad,) = torch.autograd.grad(reference(rounded), rounded, g)
            scale = expected_grad.abs().max().item()
            assert grad.float().abs().max() > 0.5 * scale  # not zeroed
            torch.testing.assert_close(grad.float(), expected_grad, atol=2e-2 * scale, rtol=0)
    # The service's channels-last net uses the same inference function.
    from model.lrn import lrn_inference

    torch.testing.assert_close(lrn_inference(x32.detach().to(dtype), PAPER_LRN).float(), expected.detach(), **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["fc6", "fc7"])
def test_features_are_the_towers_hidden_activations_in_every_form(layer):
    """The paper's Fig. 4 retrieval features: the towers' activations after the ReLU, tower 0's half first;
    the grouped net and the CPU inference net give the same numbers, and batching does not change them."""
    from model import CPUInferenceNet

    torch.manual_seed(7)
    net = AlexNet(num_classes=10, width=0.25).eval()
    x = torch.randn(5, 3, 224, 224) * 50
    captured = {}
    towers = net.towers
    handles = [getattr(t, layer).register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.relu()))
               for k, t in enumerate(towers)]  # fmt: skip
    with torch.no_grad():
        net(x)
        features = net.features(x, layer)
    for h in handles:
        h.remove()
    assert features.shape == (5, net.config.channels[5 if layer == "fc6" else 6])
    torch.testing.assert_close(features, torch.cat([captured[0], captured[1]], dim=1), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(net.to_grouped().eval().features(x, layer), features, rtol=1e-5, atol=1e-5)
    cpu = CPUInferenceNet(net)
    torch.testing.assert_close(cpu.features(x, layer), features, rtol=1e-4, atol=1e-4)
    one_by_one = torch.cat([cpu.features(x[i : i + 1], layer) for i in range(len(x))])
    torch.testing.assert_close(one_by_one, cpu.features(x, layer), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fc6, fc7"):
        net.features(x, "conv5")
