"""Export a checkpoint's network to ONNX, for ONNX Runtime, Triton or any other ONNX runtime.

    python -m model.export CHECKPOINT OUT.onnx [--softmax] [--opset N] [--verify]
    python -m model.export CHECKPOINT --triton-repository DIR [--triton-name alexnet] [--max-batch-size 32]

The graph is the grouped single-device net (Caffe's layout: conv2, conv4, conv5 with group=2), built node
by node with ``onnx.helper`` from the checkpoint's tensors, in standard ONNX operators only:

    image [batch, 3, S, S]
      Conv conv1 (stride 4; pads from conv1_padding) → Relu → LRN → MaxPool 3/2
      Conv conv2 (group 2, pad 2)                    → Relu → LRN → MaxPool 3/2
      Conv conv3 (pad 1) → Relu → Conv conv4 (group 2, pad 1) → Relu → Conv conv5 (group 2, pad 1) → Relu
      MaxPool 3/2 → Flatten → Gemm fc6 → Relu → Gemm fc7 → Relu → Gemm fc8 → logits [batch, classes]
      (--softmax: → Softmax → probabilities [batch, classes]; dropout is an identity at inference: omitted)

- The batch dimension is dynamic (``dim_param`` "batch"); S is the checkpoint's crop (224 for our own
  nets, 227 for Caffe-imported ones). Initializers keep the checkpoint's names (``conv1.weight`` …).
- conv1 padding is Conv's ``pads`` attribute ([top, left, bottom, right]): "overhang" [0, 0, 3, 3] (the
  last windows reach 3 zero pixels past the right and bottom edges), "symmetric" [2, 2, 2, 2], "none"
  (Caffe's 227 crops) no padding.
- LRN: ONNX divides by (bias + alpha/size · Σx²)^beta, the α/n convention, so the exported alpha is
  ``config.lrn.coefficient · size`` whichever convention the checkpoint records (the paper's k=2,
  α=1e-4 becomes alpha=5e-4). ONNX's LRN windows span all channels: Caffe-imported checkpoints
  (``lrn_across_towers``) use it as it is; our own (each tower normalises its own maps, as in the paper)
  reshape [N, C, H, W] → [2N, C/2, H, W] (the two towers' halves as batch items: a free view), normalise,
  and reshape back. ONNX Runtime takes only odd sizes and positive alpha and beta (an even window is also
  centred the other way round in ONNX's definition): other LRN settings are refused, exit status 1.
- The input is the *preprocessed* image, exactly what ``Checkpoint.preprocessor().from_bytes`` returns:
  see ``input_description`` and the model's metadata. A mean image (our own checkpoints subtract one,
  [3, 256, 256]) is not part of the graph: it is written beside the model as ``<OUT stem>.mean_image.npy``
  (float32, in the preprocessing's channel order and scale; its name and sha256 are in the metadata).
  An initializer that no node reads would do, but ONNX Runtime strips it with a warning at every load.
- ``metadata_props`` (strings; the JSON ones parse back to the checkpoint's own values):
    format "alexnet-onnx", format_version "1",
    classes (JSON [{wnid, name}] in output order), preprocessing (JSON, ``Preprocessing.to_dict``),
    architecture (JSON, ``AlexNetConfig.to_dict``), provenance (JSON, the checkpoint's), pca, training,
    export (JSON: source checkpoint and its sha256, opset, input and output names and shapes, mean image
    file, code version, time), input (a sentence: what the input tensor must be).
- Files are written atomically (``model.files``): a failed export leaves nothing at OUT, or the old file.
  ``--verify`` runs the written file in ONNX Runtime before it is put in place, on a fixed pseudo-random
  batch, against the checkpoint's own net; a difference over 1e-4 is an error and nothing is written.

Exit status: 0 written; 1 the checkpoint cannot be read or exported (CheckpointError, an LRN setting
ONNX cannot express, --verify found a difference), the file cannot be written, or onnx is not
installed; 2 bad arguments. Errors are one line on stderr.

Needs the ``onnx`` package (``pip install -e '.[export]'``); ``--verify`` also needs ``onnxruntime``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError, code_version, load_checkpoint
from .files import atomic_path, atomic_write
from .lrn import LRNConfig
from .network import CONV1_PADDING, LAYERS, POOL_SIZE, POOL_STRIDE
from .preprocessing import Preprocessing

DEFAULT_OPSET = 17  # ONNX Runtime ≥ 1.12 runs it (older runtimes: --opset 13)
MIN_OPSET = 9  # IR version 4: initializers need not be listed as graph inputs
INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
BATCH_DIM = "batch"
FORMAT_NAME = "alexnet-onnx"
FORMAT_VERSION = 1
EXPORTED_BY = "model.export"
MEAN_IMAGE_SUFFIX = ".mean_image.npy"
PROTOBUF_LIMIT = 1 << 31  # a serialised ModelProto; larger weights would need ONNX's external data
VERIFY_TOLERANCE = 1e-4  # on probabilities; on logits relative to the largest
INSTALL_ONNX = "the ONNX export needs the onnx package: pip install -e '.[export]' (or: pip install onnx)"
INSTALL_ONNXRUNTIME = "--verify needs ONNX Runtime: pip install onnxruntime (it is in the dev extra)"

# Triton
TRITON_PLATFORM = "onnxruntime_onnx"
TRITON_MODEL_FILE = "model.onnx"
TRITON_LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH_SIZE = 32
_TRITON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class ExportError(ValueError):
    """A readable checkpoint that this exporter cannot express in ONNX (or whose export did not verify)."""


class MissingDependency(RuntimeError):
    """onnx (or, for --verify, onnxruntime) is not installed; the message says how to install it."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise MissingDependency(INSTALL_ONNX) from None
    return onnx


