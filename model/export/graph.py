"""The exported graph: the grouped net, node by node, in standard ONNX operators.

docs/onnx-format.md describes the graph, its LRN and its padding.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..lrn import LRNConfig
from ..network import CONV1_PADDING, LAYERS, POOL_SIZE, POOL_STRIDE
from .errors import ExportError, require_onnx

DEFAULT_OPSET = 17  # ONNX Runtime ≥ 1.12 runs it (older runtimes: --opset 13)
MIN_OPSET = 9  # IR version 4: initializers need not be listed as graph inputs
INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
BATCH_DIM = "batch"
PROTOBUF_LIMIT = 1 << 31  # a serialised ModelProto; larger weights would need ONNX's external data


def onnx_lrn_attributes(lrn: LRNConfig) -> dict:
    """ONNX LRN's attributes for ``lrn``: alpha in the α/n convention (alpha = coefficient · size)."""
    problems = []
    if lrn.size < 1 or lrn.size % 2 == 0:
        problems.append(
            f"size {lrn.size} (ONNX Runtime's LRN takes odd sizes only; ONNX centres even windows one "
            "channel off from this net's)"
        )
    if not lrn.coefficient > 0:
        problems.append(f"alpha {lrn.alpha} (ONNX Runtime's LRN needs alpha > 0)")
    if not lrn.beta > 0:
        problems.append(f"beta {lrn.beta} (ONNX Runtime's LRN needs beta > 0)")
    if problems:
        raise ExportError(f"its LRN cannot be expressed as ONNX's LRN: {'; '.join(problems)}")
    return {"size": lrn.size, "alpha": lrn.coefficient * lrn.size, "beta": lrn.beta, "bias": lrn.k}


def conv1_pads(conv1_padding: str) -> list[int]:
    """Conv's ``pads`` ([x1_begin, x2_begin, x1_end, x2_end] = [top, left, bottom, right]) for conv1."""
    left, right, top, bottom = CONV1_PADDING[conv1_padding]  # F.pad's order
    return [top, left, bottom, right]


def check_exportable(checkpoint: Checkpoint) -> None:
    """Raise ExportError if the graph cannot express this checkpoint (see the module docstring)."""
    config = checkpoint.config
    onnx_lrn_attributes(config.lrn)
    size = 4 * sum(t.numel() for t in checkpoint.state_dict.values())
    if size >= PROTOBUF_LIMIT - (1 << 24):
        raise ExportError(f"its {size:,} bytes of weights exceed what one ONNX file holds (2 GiB, protobuf's limit)")
    odd = [c for c in config.channels[:2] if c % 2]  # grouped convs and per-tower LRN split these in two
    if odd:  # AlexNetConfig.channels rounds every width to an even number, so this does not happen today
        raise ExportError(f"conv1/conv2 widths {list(config.channels[:2])} do not split into two towers")


def output_name(softmax: bool) -> str:
    return PROBABILITIES_NAME if softmax else LOGITS_NAME


class OnnxGraph:
    """The nodes and initializers of the exported graph, one method per kind of op."""

    def __init__(self, checkpoint: Checkpoint):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.checkpoint, self.config = checkpoint, checkpoint.config
        self.lrn = onnx_lrn_attributes(self.config.lrn)
        self.initializers = [
            numpy_helper.from_array(tensor.detach().to("cpu", torch.float32).contiguous().numpy(), name)
            for name, tensor in checkpoint.state_dict.items()
        ]
        self.nodes = []

    def layers(self, softmax: bool) -> None:
        """The layer table, walked as the nets walk it; the ops after layer i are named relu<i>, norm<i>,
        pool<i>."""
        x, below = INPUT_NAME, None
        for number, layer in enumerate(LAYERS, 1):
            if layer.is_conv:
                pads = conv1_pads(self.config.conv1_padding) if layer.reads == "image" else [layer.padding] * 4
                x = self.conv(layer.name, x, pads=pads, stride=layer.stride, group=layer.groups)
            else:
                if below.is_conv:  # the first fully connected layer reads the maps in channel, row, column order
                    x = self.flatten(x)
                x = self.gemm(layer.name, x, LOGITS_NAME if layer is LAYERS[-1] else layer.name)
            for op in layer.after:  # dropout: the identity at inference, omitted
                if op == "relu":
                    x = self.relu(x, f"relu{number}")
                elif op == "lrn":
                    x = self.local_response_norm(x, f"norm{number}", self.config.outputs(layer))
                elif op == "pool":
                    x = self.max_pool(x, f"pool{number}")
            below = layer
        if softmax:
            self.nodes.append(self.helper.make_node("Softmax", [x], [PROBABILITIES_NAME], name="softmax", axis=1))

    def conv(self, name, x, *, pads, stride=1, group=1):
        kernel_shape = list(self.checkpoint.state_dict[f"{name}.weight"].shape[2:])
        attributes = {"kernel_shape": kernel_shape, "strides": [stride, stride], "pads": pads, "group": group}
        inputs = [x, f"{name}.weight", f"{name}.bias"]
        self.nodes.append(self.helper.make_node("Conv", inputs, [name], name=name, **attributes))
        return name

    def relu(self, x, out):
        self.nodes.append(self.helper.make_node("Relu", [x], [out], name=out))
        return out

    def max_pool(self, x, out):
        kernel, stride = [POOL_SIZE, POOL_SIZE], [POOL_STRIDE, POOL_STRIDE]
        self.nodes.append(self.helper.make_node("MaxPool", [x], [out], name=out, kernel_shape=kernel, strides=stride))
        return out

    def flatten(self, x):
        self.nodes.append(self.helper.make_node("Flatten", [x], ["flatten"], name="flatten", axis=1))
        return "flatten"

    def local_response_norm(self, x, out, channels):
        make_node = self.helper.make_node
        if self.config.lrn_across_towers:  # Caffe's: windows span both towers' maps
            self.nodes.append(make_node("LRN", [x], [out], name=out, **self.lrn))
            return out
        # The paper's: each tower's maps on their own. [N, C, H, W] → [2N, C/2, H, W] puts the two halves
        # side by side as batch items (0 in a Reshape shape copies that dimension: H and W).
        towers, back = f"{out}.towers_shape", f"{out}.shape"
        self.initializers.append(self.numpy_helper.from_array(np.array([-1, channels // 2, 0, 0], np.int64), towers))
        self.initializers.append(self.numpy_helper.from_array(np.array([-1, channels, 0, 0], np.int64), back))
        self.nodes.append(make_node("Reshape", [x, towers], [f"{out}.towers"], name=f"{out}.split_towers"))
        self.nodes.append(make_node("LRN", [f"{out}.towers"], [f"{out}.towers_normalised"], name=out, **self.lrn))
        self.nodes.append(make_node("Reshape", [f"{out}.towers_normalised", back], [out], name=f"{out}.join_towers"))
        return out

    def gemm(self, name, x, out):
        node = self.helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1)
        self.nodes.append(node)
        return out


def check_opset(opset: int) -> None:
    newest = require_onnx().defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"--opset must be between {MIN_OPSET} and {newest} (this onnx's newest), got {opset}")
