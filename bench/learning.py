"""The learning benchmark: the paper's recipe on real photos (Imagenette), as a curve per epoch.

    python bench/learning.py /data/imagenette --out /tmp/learning --width 0.5 --epochs 30

SRC is an ImageNet-layout folder (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``): Imagenette's 10 classes
(9,469 train, 3,925 val) as the ``thunderInfy/imagenette`` repository holds them, or any other. The
script runs the project's own commands, each as its own process, as a user would (for a subset, e.g.
one that fits the GPU machine's carry budget, write it first with scripts/imagenette_fixture.py):

1. ``python -m training prepare`` into OUT/prepared (``--store``, default jpeg), once;
2. ``python -m training train`` into OUT/run with the paper's recipe as the defaults stand, plus the
   flags given after ``--`` (and ``--width``, ``--epochs``, ``--batch-size``, ``--seed``); a rerun resumes;
3. the curve: one Markdown row per epoch (lr, train loss, val loss, val top-1/top-5 error, img/s, the
   training steps' seconds and the wall time since training started) printed and written to OUT/learning.md,
   with the final centre-crop and 10-patch evaluation of ``best.safetensors`` (OUT/run/summary.json),
   and the picture OUT/run/curves.png (``python -m training plot``; skipped, with its message, without
   matplotlib).

Exit status: 0, or the failing command's own status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], required: bool = True) -> None:
    """Runs one of the project's commands; a failure ends the benchmark with its status, if ``required``."""
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    code = subprocess.call(command, cwd=REPO, env=env)
    if code and required:
        sys.exit(code)


def curve(run_dir: Path, classes: int) -> str:
    """The run's metrics as a Markdown table, and its final evaluation."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    chance_loss = math.log(classes)
    lines = [
        f"chance: top-1 error {1 - 1 / classes:.1%}, loss ln {classes} = {chance_loss:.3f}",
        "",
        "| epoch | lr | train loss | val loss | val top-1 err | val top-5 err | img/s | training s | wall |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wall = 0.0
    for r in records:
        wall += r.get("wall_seconds", r["seconds"])  # the whole epoch: training, evaluation, files
        lines.append(
            f"| {r['epoch']} | {r['lr']:g} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['val_top1_error']:.1%} "
            f"| {r['val_top5_error']:.1%} | {r['images_per_second']:.0f} | {r['seconds']:.0f} "
            f"| {int(wall // 60)}:{int(wall % 60):02d} |"
        )
    summary_file = run_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())["val"]
        lines += [
            "",
            f"best.safetensors, val: centre crop top-1 {summary['center']['top1_error']:.1%} "
            f"top-5 {summary['center']['top5_error']:.1%}; 10 patches top-1 {summary['ten']['top1_error']:.1%} "
            f"top-5 {summary['ten']['top5_error']:.1%} ({summary['center']['images']} images)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="ImageNet-layout folder: train/<wnid>/, val/<wnid>/")
    parser.add_argument("--out", type=Path, required=True, help="work folder: prepared store, run")
    parser.add_argument("--store", choices=("raw", "jpeg"), default="jpeg", help="prepared store (default jpeg)")
    parser.add_argument("--width", default="0.5", help="train --width (default 0.5)")
    parser.add_argument("--epochs", default="30", help="train --epochs (default 30)")
    parser.add_argument("--batch-size", default="128", help="train --batch-size (default 128, the paper's)")
    parser.add_argument("--seed", default="0", help="train --seed (default 0)")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    python = sys.executable
    src = args.src
    prepared, run_dir = args.out / "prepared", args.out / "run"
    if not (prepared / "dataset.json").exists():
        run([python, "-m", "training", "prepare", str(src), str(prepared), "--store", args.store, "--no-progress"])
    classes = len(json.loads((prepared / "dataset.json").read_text())["classes"])
    resume = ["--resume"] if (run_dir / "state.safetensors").exists() else []
    started = time.monotonic()
    run(
        [python, "-m", "training", "train", str(prepared), "--out", str(run_dir), "--width", args.width,
         "--epochs", args.epochs, "--batch-size", args.batch_size, "--seed", args.seed, *resume, *extra]
    )  # fmt: skip
    elapsed = time.monotonic() - started
    run([python, "-m", "training", "plot", str(run_dir)], required=False)  # no matplotlib: no picture, same figures
    report = (
        f"{curve(run_dir, classes)}\n\ntrain command: {elapsed:.0f} s wall, start-up and final evaluation included\n"
    )
    (args.out / "learning.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