# --------------------------------------------------------------------------------------------- the graph


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


def build_model(
    checkpoint: Checkpoint,
    *,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    mean_image_file: dict | None = None,
):
    """The checkpoint's net as an ``onnx.ModelProto`` (checked with ``onnx.checker``), metadata included.

    ``mean_image_file``: {"name", "sha256", "shape", "dtype"} of the mean image written beside the model,
    recorded in the metadata (``export`` writes it; None when the preprocessing has no mean image)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    check_opset(opset)
    check_exportable(checkpoint)
    config = checkpoint.config
    graph = _Graph(checkpoint)
    graph.layers(softmax)
    size = config.input_size
    proto = helper.make_graph(
        graph.nodes,
        "alexnet",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, 3, size, size])],
        [helper.make_tensor_value_info(output_name(softmax), TensorProto.FLOAT, [BATCH_DIM, config.num_classes])],
        initializer=graph.initializers,
        doc_string=input_description(checkpoint.preprocessing, mean_image_file),
    )
    opset_imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        proto,
        opset_imports=opset_imports,
        producer_name="alexnet-reference (python -m model.export)",
        producer_version=code_version(),
        doc_string="AlexNet (Krizhevsky, Sutskever, Hinton 2012), the grouped two-tower net. "
        + input_description(checkpoint.preprocessing, mean_image_file),
    )
    # The oldest IR version that carries this opset (onnx's default is its newest, which older runtimes refuse).
    model.ir_version = max(4, helper.find_min_ir_version_for(opset_imports))
    helper.set_model_props(
        model, metadata_props(checkpoint, softmax=softmax, opset=opset, mean_image_file=mean_image_file)
    )
    onnx.checker.check_model(model, full_check=True)
    return model


class _Graph:
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
        weight = self.checkpoint.state_dict[f"{name}.weight"]
        self.nodes.append(
            self.helper.make_node(
                "Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                kernel_shape=list(weight.shape[2:]), strides=[stride, stride], pads=pads, group=group,
            )
        )  # fmt: skip
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
    newest = _onnx().defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"--opset must be between {MIN_OPSET} and {newest} (this onnx's newest), got {opset}")


# ------------------------------------------------------------------------------------------ the metadata


def input_description(p: Preprocessing, mean_image_file: dict | None = None) -> str:
    """What the input tensor must be, in one paragraph (the model's doc_string and metadata "input")."""
    if p.mean == "image":
        where = f"the file {mean_image_file['name']}" if mean_image_file else "a separate file"
        mean = f"minus the mean image ({where}: float32 [3, {p.resize}, {p.resize}], same order and scale)"
    else:
        mean = "minus the per-channel mean (" + ", ".join(f"{v:g}" for v in p.mean) + f") in {p.channel_order} order"
    std = "" if tuple(p.std) == (1.0, 1.0, 1.0) else ", divided by (" + ", ".join(f"{v:g}" for v in p.std) + ")"
    return (
        f"Input {INPUT_NAME!r}: float32 [batch, 3, {p.crop}, {p.crop}] (NCHW), the image preprocessed as the "
        f"checkpoint's training did: the shorter side scaled to {p.resize} ({p.resample}, Pillow, antialiased), "
        f"the central {p.resize}x{p.resize} square, channels in {p.channel_order} order, "
        f"pixel values 0-{p.pixel_scale:g}, "
        f"{mean}{std}, then the central {p.crop}x{p.crop} crop (transparent pixels composited onto RGB "
        f"{tuple(p.background)}). Metadata 'preprocessing' holds these values; "
        "model.Preprocessor.from_bytes computes exactly this tensor."
    )


def metadata_props(checkpoint: Checkpoint, *, softmax: bool, opset: int, mean_image_file: dict | None) -> dict:
    meta = checkpoint.metadata()  # architecture, classes, preprocessing, pca, provenance, training
    config = checkpoint.config
    size = config.input_size
    export = {
        "exported_by": EXPORTED_BY,
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": None if checkpoint.path is None else os.path.basename(checkpoint.path),
        "checkpoint_sha256": checkpoint.sha256,
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, 3, size, size], "dtype": "float32"},
        "output": {
            "name": output_name(softmax),
            "shape": [BATCH_DIM, config.num_classes],
            "dtype": "float32",
            "softmax": softmax,
        },
        "lrn": {**onnx_lrn_attributes(config.lrn), "per_tower": not config.lrn_across_towers},
        "conv1_pads": conv1_pads(config.conv1_padding),
        "mean_image_file": mean_image_file,
    }
    props = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    for key in ("classes", "preprocessing", "architecture", "provenance", "pca", "training"):
        props[key] = json.dumps(meta[key], separators=(",", ":"), ensure_ascii=False)
    props["export"] = json.dumps(export, separators=(",", ":"), ensure_ascii=False)
    props["input"] = input_description(checkpoint.preprocessing, mean_image_file)
    return props


