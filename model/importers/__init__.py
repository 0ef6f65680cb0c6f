"""Import the published BVLC AlexNet weights (Caffe's .caffemodel, the ONNX zoo's .onnx) as a checkpoint.

    python -m model.import_weights SOURCE --out checkpoints/bvlc_alexnet.safetensors

Both files hold the paper's grouped net in our checkpoint layout: no tensor is transposed or reordered.
The checkpoint records what the weights expect (227 crops, BGR, Caffe's mean and LRN), so model/ and
service/ need no special case. docs/importing-weights.md describes the formats and the checks.
Modules: wire (protobuf), caffe and onnx (the readers), formats (which file is which), convert (tensors →
checkpoint), published and download (the files and fetching them), overwrite (--out), importing, cli.
"""

from .cli import main
from .common import Imported, OverwriteRefused, WeightsError
from .convert import to_checkpoint
from .download import ChecksumMismatch, DownloadError
from .formats import parse
from .importing import import_weights
from .overwrite import check_out
from .published import PUBLISHED, PublishedFile

__all__ = [
    "PUBLISHED",
    "ChecksumMismatch",
    "DownloadError",
    "Imported",
    "OverwriteRefused",
    "PublishedFile",
    "WeightsError",
    "check_out",
    "import_weights",
    "main",
    "parse",
    "to_checkpoint",
]
