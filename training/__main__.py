"""Prepare ImageNet, train AlexNet on it, evaluate a checkpoint, classify images with it, plot a run.
Each command has its own flags: python -m training COMMAND --help.

examples:
    python -m training prepare /data/imagenet /data/imagenet-256 --workers 16
    python -m training prepare /data/imagenet /data/imagenet-jpeg --store jpeg   # 31 GB instead of 252 GB
    python -m training train /data/imagenet-256 --out runs/alexnet            # the paper's recipe
    torchrun --nproc-per-node 2 -m training train /data/imagenet-256 --out runs/alexnet   # 2 replicas × 2 GPUs
    python -m training train /data/imagenet-256 --out runs/alexnet --resume   # continue after a crash
    python -m training evaluate runs/alexnet/best.safetensors /data/imagenet-256
    python -m training plot runs/alexnet                                      # → runs/alexnet/curves.png
    python -m training predict runs/alexnet/best.safetensors photos/ --output photos.jsonl   # a folder's top-5

Exit status: 0 done, 2 bad input (message on stderr, nothing written is damaged), 1 other failures,
130 interrupted (rerun the same command, with --resume for train, to continue).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .errors import TrainingError
from .hyperparameters import add_flags as add_hyperparameter_flags
from .hyperparameters import given_flags
from .train import Options

# --help shows this module's text as written (plain text: no markup), the examples as an epilogue.
DESCRIPTION, EXAMPLES = __doc__.split("\n\n", 1)


class _Parser(argparse.ArgumentParser):
    """Whole flag names only: an abbreviation (``--epoch`` for ``--epochs``) is an error, not a guess. The
    subcommands' parsers are of this class too (argparse makes them of the parent's class)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples keep their lines
    )
    commands = parser.add_subparsers(dest="command", required=True)
    flagged = (_prepare_flags(commands), _train_flags(commands), _evaluate_flags(commands), _predict_flags(commands))
    for sub in flagged:
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = commands.add_parser(
        "plot", help="draw a run's training curves and conv1 kernels, or a checkpoint's kernels, as PNGs"
    )
    c.add_argument("run", help="a run folder (the --out of train), or a .safetensors checkpoint")
    c.add_argument(
        "--output", help="PNG file to write (default RUN/curves.png; for a checkpoint, <name>.filters.png beside it)"
    )
    return parser


def _prepare_flags(commands) -> argparse.ArgumentParser:
    p = commands.add_parser("prepare", help="decode a dataset once into the fast prepared format")
    p.add_argument(
        "src",
        help="the dataset as you have it: train/<wnid>/ + val/ folders, image-net.org's tars + devkit, Kaggle's "
        "root, Hugging Face's tar.gz shards or WebDataset shards (the form is found and printed)",
    )
    p.add_argument("dest", help="output folder (created; a rerun continues an interrupted preparation)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPU cores)")
    p.add_argument(
        "--val-labels",
        help="ground truth for a flat val: lines '<file> <class index>' or '<file> <wnid>', Kaggle's "
        "LOC_val_solution.csv, or the devkit (.tar.gz or folder); default: the devkit, SRC/val.txt or the CSV in SRC",
    )
    p.add_argument("--name", help="dataset name recorded in checkpoints (default: the name of SRC)")
    p.add_argument("--chunk", type=int, default=512, help="images between progress records (default 512)")
    p.add_argument(
        "--store",
        default="raw",
        help="raw: uint8 arrays, 196,608 bytes an image, no decoding (default); jpeg: each image re-encoded "
        "as a JPEG, ~1/8 of the bytes (fits in the page cache), decoded by the loader's worker processes",
    )
    p.add_argument("--quality", type=int, default=None, help="JPEG quality 1..100 of --store jpeg (default 90)")
    return p


def _train_flags(commands) -> argparse.ArgumentParser:
    t = commands.add_parser("train", help="train the network (the paper's recipe by default)")
    t.add_argument("data", help="a folder written by the prepare command")
    t.add_argument("--out", required=True, help="run folder: state, checkpoints, metrics")
    add_hyperparameter_flags(t)  # what a run is (a resume keeps them; training/hyperparameters.py)
    _how_to_run_flags(t)
    return t


