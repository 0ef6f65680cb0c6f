"""The 2012 AlexNet (Krizhevsky, Sutskever, Hinton): network, checkpoint format, shared preprocessing.

What training and the service use is exported here. Besides, as modules of their own:
    model.architecture  the layer table (Fig. 2), AlexNetConfig and the geometry derived from them
    model.ten_crop    the paper's 10-patch prediction: chunked forward passes, the softmax averaged
    model.visualize   conv1's kernels (the paper's Fig. 3) and Grad-CAM
    model.files       atomic writes, safetensors files with string metadata, file identity
    model.importers   the published BVLC weights (Caffe, ONNX) → a checkpoint (python -m model.import_weights)
    model.export      a checkpoint → ONNX / Triton (python -m model.export)
"""

__version__ = "0.1.0"

from .checkpoint import FORMAT_VERSION, Checkpoint, CheckpointError, load_checkpoint
from .classes import ImageClass, imagenet_classes, parse_synset_words
from .cpu_inference import CPUInferenceNet
from .devices import DeviceError, parse_devices, resolve_devices
from .files import file_identity
from .lrn import CAFFE_LRN, PAPER_LRN, LRNConfig
from .malloc import keep_freed_memory
from .network import FEATURE_LAYERS, AlexNet, AlexNetConfig, GroupedAlexNet, check_feature_layer
from .preprocessing import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    Preprocessing,
    Preprocessor,
    UnsupportedImage,
    decode_image,
    load_image,
    open_image,
)

__all__ = [
    "CAFFE_LRN",
    "FEATURE_LAYERS",
    "FORMAT_VERSION",
    "PAPER_LRN",
    "AlexNet",
    "AlexNetConfig",
    "CPUInferenceNet",
    "Checkpoint",
    "CheckpointError",
    "CorruptImage",
    "DeviceError",
    "GroupedAlexNet",
    "ImageClass",
    "ImageError",
    "ImageTooLarge",
    "LRNConfig",
    "Preprocessing",
    "Preprocessor",
    "UnsupportedImage",
    "check_feature_layer",
    "decode_image",
    "file_identity",
    "imagenet_classes",
    "keep_freed_memory",
    "load_checkpoint",
    "load_image",
    "open_image",
    "parse_devices",
    "parse_synset_words",
    "resolve_devices",
]
