"""Looking inside the net: the paper's Fig. 3 (conv1's kernels, tower by tower) and Grad-CAM heat maps.

``filters_image(weights)`` draws conv1's kernels as Fig. 3 does: tower 0's on the upper rows, tower 1's
below, each scaled to its own full range. "BGR" weights (Caffe's) are shown as RGB.
``grad_cam(net, x)`` (Selvaraju et al. 2017) weighs conv5's maps, after the ReLU, by the class logit's
gradient, on the two-tower ``AlexNet``. ``overlay`` draws the heat map over the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .network import AlexNet

KERNEL_SCALE = 4  # each 11×11 kernel drawn 44×44 pixels
GAP = 2  # pixels between kernels
TOWER_GAP = 8  # pixels between the towers' blocks
COLUMNS = 16  # kernels per row: 48 per tower → 3 rows each at full width


def filters_image(conv1_weight: torch.Tensor, channel_order: str = "RGB", scale: int = KERNEL_SCALE) -> Image.Image:
    """conv1's kernels [K, 3, h, w] (grouped layout: tower 0's K/2 first) → an RGB picture, tower 0 above."""
    weight = conv1_weight.detach().float().cpu()
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected conv1 weights [K, 3, h, w], got {list(weight.shape)}")
    if channel_order == "BGR":
        weight = weight.flip(1)
    kernels, _, h, w = weight.shape
    low = weight.amin(dim=(1, 2, 3), keepdim=True)
    high = weight.amax(dim=(1, 2, 3), keepdim=True)
    pixels = ((weight - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)
    halves = (pixels[: kernels - kernels // 2], pixels[kernels - kernels // 2 :])
    columns = min(COLUMNS, len(halves[0]))
    rows = -(-len(halves[0]) // columns)
    cell_h, cell_w = h * scale + GAP, w * scale + GAP
    block_h = rows * cell_h
    canvas = Image.new("RGB", (columns * cell_w + GAP, 2 * block_h + TOWER_GAP + GAP), (255, 255, 255))
    for tower, half in enumerate(halves):
        for i, kernel in enumerate(half):
            row, column = divmod(i, columns)
            tile = Image.frombytes("RGB", (w, h), kernel.permute(1, 2, 0).contiguous().numpy().tobytes())
            tile = tile.resize((w * scale, h * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, kernel_position(tower, i, columns, rows, h, w, scale))
    return canvas


def kernel_position(
    tower: int, index: int, columns: int, rows: int, h: int = 11, w: int = 11, scale: int = KERNEL_SCALE
) -> tuple[int, int]:
    """Top-left pixel of kernel ``index`` of ``tower`` in ``filters_image``."""
    row, column = divmod(index, columns)
    top = tower * (rows * (h * scale + GAP) + TOWER_GAP) + GAP + row * (h * scale + GAP)
    return GAP + column * (w * scale + GAP), top


def grad_cam(net: AlexNet, x: torch.Tensor, class_index: int | None = None) -> tuple[torch.Tensor, int, float]:
    """x: one preprocessed input [1, 3, S, S]. Returns (heat map [S, S] in [0, 1] on the CPU, the class
    explained — the top class unless given — and its softmax probability)."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one input [1, 3, S, S], got {list(x.shape)}")
    was_training = net.training
    net.eval()
    maps: list[torch.Tensor] = []

    def keep(module, inputs, output):
        activation = F.relu(output)  # conv5 after its ReLU: the maps the heat map is made of
        activation.retain_grad()
        maps.append(activation)
        return activation.clone()  # (the net's own in-place ReLU then acts on the copy)

    handles = [tower.conv5.register_forward_hook(keep) for tower in net.towers]
    try:
        with torch.enable_grad():
            logits = net(x.to(net.devices[0]).requires_grad_(False))
            if class_index is None:
                class_index = int(logits[0].argmax())
            if not 0 <= class_index < logits.shape[1]:
                raise ValueError(f"class index {class_index} is outside 0..{logits.shape[1] - 1}")
            logits[0, class_index].backward()
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    activation = torch.cat([m.detach().to(net.devices[0]) for m in maps], dim=1)[0]  # [C, 13, 13]
    gradient = torch.cat([m.grad.to(net.devices[0]) for m in maps], dim=1)[0]
    weights = gradient.mean(dim=(1, 2))  # α_k: how much map k raises the class's logit, on average
    cam = F.relu((weights[:, None, None] * activation).sum(0))
    cam = cam / cam.max() if cam.max() > 0 else cam
    heat = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    probability = float(logits.detach().float().softmax(1)[0, class_index])
    return heat.clamp(0, 1).cpu(), class_index, probability


def overlay(image: Image.Image, heat: torch.Tensor, opacity: float = 0.5) -> Image.Image:
    """The heat map [H, W] in [0, 1] drawn over ``image`` (resized to H×W) in a blue → red colour scale."""
    h, w = heat.shape
    image = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    t = heat.float().clamp(0, 1)
    # A short "jet": blue (cold) → cyan → yellow → red (hot), piecewise linear.
    red = (1.5 - (4 * t - 3).abs()).clamp(0, 1)
    green = (1.5 - (4 * t - 2).abs()).clamp(0, 1)
    blue = (1.5 - (4 * t - 1).abs()).clamp(0, 1)
    colours = (torch.stack([red, green, blue], dim=-1) * 255).round().to(torch.uint8)
    heat_image = Image.frombytes("RGB", (w, h), colours.contiguous().numpy().tobytes())
    return Image.blend(image, heat_image, opacity)
