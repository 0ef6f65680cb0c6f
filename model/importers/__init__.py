"""Import the published BVLC AlexNet weights: real ImageNet predictions from the paper's net, no training.

    python -m model.import_weights SOURCE --out checkpoints/bvlc_alexnet.safetensors

SOURCE is a path or an http(s) URL of either file (both hold the same weights):
  - Caffe's ``bvlc_alexnet.caffemodel``: a protobuf NetParameter. Old files list their layers in the
    V1 ``layers`` field, newer ones in ``layer``; blob shapes are num/channels/height/width or ``shape``.
  - the ONNX model zoo's ``bvlcalexnet-12.onnx`` (Caffe → Caffe2 → ONNX): a ModelProto whose graph
    initializers are named ``conv1_w_0``, ``conv1_b_0``, … ``fc8_b_0``.

Both are the paper's grouped net in exactly our checkpoint layout: conv weights [out, in/groups, kh, kw]
with conv2, conv4, conv5 in two groups, fully connected weights [out, in] with fc6 reading pool5
flattened as channel, row, column. No tensor is transposed or reordered.

What the weights expect is recorded in the checkpoint, so that model/ and service/ need no special case:
  - 227×227 crops and no conv1 padding (Caffe's geometry; ``conv1_padding="none"``), from the central
    256×256 square of the image;
  - BGR channel order (conv1's input channel 0 is blue), pixels 0–255 minus the per-channel mean
    (B, G, R) = (104.007, 116.669, 122.679), the average of Caffe's ILSVRC-2012 mean image (Caffe trained
    with the full per-pixel mean image; its own examples subtract this average);
  - Caffe's LRN: k=1, α=1e-4 in the α/n convention, n=5, β=0.75, read from the file where it says;
    its windows span all maps of a layer, across the boundary between the groups (towers).

Files are parsed with wire.py (about a hundred lines) rather than the protobuf and onnx packages: we
need a dozen fields of two schemas, whose numbers caffe.py and onnx.py name. published.py lists the
published files and their checksums; download.py fetches them.
Downloads stream to a temporary file with a progress bar and are checked against the published
checksum; the checkpoint is written atomically, so an error never leaves a partial file at ``--out``.
An existing ``--out`` is replaced only when it is an earlier import: a checkpoint from training (the
default ``--out`` of both is checkpoints/best.safetensors) or any other file is refused, exit status 2,
unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote, urlsplit

import torch

from ..checkpoint import Checkpoint, CheckpointError, check_grouped_shapes, load_checkpoint
from ..classes import ImageClass, imagenet_classes, parse_synset_words
from ..lrn import CAFFE_LRN
from ..network import LAYER_NAMES, AlexNetConfig
from .caffe import NetParameter, read_caffemodel
from .common import Imported, OverwriteRefused, WeightsError
from .download import ChecksumMismatch, Digests, DownloadError, download, is_url, read_file
from .onnx import ModelProto, read_onnx
from .published import (
    CAFFE_PREPROCESSING,
    PUBLISHED,
    PUBLISHED_BY_NAME,
    PUBLISHED_VAL_ERRORS,
    PUBLISHED_VAL_NOTE,
    PublishedFile,
)
from .wire import LEN, VARINT, Message, WireError

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


# What each accepted format looks like, for the message when a file is neither.
FORMATS_EXPECTED = (
    "a Caffe .caffemodel is a protobuf NetParameter (its first byte is usually 0x0a, the net's name, or "
    "0x12, its layers; bvlc_alexnet.caffemodel is 243,862,414 bytes), an ONNX model a protobuf ModelProto "
    "(first byte 0x08, its ir_version; bvlcalexnet-12.onnx is 243,863,787 bytes)"
)
# First bytes of the top-level fields a model file starts with: Caffe name = 1, layers = 2, layer = 100
# (tag 802, varint a2 06); ONNX ir_version = 1 (varint).
_PROTOBUF_STARTS = (b"\x0a", b"\x12", b"\xa2\x06", b"\x08")


def describe_content(data: bytes | bytearray | memoryview) -> str | None:
    """What a file that is not a model file appears to be, from its first bytes (None: no idea)."""
    head = bytes(data[:512])
    magic = [
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"GIF8", "a GIF image"),
        (b"PK\x03\x04", "a zip archive (a PyTorch .pt/.pth file is one: it is not importable)"),
        (b"\x1f\x8b", "gzip-compressed (unpack it first)"),
        (b"\x89HDF\r\n\x1a\n", "an HDF5 file (e.g. a Keras .h5 model)"),
        (b"version https://git-lfs", "a Git LFS pointer, not the file itself (git lfs pull, or download the URL)"),
    ]
    for prefix, what in magic:
        if head.startswith(prefix):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (e.g. a PyTorch state dict: it is not importable)"
    if len(head) > 10 and head[8:10] == b'{"':
        return "a safetensors file (if it is a checkpoint already, serve it: ALEXNET_CHECKPOINT=…)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.lstrip().startswith("<"):
        return "an HTML or XML text (a web page saved instead of the file?)"
    return "a text file" if text.strip() else None


def _not_a_model(data, problem: str) -> str:
    what = describe_content(data)
    return (
        f"neither a Caffe .caffemodel nor an ONNX model ({f'it looks like {what}' if what else problem}): "
        + FORMATS_EXPECTED
    )


def detect_format(top: Message, name: str) -> str:
    """"caffe" or "onnx", by extension, else by which top-level fields are present."""
    suffix = Path(name).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".caffemodel", ".binaryproto"):
        return "caffe"
    wire_type = {number: entries[0][0] for number, entries in top.fields.items()}
    # ONNX: ir_version (varint), graph (message). Caffe: name = 1 (a string: LEN), layers, layer.
    if wire_type.get(ModelProto.GRAPH) == LEN or wire_type.get(ModelProto.IR_VERSION) == VARINT:
        return "onnx"
    if NetParameter.LAYER in top or NetParameter.LAYERS in top:
        return "caffe"
    raise WeightsError(
        _not_a_model(top.buf, "a protobuf message without the fields of either") + "; pass --format if it is one"
    )


def parse(data: bytes | bytearray | memoryview, format: str = "auto", name: str = "") -> Imported:
    """Parse a Caffe or ONNX file's bytes into grouped-layout tensors (not yet checked against a config)."""
    try:
        top = Message(data)
        format = detect_format(top, name) if format == "auto" else format
        imported = read_caffemodel(top) if format == "caffe" else read_onnx(top)
    except WireError as e:
        if not bytes(data[:2]).startswith(_PROTOBUF_STARTS):  # not even the start of either kind of file
            problem = str(e).removesuffix(": not a protobuf message")
            raise WeightsError(_not_a_model(data, f"its bytes are not a protobuf message: {problem}")) from None
        if format == "auto":
            suffix = Path(name).suffix.lower()
            format = "onnx" if suffix == ".onnx" else "caffe" if suffix in (".caffemodel", ".binaryproto") else format
        what = {"caffe": "Caffe .caffemodel", "onnx": "ONNX model"}.get(format, "Caffe or ONNX model")
        raise WeightsError(
            f"not a readable {what} ({e}): the file is cut short or damaged; download it again"
        ) from None
    return imported


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


