"""``python -m model.import_weights``: the command line and its exit statuses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..classes import parse_synset_words
from .common import OverwriteRefused, WeightsError
from .download import ChecksumMismatch, DownloadError
from .importing import import_weights
from .published import PUBLISHED


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
