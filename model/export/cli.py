"""``python -m model.export``: the command line, its checks and its one-line errors.

Exit status: 0 written; 1 the checkpoint cannot be read or exported (an LRN setting ONNX cannot express,
or --verify found a difference), the file cannot be written, or onnx is not installed; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, load_checkpoint
from .errors import ExportError, MissingDependency, require_onnxruntime
from .graph import DEFAULT_OPSET, INPUT_NAME, LOGITS_NAME, MIN_OPSET, PROBABILITIES_NAME, check_opset
from .onnx_file import export
from .triton import (
    DEFAULT_MAX_BATCH_SIZE,
    TRITON_LABELS_FILE,
    TRITON_MODEL_FILE,
    check_triton_name,
    write_triton_repository,
)


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
    return parser


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
            require_onnxruntime()
    except MissingDependency as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        options = {"softmax": args.softmax, "opset": args.opset, "verify": args.verify}
        if args.triton_repository is not None:
            options |= {"name": args.triton_name, "version": args.model_version, "max_batch_size": args.max_batch_size}
            exported = write_triton_repository(checkpoint, args.triton_repository, **options)
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
        serve = f"tritonserver --model-repository {args.triton_repository}"
        print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / TRITON_LABELS_FILE}: {serve}")
    if exported.max_difference is not None:
        print(f"verified with ONNX Runtime: probabilities within {exported.max_difference:.1e} of the net's")
    return 0
