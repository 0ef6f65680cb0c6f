"""``python -m training prepare SRC DEST``: decode every image once into the prepared format (see data.py).

Source layouts:
    SRC/train/<wnid>/*.JPEG                            one folder per class (class index = sorted wnid order)
    SRC/val/<wnid>/*.JPEG                              the same, or:
    SRC/val/*.JPEG + a ground-truth file               lines "<file> <class index>" (Caffe's val.txt);
                                                       --val-labels, default SRC/val.txt

Each image goes through the shared preprocessing (``model.load_image``: decode, EXIF orientation, RGB,
shorter side 256, centre 256×256) in a pool of worker processes. The main process appends the results
to ``DEST/.<split>.u8.partial`` and, every ``--chunk`` images, fsyncs it and atomically records how far
it got (with the running sums for the statistics) in ``DEST/.<split>.progress.safetensors``. A rerun
after an interruption truncates the partial file to the last record and continues from there. Finished
files appear by rename; ``dataset.json`` is written last.

Statistics (over every image of the training split, all 65,536 pixels each): the mean image, and the 3×3
covariance of RGB values with its eigenvectors and eigenvalues for the paper's PCA lighting. The sums
are accumulated exactly in int64, so the result does not depend on the number of workers or on resuming.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from model import ImageClass, ImageError, atomic_path, atomic_write, imagenet_classes, load_image
from model.atomic import remove_stale_temporaries
from model.checkpoint import save_safetensors

from .data import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_BYTES,
    IMAGE_SIZE,
    SPLITS,
    DirectoryLock,
    TrainingError,
    load_stats,
    save_stats,
    stats_from_sums,
)
from .progress import Progress

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CHUNK = 512  # images between progress records: ~100 MB of output, a few seconds of work


# 1. What is in SRC.


@dataclass(frozen=True)
class Source:
    root: Path
    classes: tuple[ImageClass, ...]
    items: dict[str, list[tuple[str, int]]]  # split → [(path relative to root, class index)]

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the list of images and labels: a rerun continues only on the same source."""
        digest = hashlib.sha256(json.dumps([[c.wnid for c in self.classes], self.items]).encode())
        return digest.hexdigest()


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirectories(folder: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def _images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if _is_image(e))