def read_metadata(model) -> dict:
    """An exported model's ``metadata_props``, the JSON values parsed (the inverse of ``metadata_props``)."""
    props = {p.key: p.value for p in model.metadata_props}
    return {k: (v if k in ("format", "format_version", "input") else json.loads(v)) for k, v in props.items()}


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class Exported:
    path: Path
    mean_image_path: Path | None
    opset: int
    input_shape: list
    output_name: str
    max_difference: float | None = None  # with verify: the largest |Δ probability| against our net


def mean_image_path(out: str | os.PathLike) -> Path:
    """Where the mean image goes beside ``out``: alexnet.onnx → alexnet.mean_image.npy."""
    out = Path(out)
    return out.with_name((out.stem if out.suffix else out.name) + MEAN_IMAGE_SUFFIX)


def export(
    checkpoint: Checkpoint,
    out: str | os.PathLike,
    *,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
) -> Exported:
    """Write ``checkpoint`` as ONNX to ``out`` (atomically), and its mean image, if any, beside it."""
    out = Path(out)
    _onnx()
    if verify:
        _onnxruntime()
    check_opset(opset)
    check_exportable(checkpoint)  # before writing anything
    mean_path, mean_file, mean_bytes = None, None, None
    if checkpoint.mean_image is not None and checkpoint.preprocessing.mean == "image":
        mean_path = mean_image_path(out)
        array = checkpoint.mean_image.detach().to("cpu", torch.float32).contiguous().numpy()
        buffer = io.BytesIO()
        np.save(buffer, array)
        mean_bytes = buffer.getvalue()
        mean_file = {
            "name": mean_path.name,
            "sha256": hashlib.sha256(mean_bytes).hexdigest(),
            "shape": list(array.shape),
            "dtype": "float32",
            "format": "npy",
        }
    model = build_model(checkpoint, softmax=softmax, opset=opset, mean_image_file=mean_file)
    data = model.SerializeToString()
    del model
    difference = None
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
        del data
        if verify:
            difference = verify_with_onnxruntime(tmp, checkpoint)
        if mean_bytes is not None:  # last, so that a failed export writes neither file
            atomic_write(mean_path, mean_bytes)
    size = checkpoint.config.input_size
    return Exported(out, mean_path, opset, [BATCH_DIM, 3, size, size], output_name(softmax), difference)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency(INSTALL_ONNXRUNTIME) from None
    return onnxruntime


