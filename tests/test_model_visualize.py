"""model.visualize.filters_image: the paper's Fig. 3 — conv1's kernels, tower 0's above tower 1's."""

import pytest
import torch

from model import AlexNet
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