def _class_folders(root: Path, split: str, wnids: dict[str, int] | None) -> list[tuple[str, int]]:
    """Items of a split laid out as <split>/<wnid>/*; ``wnids`` (from train) maps wnid → class index."""
    folder = root / split
    items = []
    for index, entry in enumerate(_subdirectories(folder)):
        label = index if wnids is None else wnids.get(entry.name)
        if label is None:
            raise TrainingError(f"{folder / entry.name}: {entry.name!r} is not one of the classes in train/")
        names = _images(folder / entry.name)
        if not names:
            raise TrainingError(
                f"{folder / entry.name}: class folder with no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        items += [(f"{split}/{entry.name}/{name}", label) for name in names]
    return items


def _flat_val(root: Path, labels_path: Path | None, num_classes: int) -> list[tuple[str, int]]:
    folder = root / "val"
    labels_path = labels_path or root / "val.txt"
    if not labels_path.is_file():
        raise TrainingError(
            f"{folder} holds images but no class folders, and there is no ground-truth file {labels_path}; "
            "pass --val-labels FILE (lines '<file> <class index>')"
        )
    present = set(_images(folder))
    labels: dict[str, int] = {}
    for number, line in enumerate(labels_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise TrainingError(f"{labels_path}:{number}: expected '<file> <class index>', got {line.strip()!r}")
        name, label = Path(parts[0]).name, int(parts[1])
        if not 0 <= label < num_classes:
            raise TrainingError(f"{labels_path}:{number}: class index {label} is outside 0..{num_classes - 1}")
        if name in labels:
            raise TrainingError(f"{labels_path}:{number}: {name} is listed twice")
        labels[name] = label
    missing = sorted(set(labels) - present)
    unlabelled = sorted(present - set(labels))
    if missing:
        raise TrainingError(f"{labels_path} lists {len(missing)} files that are not in {folder}, e.g. {missing[:3]}")
    if unlabelled:
        raise TrainingError(
            f"{len(unlabelled)} images in {folder} have no line in {labels_path}, e.g. {unlabelled[:3]}"
        )
    return [(f"val/{name}", labels[name]) for name in sorted(labels)]


def scan_source(root: str | Path, val_labels: str | Path | None = None) -> Source:
    """List the images of both splits, or raise TrainingError saying what is wrong with the layout."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"{root}: no such directory")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise TrainingError(f"{root}: missing the {split}/ folder (expected {split}/<wnid>/*.JPEG)")

    wnids = [e.name for e in _subdirectories(root / "train")]
    if not wnids:
        raise TrainingError(f"{root / 'train'}: empty split (expected one folder per class: train/<wnid>/*.JPEG)")
    if len(wnids) < 2:
        raise TrainingError(f"{root / 'train'}: only one class folder ({wnids[0]}); a classifier needs two or more")
    train = _class_folders(root, "train", None)

    val_folder = root / "val"
    if _subdirectories(val_folder):
        loose = _images(val_folder)
        if loose:
            raise TrainingError(f"{val_folder}: holds both class folders and loose images (e.g. {loose[0]}); use one")
        val = _class_folders(root, "val", {w: i for i, w in enumerate(wnids)})
    elif _images(val_folder):
        val = _flat_val(root, Path(val_labels) if val_labels else None, len(wnids))
    else:
        raise TrainingError(f"{val_folder}: empty split (expected val/<wnid>/*.JPEG, or val/*.JPEG with --val-labels)")

    known = {c.wnid: c for c in imagenet_classes()}
    # ImageNet's wnids get their names; any other class is named by its folder.
    classes = tuple(known.get(w, ImageClass(w, w)) for w in wnids)
    return Source(root, classes, {"train": train, "val": val})


# 2. Decoding, in worker processes.


def _init_worker() -> None:
    torch.set_num_threads(1)  # one image per process; also keeps forked OpenMP pools out of the way
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _decode(task: tuple[str, bool]):
    """Path → (uint8 bytes [3,256,256], per-image RGB sums or None, error or None). Never raises."""
    path, with_stats = task
    try:
        image = load_image(Path(path).read_bytes(), size=IMAGE_SIZE)
    except ImageError as e:
        return None, None, f"{type(e).__name__}: {e}"
    except OSError as e:
        return None, None, f"cannot read: {e.strerror or e}"
    except Exception as e:  # a decoder bug must not stop a day-long job; the file is listed as skipped
        return None, None, f"{type(e).__name__}: {e}"
    image = image.contiguous()
    data = ctypes.string_at(image.data_ptr(), IMAGE_BYTES)  # the tensor's bytes (no numpy needed)
    sums = None
    if with_stats:
        # Exact in float64: every product is at most 255², and a sum over 65,536 pixels stays below 2^53.
        pixels = image.reshape(3, -1).double()
        sums = (pixels.sum(1).long().tolist(), (pixels @ pixels.T).long().tolist())
    return data, sums, None


class _InlinePool:
    """``--workers 0``: decode in this process (for debugging and small tests)."""

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    def terminate(self):
        pass

    def join(self):
        pass


def _pool(workers: int):
    if workers <= 0:
        return _InlinePool()
    method = "fork" if sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker)


# 3. Writing one split, resumably.


class _Progress:
    """The resumable record of one split: how far the partial file is valid, and the running sums."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.done = 0  # source items consumed
        self.written = 0  # images in the partial file
        self.skipped: list[dict] = []  # {"file", "error"}
        self.sum_image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.int64)
        self.sum_rgb = torch.zeros(3, dtype=torch.int64)
        self.sum_outer = torch.zeros(3, 3, dtype=torch.int64)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> _Progress | None:
        """The saved record, or None when there is none or it belongs to another source or version."""
        if not path.exists():
            return None
        try:
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("fingerprint") != fingerprint:
                return None
            record = cls(path, fingerprint)
            record.done, record.written = int(meta["done"]), int(meta["written"])
            record.skipped = json.loads(meta["skipped"])
            record.sum_image, record.sum_rgb, record.sum_outer = (
                tensors["sum_image"],
                tensors["sum_rgb"],
                tensors["sum_outer"],
            )
            return record
        except Exception:
            return None  # unreadable: start the split over (the partial file is rewritten from 0)

    def save(self) -> None:
        meta = {
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "done": str(self.done),
            "written": str(self.written),
            "skipped": json.dumps(self.skipped),
        }
        tensors = {"sum_image": self.sum_image, "sum_rgb": self.sum_rgb, "sum_outer": self.sum_outer}
        with atomic_path(self.path) as tmp:
            save_safetensors(tensors, tmp, meta, destination=self.path)


def _split_complete(dest: Path, split: str, fingerprint: str) -> dict | None:
    """The split's index when it was finished for this source, else None."""
    index_path, data_path = dest / f"{split}.json", dest / f"{split}.u8"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return None
    if index.get("fingerprint") != fingerprint or not data_path.exists():
        return None
    if data_path.stat().st_size != len(index["labels"]) * IMAGE_BYTES:
        return None
    return index


def prepare_split(source: Source, dest: Path, split: str, pool, chunk: int, show_progress: bool = True) -> dict:
    """Decode one split into DEST/<split>.u8 + DEST/<split>.json; return its index."""
    fingerprint = source.fingerprint
    done_index = _split_complete(dest, split, fingerprint)
    if done_index is not None:
        print(f"{split}: already prepared ({len(done_index['labels']):,} images)", file=sys.stderr)
        return done_index

    items = source.items[split]
    partial = dest / f".{split}.u8.partial"
    record_path = dest / f".{split}.progress.safetensors"
    record = _Progress.load(record_path, fingerprint)
    if record is None:
        record = _Progress(record_path, fingerprint)
    elif record.done:
        print(f"{split}: continuing after {record.done:,} of {len(items):,} images", file=sys.stderr)
    with_stats = split == "train"
    final = dest / f"{split}.u8"

    finished = record.done == len(items) and not partial.exists() and final.exists()
    if finished and final.stat().st_size == record.written * IMAGE_BYTES:
        pass  # interrupted after the rename: only the index is left to write
    else:
        if not partial.exists() or partial.stat().st_size < record.written * IMAGE_BYTES:
            record = _Progress(record_path, fingerprint)  # nothing usable on disk: start the split over
        _decode_into(source, items, partial, record, pool, chunk, with_stats, split, show_progress)
        if with_stats:
            stats = stats_from_sums(record.sum_image, record.sum_rgb, record.sum_outer, record.written)
            save_stats(dest / "stats.safetensors", stats)
        os.replace(partial, final)  # the complete file appears at once

    skipped_items = {s["item"] for s in record.skipped}
    kept = [item for i, item in enumerate(items) if i not in skipped_items]
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "split": split,
        "files": [path for path, _ in kept],
        "labels": [label for _, label in kept],
        "skipped": [{"file": s["file"], "error": s["error"]} for s in record.skipped],
    }
    atomic_write(dest / f"{split}.json", json.dumps(index).encode())
    record_path.unlink(missing_ok=True)
    return index