def onnxruntime_session(model: str | os.PathLike | bytes):
    """An ONNX Runtime CPU session on an exported model (a path or the serialised bytes)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def verify_with_onnxruntime(model: str | os.PathLike | bytes, checkpoint: Checkpoint, batch: int = 2) -> float:
    """Run the exported model and the checkpoint's net on the same pseudo-random batch (pixel-like values,
    zero-mean, as after the mean is subtracted); raise ExportError if they differ. Returns max |Δp|."""
    session = onnxruntime_session(model)
    size = checkpoint.config.input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).mul_(60.0)
    expected = checkpoint.build_grouped().eval()(x)
    (got,) = session.run(None, {INPUT_NAME: x.numpy()})
    got = torch.from_numpy(got)
    softmax = session.get_outputs()[0].name == PROBABILITIES_NAME
    expected_p = expected.softmax(1)
    got_p = got if softmax else got.softmax(1)
    difference = (got_p - expected_p).abs().max().item()
    problems = []
    if not difference <= VERIFY_TOLERANCE:
        problems.append(f"probabilities differ by up to {difference:.2e}")
    if not softmax:
        relative = ((got - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
        if not relative <= VERIFY_TOLERANCE:
            problems.append(f"logits differ by up to {relative:.2e} of the largest")
    if problems:
        raise ExportError(f"ONNX Runtime's output does not match the net's: {'; '.join(problems)}")
    return difference


# ------------------------------------------------------------------------------------------------ Triton


def triton_config(
    *,
    name: str,
    input_size: int,
    num_classes: int,
    output: str = LOGITS_NAME,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    labels: str | None = TRITON_LABELS_FILE,
    comment: str = "",
) -> str:
    """Triton's config.pbtxt for an exported model (ONNX Runtime backend). With max_batch_size > 0 the dims
    leave out the batch dimension: Triton adds it, and the model's own is dynamic ("batch")."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    label = f'\n    label_filename: "{labels}"' if labels else ""
    return (
        f"{header}"
        f'name: "{name}"\n'
        f'platform: "{TRITON_PLATFORM}"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ 3, {input_size}, {input_size} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{output}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]{label}\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )


def write_triton_repository(
    checkpoint: Checkpoint,
    repository: str | os.PathLike,
    *,
    name: str = "alexnet",
    version: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    softmax: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = False,
) -> Exported:
    """REPOSITORY/NAME/{config.pbtxt, labels.txt, VERSION/model.onnx (+ model.mean_image.npy)}."""
    check_triton_name(name)
    if version < 1:
        raise ValueError(f"--model-version must be at least 1, got {version}")
    triton_config(name=name, input_size=224, num_classes=2, max_batch_size=max_batch_size)  # check it first
    model_dir = Path(repository) / name
    exported = export(checkpoint, model_dir / str(version) / TRITON_MODEL_FILE, softmax=softmax, opset=opset,
                      verify=verify)  # fmt: skip
    mean_file = None if exported.mean_image_path is None else f"{version}/{exported.mean_image_path.name}"
    config = triton_config(
        name=name,
        input_size=checkpoint.config.input_size,
        num_classes=checkpoint.config.num_classes,
        output=output_name(softmax),
        max_batch_size=max_batch_size,
        comment=_triton_comment(checkpoint, mean_file),
    )
    labels = "".join(f"{c.wnid} {c.name}\n" for c in checkpoint.classes)  # line i: class i (output index)
    with atomic_path(model_dir / TRITON_LABELS_FILE) as tmp:
        tmp.write_text(labels, encoding="utf-8")
    with atomic_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(config, encoding="utf-8")
    return exported


def check_triton_name(name: str) -> None:
    if not _TRITON_NAME.fullmatch(name):
        raise ValueError(f"--triton-name must be a plain directory name (letters, digits, _ . -), got {name!r}")


def _triton_comment(checkpoint: Checkpoint, mean_image_file: str | None) -> str:
    source = os.path.basename(checkpoint.path) if checkpoint.path else "a checkpoint"
    sha = f" (sha256 {checkpoint.sha256[:12]}…)" if checkpoint.sha256 else ""
    mean = None if mean_image_file is None else {"name": mean_image_file}
    return f"Written by python -m {EXPORTED_BY} from {source}{sha}.\n" + _wrap(
        input_description(checkpoint.preprocessing, mean)
    )


def _wrap(text: str, width: int = 100) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


# --------------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"error: {message} (see python -m model.export --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        allow_abbrev=False,
        prog="python -m model.export",
        description="Export a checkpoint's network to ONNX (the grouped net, standard operators, dynamic batch). "
        "The input is the preprocessed image tensor; the model's metadata says which preprocessing.",
        epilog="Exit status: 0 written; 1 the checkpoint cannot be read or exported, --verify found a "
        "difference, the file cannot be written, or onnx is missing; 2 bad arguments.",
    )
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint (.safetensors) to export")
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        metavar="OUT",
        help="ONNX file to write (atomically); a mean image goes beside it as STEM.mean_image.npy",
    )
    parser.add_argument(
        "--softmax", action="store_true", help=f"output {PROBABILITIES_NAME!r} (softmax) instead of {LOGITS_NAME!r}"
    )
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET}; at least {MIN_OPSET})"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the file in ONNX Runtime against the checkpoint's net before writing it",
    )
    triton = parser.add_argument_group("Triton model repository (instead of OUT)")
    triton.add_argument(
        "--triton-repository",
        type=Path,
        metavar="DIR",
        help="write DIR/NAME/config.pbtxt, labels.txt and DIR/NAME/VERSION/model.onnx",
    )
    triton.add_argument("--triton-name", default="alexnet", metavar="NAME", help="model name (default alexnet)")
    triton.add_argument("--model-version", type=int, default=1, metavar="N", help="version directory (default 1)")
    triton.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        metavar="N",
        help=f"config.pbtxt max_batch_size (default {DEFAULT_MAX_BATCH_SIZE})",
    )
    return parser  # fmt: skip