TRAINING_SOURCE = "python -m training train"  # a training checkpoint's provenance["source"]
IMPORTED_BY = "model.import_weights"  # an imported checkpoint's provenance["imported_by"]


def check_out(out: str | Path, force: bool = False) -> str | None:
    """May an import write ``out``? Nothing there, an earlier import, or ``force``: yes (returns what is
    replaced, None for nothing). A checkpoint from training, of unknown origin, or a file that is not a
    readable checkpoint: OverwriteRefused, naming the file, what it holds, and --force."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return None
    try:
        checkpoint = load_checkpoint(out)
    except CheckpointError as e:
        what = f"a file that is not a readable checkpoint ({e.problem})"
        try:
            with open(out, "rb") as f:
                looks = describe_content(f.read(512))
        except OSError:
            looks = None
        if looks:
            what += f"; it looks like {looks}"
    else:
        p = checkpoint.provenance
        if p.get("imported_by") == IMPORTED_BY:
            return f"an earlier import (of {p.get('source_name') or p.get('source')})"
        what = describe_checkpoint(p)
    if force:
        return what
    raise OverwriteRefused(
        f"{out} holds {what}; importing would replace it. Pass --force to overwrite it, or choose another --out "
        "(an earlier import is replaced without --force)"
    )


def describe_checkpoint(provenance: dict) -> str:
    """e.g. "a checkpoint trained by `python -m training train`, epoch 12, val top-1 error 41.2%"."""
    source = provenance.get("source")
    parts = [f"a checkpoint trained by `{source}`" if source == TRAINING_SOURCE else
             f"a checkpoint of unknown origin (source: {source})" if source else "a checkpoint of unknown origin"]
    if provenance.get("dataset"):
        parts[0] += f" on {provenance['dataset']}"
    if isinstance(provenance.get("epoch"), (int, float)):
        parts.append(f"epoch {provenance['epoch']:g}")
    if isinstance(provenance.get("val_top1_error"), (int, float)):
        parts.append(f"val top-1 error {provenance['val_top1_error']:.1%}")
    return ", ".join(parts)


def published_match(digests: Digests) -> PublishedFile | None:
    return next((p for p in PUBLISHED if getattr(digests, p.checksum[0]) == p.checksum[1]), None)


def import_weights(
    source: str,
    out: str | Path,
    *,
    format: str = "auto",
    expected: dict[str, str] | None = None,
    allow_unverified: bool = False,
    classes: tuple[ImageClass, ...] | None = None,
    progress: TextIO | None = sys.stderr,
    timeout: float = 60.0,
    force: bool = False,
) -> Checkpoint:
    """Convert ``source`` (path or URL) into a checkpoint at ``out``; return it.

    ``expected`` ({"sha1"|"sha256": hex}) is checked when given; otherwise a file named like a published
    one (bvlc_alexnet.caffemodel, bvlcalexnet-12.onnx) is checked against the published checksum, and a
    download of any other file is refused unless ``allow_unverified``. Raises DownloadError (network),
    ChecksumMismatch, FileNotFoundError or WeightsError; ``out`` is written only on success.

    An existing ``out`` is replaced only when it is an earlier import, or with ``force``: a checkpoint from
    training (or anything else) raises OverwriteRefused, before anything is downloaded (see ``check_out``).
    """
    check_out(out, force)
    url = source if is_url(source) else None
    name = Path(unquote(urlsplit(source).path) if url else source).name
    known = PUBLISHED_BY_NAME.get(name)
    if expected:
        verify_with, verified_by = expected, "checksum given on the command line"
    elif known is not None:
        verify_with, verified_by = dict([known.checksum]), f"published {known.checksum[0]}"
    elif url and not allow_unverified:
        raise ChecksumMismatch(
            f"{source}: no published checksum is known for {name!r}; pass --expected-sha256 or --expected-sha1 "
            "(or --allow-unverified)"
        )
    else:
        verify_with, verified_by = {}, None

    if url:
        with tempfile.TemporaryDirectory(prefix="alexnet-import-") as tmp:
            path = Path(tmp) / (name or "download")
            digests = download(url, path, progress=progress, timeout=timeout)
            digests.verify(verify_with, name)
            data = path.read_bytes()
    else:
        data, digests = read_file(source)
        digests.verify(verify_with, name)

    try:
        imported = parse(data, format, name)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    del data  # the tensors own copies; free the file's 244 MB before writing the checkpoint

    match = published_match(digests)
    provenance = {
        "trained": True,
        "source": source if url else str(Path(source).resolve()),
        "source_name": match.description if match else name,
        "source_bytes": digests.size,
        "source_sha1": digests.sha1,
        "source_sha256": digests.sha256,
        "source_verified": verified_by or "not verified (no checksum known or given)",
        "imported_by": "model.import_weights",
    }
    if match:
        provenance.update(
            dataset="ILSVRC-2012", dataset_size=1_281_167, **PUBLISHED_VAL_ERRORS, val_errors_note=PUBLISHED_VAL_NOTE
        )
    try:
        checkpoint = to_checkpoint(imported, provenance=provenance, classes=classes)
    except WeightsError as e:
        raise WeightsError(f"{source}: {e}") from None
    replaced = check_out(out, force)  # again: training may have written it meanwhile
    checkpoint.save(out)
    if replaced and progress is not None:
        print(f"replaced {out}: {replaced}", file=progress)
    checkpoint.path = str(out)
    return checkpoint


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m model.import_weights",
        allow_abbrev=False,  # --ou is not --out: a whole flag name or an error
        description="Convert the published BVLC AlexNet weights (Caffe .caffemodel or ONNX model zoo .onnx) "
        "into this project's checkpoint format.",
        epilog="Published sources: "
        + "; ".join(f"{p.url} ({p.checksum[0]} {p.checksum[1][:12]}…)" for p in PUBLISHED)
        + ". Exit status: 0 written, 1 the source is unusable (checksum, format, shapes), 2 usage, or --out "
        "holds a checkpoint that is not an earlier import (see --force), 3 download failed (network).",
    )
    parser.add_argument("source", help="path or http(s) URL of bvlc_alexnet.caffemodel or bvlcalexnet-12.onnx")
    parser.add_argument("--out", required=True, type=Path,
                        help="checkpoint to write (.safetensors), atomically. An existing file there is replaced "
                        "only when it is an earlier import; a checkpoint from training (e.g. "
                        "checkpoints/best.safetensors after `python -m training train`) or any other file is "
                        "refused (exit status 2) unless --force")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even when it holds a trained checkpoint or another file")
    parser.add_argument("--format", choices=("auto", "caffe", "onnx"), default="auto",
                        help="source format (default: from the extension, else from the content)")
    parser.add_argument("--expected-sha1", metavar="HEX", help="check the source against this sha1")
    parser.add_argument("--expected-sha256", metavar="HEX", help="check the source against this sha256")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="download a URL even when no checksum is known or given")
    parser.add_argument("--classes", type=Path, metavar="FILE",
                        help="class list, 'wnid names' per line (default: the 1000 ImageNet classes)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    expected = {k: v for k, v in (("sha1", args.expected_sha1), ("sha256", args.expected_sha256)) if v}
    try:
        classes = parse_synset_words(args.classes.read_text(encoding="utf-8")) if args.classes else None
        checkpoint = import_weights(
            args.source,
            args.out,
            format=args.format,
            expected=expected or None,
            allow_unverified=args.allow_unverified,
            classes=classes,
            progress=None if args.quiet else sys.stderr,
            timeout=args.timeout,
            force=args.force,
        )
    except OverwriteRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DownloadError as e:
        print(f"error: download failed: {e}", file=sys.stderr)
        return 3
    except (ChecksumMismatch, WeightsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    p = checkpoint.provenance
    parameters = checkpoint.config.parameter_count()
    print(
        f"wrote {args.out}: AlexNet, {checkpoint.config.num_classes} classes, {parameters:,} parameters, "
        f"from {p['source_name']} ({p['source_format']}; sha256 {p['source_sha256'][:12]}…, {p['source_verified']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
