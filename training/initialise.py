"""The network's initial weights under ``--init``: the paper's (§5), scaled to the width, or Caffe's biases."""

from __future__ import annotations

import math

import torch

from model import AlexNet
from model.network import BIAS_ONE_LAYERS

CAFFE_BIAS = 0.1  # Caffe's bvlc_alexnet: "initializing non-zero biases to 0.1 instead of 1 ... 1 gave flat loss"


def initial_bias(init: str) -> float:
    """The starting bias of conv2, conv4, conv5, fc6 and fc7 under ``init``."""
    return CAFFE_BIAS if init == "caffe" else 1.0


def initialise_(model: AlexNet, init: str) -> None:
    """Turn the paper's initialisation (AlexNet's own) into ``init``'s."""
    if init in ("width-scaled", "caffe"):
        scale_init_to_width_(model)
    if init == "caffe":
        start_biases_at_caffe_value_(model)


@torch.no_grad()
def start_biases_at_caffe_value_(model: AlexNet) -> None:
    """The biases the paper starts at 1 (conv2, conv4, conv5, fc6, fc7) start at 0.1, as Caffe's
    bvlc_alexnet did: with 1, the loss sits at chance for a while before anything is learned."""
    for tower in model.towers:
        for name, layer in tower.layers().items():
            if name in BIAS_ONE_LAYERS:
                layer.bias.fill_(CAFFE_BIAS)


@torch.no_grad()
def scale_init_to_width_(model: AlexNet) -> None:
    """Multiply the initial weights of conv2 … fc8 by 1/√width (conv1 reads the image: its fan-in is fixed).

    The paper's N(0, 0.01²) was chosen for the full-width net. A layer's fan-in shrinks with ``--width``,
    and with it the image-dependent part of every activation, while the biases of 1 stay: at width 1/8
    the logits vary across images by ~1e-5 (~1e-2 at full width) and SGD finds nothing to follow. This
    scaling gives each unit the paper net's activation scale. At width 1 it changes nothing.
    """
    factor = 1.0 / math.sqrt(model.config.width)
    for tower in model.towers:
        for name, layer in tower.layers().items():
            if name != "conv1":
                layer.weight.mul_(factor)