def _decode_into(source, items, partial, record, pool, chunk, with_stats, split, show_progress) -> None:
    with open(partial, "ab") as out:
        out.truncate(record.written * IMAGE_BYTES)  # drop whatever followed the last record
        out.seek(record.written * IMAGE_BYTES)
        tasks = [(str(source.root / path), with_stats) for path, _ in items[record.done :]]
        bar = Progress(len(items), f"prepare {split}", enabled=show_progress)
        bar.done = record.done
        since_record = 0
        for data, sums, error in pool.imap(_decode, tasks, chunksize=4):
            if error is None:
                out.write(data)
                record.written += 1
                if with_stats:
                    record.sum_image += torch.frombuffer(bytearray(data), dtype=torch.uint8).view(
                        record.sum_image.shape
                    )
                    record.sum_rgb += torch.tensor(sums[0])
                    record.sum_outer += torch.tensor(sums[1])
            else:
                record.skipped.append({"item": record.done, "file": items[record.done][0], "error": error})
            record.done += 1
            since_record += 1
            bar.update(1, skipped=len(record.skipped))
            if since_record >= chunk or record.done == len(items):
                out.flush()
                os.fsync(out.fileno())
                record.save()
                since_record = 0
        bar.close()
    if record.written == 0:
        raise TrainingError(f"{source.root / split}: none of the {len(items):,} images could be decoded")


# 4. The command.


