"""Helpers for the training tests: tiny ImageNet-layout sources of coloured shapes, ``prepare`` and
``python -m training train`` run quietly in this process with a tiny fast configuration, one thread for
runs compared bit for bit, file digests."""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from training.__main__ import main
from training.prepare import prepare

REPO = Path(__file__).resolve().parents[2]
PHOTOS = REPO / "tests" / "fixtures" / "images"
WNIDS = ("n01440764", "n01443537", "n01728572", "n02096051")  # real ImageNet classes: tench, goldfish, …
SHAPES = ("ellipse", "rectangle", "triangle", "bar")
COLOURS = ((220, 40, 40), (40, 190, 60), (50, 70, 230), (230, 210, 40))


def draw_example(rng: random.Random, kind: int, size=(72, 64), noise: float = 0.0) -> Image.Image:
    """A coloured shape on a grey background: class ``kind`` differs from the others in colour and shape."""
    width, height = size
    grey = rng.randint(60, 190)
    image = Image.new("RGB", size, (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    s = rng.randint(height * 3 // 8, height * 9 // 16)
    x, y = rng.randint(4, width - s - 4), rng.randint(4, height - s - 4)
    colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[kind % 4])
    shape = SHAPES[kind % 4]
    if shape == "ellipse":
        draw.ellipse((x, y, x + s, y + s), fill=colour)
    elif shape == "rectangle":
        draw.rectangle((x, y, x + s, y + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    else:
        draw.rectangle((4, y, width - 4, y + s // 3), fill=colour)
    if noise:  # texture: no two neighbouring pixels equal, so max-pooling has no ties to break
        texture = Image.frombytes("L", size, bytes(rng.getrandbits(8) for _ in range(width * height)))
        image = Image.blend(image, texture.convert("RGB"), noise)
    return image


def make_source(root: Path, *, classes=3, train=4, val=2, wnids=WNIDS, seed=0, fmt="JPEG", noise=0.0) -> Path:
    """An ImageNet-layout folder: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for kind, wnid in enumerate(wnids[:classes] if count else ()):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_example(rng, kind, noise=noise).save(folder / f"{wnid}_{i}.{fmt}", quality=92)
    return root


def prepare_quietly(src, dest, **kwargs):
    return prepare(src, dest, show_progress=False, **{"workers": 0, **kwargs})


# A tiny, fast training configuration: the flags every test's run of `train` shares.
TINY_RUN = ("--width", "0.0625", "--batch-size", "4", "--epochs", "2", "--workers", "1", "--no-progress")


def train_cli(data, out, *extra) -> int:
    """``python -m training train`` in this process, with a tiny fast configuration."""
    args = ["train", str(data), "--out", str(out), *TINY_RUN, "--lr", "0.003", *map(str, extra)]
    return main(args)


@contextlib.contextmanager
def one_thread():
    """Runs compared bit for bit must use the same number of threads (reductions split differently);
    subprocesses get OMP_NUM_THREADS=1 to match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def expect_error(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in last, err
    return last
