"""model.visualize: filters_image (the paper's Fig. 3 — conv1's kernels, tower 0's above tower 1's) and
grad_cam on a net whose weights the test writes."""

import io

import pytest
import torch

from model import AlexNet, Preprocessing, Preprocessor
from model.visualize import KERNEL_SCALE, filters_image, kernel_position


@pytest.mark.slow
@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_a_planted_kernel_appears_where_and_as_it_should(channel_order):
    torch.manual_seed(0)
    weight = AlexNet().towers[0].conv1.weight.detach().repeat(2, 1, 1, 1).clone()  # [96, 3, 11, 11]
    red = 0 if channel_order == "RGB" else 2  # Caffe's BGR weights keep red in channel 2
    weight[48 + 5] = -1.0
    weight[48 + 5, red] = 1.0  # tower 1's kernel 5: pure red
    weight[7] = torch.linspace(-1, 1, 11).repeat(3, 11, 1)  # tower 0's kernel 7: a grey ramp, dark → light
    image = filters_image(weight, channel_order)
    size = 11 * KERNEL_SCALE
    x, y = kernel_position(1, 5, columns=16, rows=3)
    tile = image.crop((x, y, x + size, y + size))
    assert set(tile.get_flattened_data()) == {(255, 0, 0)}
    x, y = kernel_position(0, 7, columns=16, rows=3)
    ramp = image.crop((x, y, x + size, y + size))
    assert ramp.getpixel((0, 5)) == (0, 0, 0) and ramp.getpixel((size - 1, 5)) == (255, 255, 255)
    assert all(r == g == b for r, g, b in ramp.get_flattened_data())  # colour-agnostic, as the paper saw in one tower
    # Tower 1's block lies wholly below tower 0's.
    assert kernel_position(1, 0, 16, 3)[1] > kernel_position(0, 47, 16, 3)[1] + size


def test_narrow_nets_and_bad_shapes():
    weight = torch.randn(6, 3, 11, 11)  # width 1/16: 3 kernels per tower, one row each
    image = filters_image(weight)
    assert image.width == 2 + 3 * (11 * KERNEL_SCALE + 2)
    with pytest.raises(ValueError, match="conv1 weights"):
        filters_image(torch.randn(6, 1, 11, 11))


# Grad-CAM on a net whose weights the test writes, so that where the evidence for each class lies is known
# exactly and no training (whose outcome depends on the CPU's kernels) is involved.
GREY = 128
PRIMARY = ((255, GREY, GREY), (GREY, 255, GREY), (GREY, GREY, 255))  # class k: channel k brighter than grey


def colour_detector_net(width: float = 0.125) -> AlexNet:
    """A 3-class net in which class k's logit sums, over the image, where channel k is brighter than grey.

    Tower 0's conv1 map k reads channel k alone, uniformly over its 11×11 window; conv2 … conv5 pass map k
    on through their centre taps; fc6 unit k sums map k over pool5's positions; fc7 passes it on; fc8 class
    k reads it. Every other weight and every bias is 0, so on a grey background only the object's own map
    is non-zero, and only where the object is."""
    net = AlexNet(3, width=width)
    state = {name: torch.zeros_like(value) for name, value in net.grouped_state_dict().items()}
    pool5_positions = 6 * 6
    for k in range(3):
        # Inputs are pixel − 128 (see the preprocessing below), so a window fully covered by the object gives
        # 121 × 127 / 4000 ≈ 3.8: LRN's denominator stays near k=2 and the maps stay comparable across layers.
        state["conv1.weight"][k, k] = 1 / 4000
        state["conv2.weight"][k, k, 2, 2] = 1  # groups=2: output k < half reads tower 0's input k
        for name in ("conv3", "conv4", "conv5"):
            state[f"{name}.weight"][k, k, 1, 1] = 1
        state["fc6.weight"][k, k * pool5_positions : (k + 1) * pool5_positions] = 1  # map k, flattened
        state["fc7.weight"][k, k] = 1
        state["fc8.weight"][k, k] = 1
    net.load_grouped_state_dict(state)
    return net


def scene(*objects: tuple[int, int, int]) -> bytes:
    """A 256×256 grey PNG with 80×80 squares of the given classes at (class, left, top)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 256), (GREY,) * 3)
    draw = ImageDraw.Draw(image)
    for kind, left, top in objects:
        draw.rectangle((left, top, left + 79, top + 79), fill=PRIMARY[kind])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def heat_centre(heat: torch.Tensor) -> tuple[float, float]:
    """The heat map's centre of mass, (column, row), in crop pixels."""
    total = heat.sum()
    positions = torch.arange(heat.shape[0], dtype=heat.dtype)
    return float((heat.sum(0) * positions).sum() / total), float((heat.sum(1) * positions).sum() / total)


def test_grad_cam_points_at_each_class_s_own_object():
    """Two objects of different classes in one image: each class's heat map lies on its own object (inside
    its square, within the 4-pixel stride of conv1's grid), and nowhere on the other one. This catches a
    map that is flipped or transposed, that ignores the class asked for (plain activations would light both
    objects) or the gradient's sign (a map of zeros)."""
    from model.visualize import grad_cam

    net = colour_detector_net()
    preprocessor = Preprocessor(Preprocessing(mean=(GREY, GREY, GREY)))
    offset = (256 - 224) // 2  # the centre crop's first pixel in the 256 image
    layouts = [((0, 24, 40), (2, 150, 140)), ((1, 150, 24), (0, 30, 150)), ((2, 24, 150), (1, 140, 30))]
    for objects in layouts:
        x = preprocessor.from_bytes(scene(*objects))
        for kind, left, top in objects:
            heat, explained, probability = grad_cam(net, x, kind)
            assert explained == kind and 0 < probability <= 1 and heat.shape == (224, 224)
            column, row = heat_centre(heat)
            low_x, low_y = left - offset, top - offset  # the square in crop pixels
            assert low_x - 4 <= column <= low_x + 83 and low_y - 4 <= row <= low_y + 83, (objects, kind, column, row)
            _, other_left, other_top = next(o for o in objects if o[0] != kind)
            inside_x, inside_y = other_left - offset + 16, other_top - offset + 16  # the other square, less its rim
            other = heat[inside_y : inside_y + 48, inside_x : inside_x + 48]
            assert other.max() == 0, (objects, kind, float(other.max()))
            assert heat.max() == 1  # normalised: the class's own object is where its heat is


def test_grad_cam_explains_the_top_class_unless_told():
    from model.visualize import grad_cam

    net = colour_detector_net()
    x = Preprocessor(Preprocessing(mean=(GREY, GREY, GREY))).from_bytes(scene((1, 30, 30)))
    _, explained, probability = grad_cam(net, x)
    assert explained == 1 and probability > 0.5  # only the green map fires
    with pytest.raises(ValueError, match="outside 0..2"):
        grad_cam(net, x, 3)