def _how_to_run_flags(t: argparse.ArgumentParser) -> None:
    """Where and how the run goes: devices, loader, evaluation, saving, numerics, processes."""
    t.add_argument(
        "--devices", help="tower devices, e.g. cuda:0,cuda:1 (default: 2 GPUs, else 1 GPU for both, else cpu)"
    )
    t.add_argument(
        "--workers",
        type=int,
        default=None,
        help="loader workers: copy threads for a raw store (default 4), decoding processes for a JPEG store "
        "(default: this process's share of the CPU cores, less one)",
    )
    t.add_argument(
        "--ten-crop", action="store_true", help="also evaluate with 10 patches every epoch (always at the end)"
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    t.add_argument(
        "--save-every", type=int, default=0, help="also save the resume state every N steps (default: per epoch)"
    )
    t.add_argument("--eval-batch-size", type=int, default=128, help="(default 128)")
    t.add_argument(
        "--log-every", type=int, default=20, help="steps between loss readings and divergence checks (default 20)"
    )
    t.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls and convolutions (default TF32)")
    t.add_argument("--no-cudnn-benchmark", action="store_true", help="CUDA: no cuDNN autotuning")
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (slower on GPUs): a resumed GPU run then continues exactly, as on the CPU",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile each tower (fuses LRN's elementwise passes)")
    t.add_argument(
        "--dist-timeout",
        type=float,
        default=1800,
        help="seconds a collective waits for the slowest process, e.g. rank 0 writing a checkpoint (default 1800)",
    )


def _evaluate_flags(commands) -> argparse.ArgumentParser:
    e = commands.add_parser("evaluate", help="top-1/top-5 error of a checkpoint on a prepared split")
    e.add_argument("checkpoint", help="a .safetensors checkpoint")
    e.add_argument("data", help="a folder written by the prepare command")
    e.add_argument("--split", default="val", help="(default val)")
    e.add_argument("--crops", choices=("center", "ten", "both"), default="both", help="(default both)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    e.add_argument("--output", help="JSON result file (default: beside the checkpoint, <name>.eval-<split>.json)")
    e.add_argument(
        "--workers",
        type=int,
        default=2,
        help="loader workers: threads (raw store) or processes (jpeg store); default 2",
    )
    return e


def _predict_flags(commands) -> argparse.ArgumentParser:
    from predict.records import FORMATS
    from predict.run import DEFAULT_BATCH_SIZE, DEFAULT_TOP_K

    p = commands.add_parser(
        "predict", help="classify a folder or files with a checkpoint → JSON lines or CSV (resumable; features)"
    )
    p.add_argument("checkpoint", help="a .safetensors checkpoint")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="image files, or folders (searched recursively)")
    p.add_argument("--output", "-o", required=True, help="OUT.jsonl or OUT.csv; an existing OUT is continued")
    p.add_argument("--files-from", metavar="LIST", help="also the files named in LIST, one path a line (-: stdin)")
    p.add_argument("--format", choices=FORMATS, help="(default: csv for a .csv OUT, else jsonl)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"classes per file (default {DEFAULT_TOP_K})")
    p.add_argument("--crops", choices=("center", "ten"), default="center", help="ten: the paper's 10 patches")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"(default {DEFAULT_BATCH_SIZE})")
    p.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: CPU cores less one; 0: inline)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 …")
    p.add_argument(
        "--ground-truth", metavar="FILE", help="lines '<file> <class index>' (Caffe's val.txt) or '<file> <wnid>'"
    )
    p.add_argument("--features", metavar="OUT.npy", help="also write hidden activations (float32 [n, 4096])")
    p.add_argument("--layer", choices=("fc6", "fc7"), default="fc7", help="of --features (default fc7)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each --features row")
    p.add_argument(
        "--max-pixels", type=int, default=64_000_000, help="width × height limit per image (default 64,000,000)"
    )
    return p


OUT_OF_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}