def _check_arguments(parser, args) -> None:
    if (args.out is None) == (args.triton_repository is None):
        parser.error("give either OUT or --triton-repository DIR")
    if args.out is not None and args.out.is_dir():
        parser.error(f"OUT {args.out} is a directory")
    target = args.out or args.triton_repository / args.triton_name / str(args.model_version) / TRITON_MODEL_FILE
    if _same_file(target, args.checkpoint):
        parser.error(f"OUT {target} is the checkpoint itself")
    if args.triton_repository is not None:
        if args.triton_repository.exists() and not args.triton_repository.is_dir():
            parser.error(f"--triton-repository {args.triton_repository} is not a directory")
        try:
            check_triton_name(args.triton_name)
        except ValueError as e:
            parser.error(str(e))
        if args.max_batch_size < 1:
            parser.error(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
        if args.model_version < 1:
            parser.error(f"--model-version must be at least 1, got {args.model_version}")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                parser.error(f"cannot write {target}: {parent} is not a directory")
            break


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    try:
        check_opset(args.opset)  # needs onnx: after --help, before reading the checkpoint
        if args.verify:
            _onnxruntime()
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        options = {"softmax": args.softmax, "opset": args.opset, "verify": args.verify}
        if args.triton_repository is not None:
            exported = write_triton_repository(
                checkpoint, args.triton_repository, name=args.triton_name, version=args.model_version,
                max_batch_size=args.max_batch_size, **options,
            )  # fmt: skip
        else:
            exported = export(checkpoint, args.out, **options)
    except (CheckpointError, MissingDependency) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"error: {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, no permission, …: nothing was put in place (atomic writes)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: cannot write {args.out or args.triton_repository}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    config = checkpoint.config
    parameters = sum(t.numel() for t in checkpoint.state_dict.values())
    shape = ",".join(str(d) for d in exported.input_shape)
    print(
        f"wrote {exported.path}: AlexNet, {config.num_classes} classes, {parameters:,} parameters, opset "
        f"{exported.opset}; input {INPUT_NAME!r} float32 [{shape}] (preprocessed: see its metadata), output "
        f"{exported.output_name!r} [batch,{config.num_classes}]"
    )
    if exported.mean_image_path is not None:
        print(f"wrote {exported.mean_image_path}: the mean image the input must have subtracted")
    if args.triton_repository is not None:
        model_dir = args.triton_repository / args.triton_name
        print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / TRITON_LABELS_FILE}: tritonserver "
              f"--model-repository {args.triton_repository}")  # fmt: skip
    if exported.max_difference is not None:
        print(f"verified with ONNX Runtime: probabilities within {exported.max_difference:.1e} of the net's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