def _check_destination(dest: Path, source: Source) -> bool:
    """True when DEST already holds this exact dataset. Raises when DEST holds something else."""
    meta_path = dest / "dataset.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise TrainingError(f"{meta_path}: unreadable; choose another DEST") from None
        if meta.get("format") != FORMAT_NAME:
            raise TrainingError(f"{dest}: holds a dataset.json that `prepare` did not write; choose another DEST")
        if meta.get("format_version") != FORMAT_VERSION:
            raise TrainingError(
                f"{dest} holds a dataset prepared in format version {meta.get('format_version')} (this code writes "
                f"{FORMAT_VERSION}); delete it or choose another DEST"
            )
        if meta.get("fingerprint") != source.fingerprint:
            raise TrainingError(
                f"{dest} already holds a prepared dataset from another source ({meta.get('source')}); "
                "choose another DEST"
            )
        return True
    ours = {"train.u8", "val.u8", "train.json", "val.json", "stats.safetensors", "skipped.txt"}
    ours.add("lost+found")  # DEST may be the root of a fresh filesystem
    if dest.exists() and not dest.is_dir():
        raise TrainingError(f"{dest}: exists and is not a directory; choose another DEST")
    foreign = (
        [p.name for p in dest.iterdir() if p.name not in ours and not p.name.startswith(".")] if dest.exists() else []
    )
    if foreign:
        raise TrainingError(
            f"{dest}: not empty and not a prepared dataset (holds {sorted(foreign)[:3]}); choose another DEST"
        )
    return False


def _check_disk_space(dest: Path, source: Source) -> None:
    needed = 0
    for split in SPLITS:
        if _split_complete(dest, split, source.fingerprint) is None:
            record = _Progress.load(dest / f".{split}.progress.safetensors", source.fingerprint)
            needed += (len(source.items[split]) - (record.written if record else 0)) * IMAGE_BYTES
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise TrainingError(
            f"not enough disk space in {dest}: the prepared images need {needed / 1e9:,.2f} GB, "
            f"{free / 1e9:,.2f} GB are free"
        )


def _prepare_locked(source: Source, dest: Path, workers, name, chunk, show_progress) -> dict:
    _check_disk_space(dest, source)
    counts = {s: len(v) for s, v in source.items.items()}
    print(
        f"{len(source.classes)} classes, {counts['train']:,} train and {counts['val']:,} val images → {dest}",
        file=sys.stderr,
    )

    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = _pool(workers)
    try:
        indexes = {split: prepare_split(source, dest, split, pool, chunk, show_progress) for split in SPLITS}
    finally:
        pool.terminate()
        pool.join()

    skipped_lines = [f"{split}\t{s['file']}\t{s['error']}" for split in SPLITS for s in indexes[split]["skipped"]]
    atomic_write(dest / "skipped.txt", "".join(line + "\n" for line in skipped_lines).encode())
    stats = load_stats(dest / "stats.safetensors")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name or source.root.resolve().name,
        "source": str(source.root.resolve()),
        "fingerprint": source.fingerprint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "image_size": IMAGE_SIZE,
        "preprocessing": "model.load_image: EXIF orientation, RGB, shorter side 256 (bilinear), centre 256×256",
        "classes": [{"wnid": c.wnid, "name": c.name} for c in source.classes],
        "splits": {s: {"images": len(indexes[s]["labels"]), "skipped": len(indexes[s]["skipped"])} for s in SPLITS},
        "stats": {
            "file": "stats.safetensors",
            "images": stats.images,
            "rgb_mean": (stats.mean_image.double().mean((1, 2))).tolist(),
            "eigenvalues": stats.eigenvalues.tolist(),
            "pixel_range": [0.0, 1.0],
        },
    }
    atomic_write(dest / "dataset.json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def prepare(
    src: str | Path,
    dest: str | Path,
    *,
    workers: int | None = None,
    val_labels: str | Path | None = None,
    name: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    show_progress: bool = True,
) -> dict:
    """Prepare SRC into DEST (see the module docstring); return the contents of DEST/dataset.json."""
    started = time.perf_counter()
    source = scan_source(src, val_labels)
    dest = Path(dest)
    if _check_destination(dest, source):
        meta = json.loads((dest / "dataset.json").read_text())
        print(f"{dest}: already prepared from this source; nothing to do", file=sys.stderr)
        return meta
    lock = DirectoryLock(dest, "`prepare`")  # creates DEST; held until dataset.json is written
    try:
        remove_stale_temporaries(dest)  # left by a writer that was killed (its .partial files are resumed)
        meta = _prepare_locked(source, dest, workers, name, chunk, show_progress)
    finally:
        lock.release()

    seconds = time.perf_counter() - started
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"{split}: {s['images']:,} images, {s['skipped']} skipped", file=sys.stderr)
    if meta["splits"]["train"]["skipped"] + meta["splits"]["val"]["skipped"]:
        print(f"skipped images are listed in {dest / 'skipped.txt'}", file=sys.stderr)
    eig = ", ".join(f"{v:.4g}" for v in meta["stats"]["eigenvalues"])
    print(f"RGB covariance eigenvalues ([0,1] pixels): {eig}; done in {seconds:.1f} s", file=sys.stderr)
    return meta
