"""Parsed tensors → a checkpoint: the config read off the shapes, checked, with Caffe's preprocessing."""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint, check_grouped_shapes
from ..classes import ImageClass, imagenet_classes
from ..lrn import CAFFE_LRN
from ..network import LAYER_NAMES, AlexNetConfig
from .common import Imported, WeightsError
from .published import CAFFE_PREPROCESSING


def to_checkpoint(
    imported: Imported,
    *,
    provenance: dict,
    classes: tuple[ImageClass, ...] | None = None,
) -> Checkpoint:
    """Fit the tensors to an AlexNetConfig (classes and width from fc8 and conv1) and wrap them up."""
    tensors = imported.tensors
    if "conv1.weight" not in tensors or "fc8.weight" not in tensors:
        missing = [k for k in ("conv1.weight", "fc8.weight") if k not in tensors]
        raise WeightsError(f"missing {', '.join(missing)}: not an AlexNet (expected layers {', '.join(LAYER_NAMES)})")
    num_classes = tensors["fc8.weight"].shape[0]
    width = tensors["conv1.weight"].shape[0] / 96
    try:
        # Caffe normalises over all of a layer's maps, across the boundary between the two groups.
        config = AlexNetConfig(num_classes, width, "none", imported.lrn or CAFFE_LRN, lrn_across_towers=True)
        check_grouped_shapes(tensors, config, "the weights")
    except ValueError as e:
        raise WeightsError(str(e)) from None
    if classes is None:
        if num_classes != 1000:
            raise WeightsError(f"fc8 has {num_classes} outputs, not ImageNet's 1000: pass --classes")
        classes = imagenet_classes()
    if len(classes) != num_classes:
        raise WeightsError(f"{len(classes)} classes given for a net with {num_classes} outputs")
    for name, tensor in tensors.items():
        if not all(torch.isfinite(v) for v in torch.aminmax(tensor)):  # NaN propagates into min and max
            raise WeightsError(f"{name} holds NaN or infinite values")
    provenance = {
        **provenance,
        "source_format": imported.format,
        "lrn_from": "the file" if imported.lrn else "not recorded in the file; Caffe's constants assumed",
    }
    if imported.notes:
        provenance["import_notes"] = imported.notes
    return Checkpoint(
        config=config,
        state_dict={k: tensors[k].contiguous() for k in config.grouped_shapes()},
        classes=classes,
        preprocessing=CAFFE_PREPROCESSING,
        provenance=provenance,
    )
