"""Writes tests/fixtures/imagenette/: a small real subset of Imagenette in ImageNet's layout.

    python scripts/imagenette_fixture.py /data/imagenette tests/fixtures/imagenette

SRC is Imagenette as the public ``thunderInfy/imagenette`` repository holds it: ``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG``, 224×224 JPEGs of 10 ImageNet classes. For each class the script takes every k-th
file in sorted order (``--train`` and ``--val`` per class) and writes it at ``--side`` pixels (Lanczos) as a
JPEG of ``--quality``. The result is the same every time from the same SRC, and small enough to ship
(≤ 6 MB): the real-data learning test and the README's walk-through train on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def write_subset(src: Path, dest: Path, per_class: dict[str, int], side: int, quality: int) -> tuple[int, int]:
    """(images, bytes) written."""
    images = size = 0
    for split, count in per_class.items():
        for folder in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            files = sorted(folder.iterdir())
            if len(files) < count:
                raise SystemExit(f"error: {folder} has {len(files)} images, fewer than {count}")
            (dest / split / folder.name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = files[i * len(files) // count]
                out = dest / split / folder.name / f"{path.stem}.JPEG"
                with Image.open(path) as image:
                    image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS).save(
                        out, "JPEG", quality=quality
                    )
                images, size = images + 1, size + out.stat().st_size
    return images, size


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--train", type=int, default=90, help="train images per class (default 90)")
    parser.add_argument("--val", type=int, default=20, help="val images per class (default 20)")
    parser.add_argument("--side", type=int, default=128, help="pixels per side (default 128)")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    args = parser.parse_args()
    images, size = write_subset(args.src, args.dest, {"train": args.train, "val": args.val}, args.side, args.quality)
    print(f"{images} images, {size / 1e6:.1f} MB → {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