def main(argv: list[str] | None = None, hooks=None) -> int:
    """``hooks``: a ``training.train.Hooks`` for tests (instrumenting the training loop)."""
    from model import CheckpointError
    from predict.errors import PredictError

    args = _parser().parse_args(argv)
    commands = {"prepare": _prepare, "train": _train, "predict": _predict, "plot": _plot, "evaluate": _evaluate}
    try:
        return commands[args.command](args, argv=argv, hooks=hooks)
    except TrainingError as e:
        if not getattr(e, "rank_zero_only", False) or os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)  # (said once for an error every process of a run stops on)
        return 2
    except PredictError as e:  # predict's bad input: 2, as training's
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a bad checkpoint (predict, plot): 1, as model.export
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno in OUT_OF_SPACE:  # a full disk, a user's quota, or a file-size limit (ulimit -f)
            print(
                f"error: {OUT_OF_SPACE[e.errno]}{f' writing {e.filename}' if e.filename else ''}. Files already "
                "written are intact; free some space and rerun (train: with --resume) to continue.",
                file=sys.stderr,
            )
            return 2
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command (train: with --resume) to continue", file=sys.stderr)
        return 130


def _prepare(args, argv=None, **_) -> int:
    _passive_openmp(argv)  # the main loop must not take the workers' cores (BENCHMARKS.md, "prepare")
    from .prepare import prepare

    if args.workers is not None and args.workers < 0 or args.chunk < 1:
        raise TrainingError("--workers must be at least 0 and --chunk at least 1")
    if args.quality is not None and args.store == "raw":
        raise TrainingError("--quality applies only to --store jpeg")
    prepare(
        args.src,
        args.dest,
        workers=args.workers,
        val_labels=args.val_labels,
        name=args.name,
        chunk=args.chunk,
        show_progress=not args.no_progress,
        store=args.store,
        quality=args.quality,
    )
    return 0


def _train(args, hooks=None, **_) -> int:
    from .train import train

    given = given_flags(args)
    options = Options(
        data=args.data,
        out=args.out,
        devices=args.devices,
        workers=args.workers,
        ten_crop=args.ten_crop,
        resume=args.resume,
        save_every=args.save_every,
        eval_batch_size=args.eval_batch_size,
        show_progress=not args.no_progress,
        log_every=args.log_every,
        tf32=not args.no_tf32,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        deterministic=args.deterministic,
        compile=args.compile,
        dist_timeout=args.dist_timeout,
    )
    if (options.workers or 0) < 0 or options.save_every < 0 or options.eval_batch_size < 1:
        raise TrainingError("--workers and --save-every must be at least 0, --eval-batch-size at least 1")
    if options.log_every < 1 or not options.dist_timeout > 0:
        raise TrainingError("--log-every must be at least 1 and --dist-timeout positive")
    train(given, options, hooks)
    return 0


def _passive_openmp(argv) -> None:
    """As the service does: idle OpenMP threads sleep instead of spinning, so decoding processes get the
    cores. libgomp reads this when torch loads: run the command again with it (from a shell only)."""
    if argv is None and "OMP_WAIT_POLICY" not in os.environ and getattr(sys, "orig_argv", None):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, sys.orig_argv)


def _predict(args, argv=None, **_) -> int:
    _passive_openmp(argv)  # the cores go to decoding between forward passes (BENCHMARKS.md, "Predictions …")
    from predict.run import Options as PredictOptions
    from predict.run import run_predict

    if not args.sources and args.files_from is None:
        raise TrainingError("predict needs a SOURCE folder or file, or --files-from LIST")
    flags = {k: getattr(args, k) for k in PredictOptions.__dataclass_fields__ if k != "show_progress"}
    try:
        run_predict(args.checkpoint, args.sources, PredictOptions(**flags, show_progress=not args.no_progress))
    except KeyboardInterrupt:
        again = "starts afresh (--features)" if args.features else "continues where this one stopped"
        kept = f"{args.output} keeps the files done so far"
        print(f"\ninterrupted; {kept}: rerunning the same command {again}", file=sys.stderr)
        return 130
    return 0


def _plot(args, **_) -> int:
    from .plot import plot_run

    for path in plot_run(args.run, args.output):
        print(path)
    return 0


def _evaluate(args, **_) -> int:
    from .evaluate import run_evaluate

    crops = ("center", "ten") if args.crops == "both" else (args.crops,)
    if args.batch_size < 1 or args.workers < 0:
        raise TrainingError("--batch-size must be at least 1 and --workers at least 0")
    run_evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        crops=crops,
        batch_size=args.batch_size,
        device=args.device,
        output=args.output,
        workers=args.workers,
        show_progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
