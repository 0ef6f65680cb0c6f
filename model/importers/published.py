"""The published files of the BVLC AlexNet weights, with their checksums and what the weights expect."""

from __future__ import annotations

from dataclasses import dataclass

from ..preprocessing import Preprocessing

# Per-channel mean of Caffe's ilsvrc_2012_mean.npy (the 256×256 ILSVRC-2012 training mean image), in
# B, G, R order: what Caffe's classification example prints and subtracts.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
CAFFE_PREPROCESSING = Preprocessing(
    resize=256, crop=227, channel_order="BGR", pixel_scale=255.0, mean=CAFFE_BGR_MEAN, std=(1.0, 1.0, 1.0)
)


@dataclass(frozen=True)
class PublishedFile:
    name: str
    format: str  # "caffe" or "onnx"
    url: str
    size: int
    checksum: tuple[str, str]  # (algorithm, hex digest) as published
    description: str


# The checksums are the publishers' own: the sha1 in Caffe's models/bvlc_alexnet/readme.md, and the
# sha256 that the ONNX model zoo's git-lfs pointer records for the file.
PUBLISHED = (
    PublishedFile(
        "bvlc_alexnet.caffemodel",
        "caffe",
        "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
        243_862_414,
        ("sha1", "9116a64c0fbe4459d18f4bb6b56d647b63920377"),
        "BVLC AlexNet (Caffe model zoo, bvlc_alexnet.caffemodel, iteration 360,000)",
    ),
    PublishedFile(
        "bvlcalexnet-12.onnx",
        "onnx",
        "https://github.com/onnx/models/raw/main/validated/vision/classification/alexnet/model/bvlcalexnet-12.onnx",
        243_863_787,
        ("sha256", "6b0da9510f27f234ee96a85dc3809dd210150fdefad87f6850f9788513216945"),
        "BVLC AlexNet (ONNX model zoo, bvlcalexnet-12.onnx, converted from Caffe via Caffe2)",
    ),
    PublishedFile(
        "bvlcalexnet-9.onnx",
        "onnx",
        "https://github.com/onnx/models/raw/main/validated/vision/classification/alexnet/model/bvlcalexnet-9.onnx",
        243_863_542,
        ("sha256", "ef3c82dad5c512f969dbf701fe35c0b3feb1585687d541f765eb68730c0a8af7"),
        "BVLC AlexNet (ONNX model zoo, bvlcalexnet-9.onnx, converted from Caffe via Caffe2)",
    ),
)
PUBLISHED_BY_NAME = {p.name: p for p in PUBLISHED}

# Caffe's published figures for bvlc_alexnet (ILSVRC-2012 val, single centre crop): 57.1% / 80.2% accuracy.
PUBLISHED_VAL_ERRORS = {"val_top1_error": 0.429, "val_top5_error": 0.198}
PUBLISHED_VAL_NOTE = (
    "Caffe's published figures for bvlc_alexnet: ILSVRC-2012 val, single centre 227 crop, images warped "
    "to 256x256 minus the per-pixel mean image; not measured by this project"
)
