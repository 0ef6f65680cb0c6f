"""The 2012 AlexNet (Krizhevsky, Sutskever, Hinton): network, checkpoint format, shared preprocessing."""

__version__ = "0.1.0"

from .atomic import atomic_path, atomic_write
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .classes import ImageClass, imagenet_classes, parse_synset_words
from .lrn import CAFFE_LRN, PAPER_LRN, LocalResponseNorm, LRNConfig
from .network import AlexNet, AlexNetConfig, GroupedAlexNet
from .cpu_inference import CPUInferenceNet
from .preprocessing import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    Preprocessing,
    Preprocessor,
    UnsupportedImage,
    decode_image,
    load_image,
)

__all__ = [
    "AlexNet",
    "AlexNetConfig",
    "CAFFE_LRN",
    "Checkpoint",
    "CheckpointError",
    "CPUInferenceNet",
    "CorruptImage",
    "GroupedAlexNet",
    "ImageClass",
    "ImageError",
    "ImageTooLarge",
    "LRNConfig",
    "LocalResponseNorm",
    "PAPER_LRN",
    "Preprocessing",
    "Preprocessor",
    "UnsupportedImage",
    "atomic_path",
    "atomic_write",
    "decode_image",
    "imagenet_classes",
    "load_checkpoint",
    "load_image",
    "parse_synset_words",
]
