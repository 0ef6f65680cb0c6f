"""``python -m training prepare SRC DEST``: decode every image once into the prepared format (see data.py).

Source layouts:
    SRC/train/<wnid>/*.JPEG                            one folder per class (class index = sorted wnid order)
    SRC/val/<wnid>/*.JPEG                              the same, or:
    SRC/val/*.JPEG + a ground-truth file               lines "<file> <class index>" (Caffe's val.txt);
                                                       --val-labels, default SRC/val.txt

Each image goes through the shared preprocessing (``model.load_image``: decode, EXIF orientation, RGB,
shorter side 256, centre 256×256) in a pool of worker processes, which for ``--store jpeg`` also
re-encode it as a JPEG (``--quality``, 4:4:4 chroma). The main process appends the results to the
split's partial files (raw: ``DEST/.<split>.u8.partial``; jpeg: ``.<split>.jpg.partial`` with
``.<split>.offsets.partial`` and ``.<split>.crc32.partial``) and, every ``--chunk`` images, fsyncs them and
atomically records how far it got (images, data bytes, the running sums for the statistics) in
``DEST/.<split>.progress.safetensors``. A rerun after an interruption truncates every partial file to
the last record, consistently, and continues from there. Finished files appear by rename;
``dataset.json`` is written last.

Statistics (over every image of the training split, all 65,536 pixels each): the mean image, and the 3×3
covariance of RGB values with its eigenvectors and eigenvalues for the paper's PCA lighting. The sums
are accumulated exactly in int64, so the result does not depend on the number of workers or on resuming.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import torch

from model import ImageClass, ImageError, imagenet_classes, load_image
from model.files import atomic_write, read_safetensors, remove_stale_temporaries, write_safetensors

from .data import (
    FORMAT_NAME,
    IMAGE_BYTES,
    IMAGE_SIZE,
    READABLE_VERSIONS,
    SPLITS,
    STORES,
    DirectoryLock,
    TrainingError,
    format_version,
    load_stats,
    save_stats,
    stats_from_sums,
    store_files,
)
from .progress import Progress

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_CHUNK = 512  # images between progress records: ~100 MB of output, a few seconds of work
DEFAULT_STORE = "raw"
DEFAULT_QUALITY = 90  # jpeg store: RMSE 2.9 levels, 1/8 of the raw bytes (BENCHMARKS.md, "Training")
JPEG_SUBSAMPLING = "4:4:4"  # no chroma subsampling: at the same size, less error than 4:2:0 at a higher quality


def jpeg_bytes_estimate(quality: int) -> int:
    """A generous estimate of a 256×256 JPEG record's size (~1.6× the mean measured on ImageNet photos),
    for the disk space check."""
    return IMAGE_BYTES * (20 if quality <= 90 else 30 if quality <= 95 else 50) // 100 + 12


@dataclass(frozen=True)
class Store:
    """How the images are stored: "raw" (quality None) or "jpeg" at a quality 1..100."""

    kind: str = DEFAULT_STORE
    quality: int | None = None

    @classmethod
    def make(cls, kind: str = DEFAULT_STORE, quality: int | None = None) -> Store:
        if kind not in STORES:
            raise TrainingError(f"--store must be one of {', '.join(STORES)}, not {kind!r}")
        if kind == "raw":
            return cls("raw", None)
        quality = DEFAULT_QUALITY if quality is None else quality
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise TrainingError(f"--quality must be an integer from 1 to 100, not {quality!r}")
        return cls("jpeg", quality)

    def describe(self) -> str:
        return "raw" if self.kind == "raw" else f"jpeg (quality {self.quality})"

    def files(self, split: str) -> tuple[str, ...]:
        return store_files(self.kind, split)

    def sizes(self, written: int, data_bytes: int) -> tuple[int, ...]:
        """The expected sizes of ``files(split)`` after ``written`` images of ``data_bytes`` bytes."""
        if self.kind == "raw":
            return (data_bytes,)
        return (data_bytes, (written + 1) * 8, written * 4)

    def estimate(self, images: int) -> int:
        return images * (IMAGE_BYTES if self.kind == "raw" else jpeg_bytes_estimate(self.quality))


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


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """uint8 [3, 256, 256] → one baseline JPEG of the jpeg store (4:4:4 chroma, deterministic)."""
    from PIL import Image

    hwc = image.permute(1, 2, 0).contiguous()
    pil = Image.frombuffer("RGB", (hwc.shape[1], hwc.shape[0]), ctypes.string_at(hwc.data_ptr(), hwc.numel()), "raw")
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return out.getvalue()


def _decode(task: tuple):
    """(path, with_stats[, quality]) → (record, uint8 pixel bytes [3,256,256] when with_stats, per-image
    RGB sums or None, error or None). The record is what the store appends: the pixel bytes (raw), or their
    JPEG (quality given). Statistics are of the pixels before compression. Never raises."""
    path, with_stats = task[:2]
    quality = task[2] if len(task) > 2 else None
    try:
        image = load_image(Path(path).read_bytes(), size=IMAGE_SIZE)
    except ImageError as e:
        return None, None, None, f"{type(e).__name__}: {e}"
    except OSError as e:
        return None, None, None, f"cannot read: {e.strerror or e}"
    except Exception as e:  # a decoder bug must not stop a day-long job; the file is listed as skipped
        return None, None, None, f"{type(e).__name__}: {e}"
    image = image.contiguous()
    data = ctypes.string_at(image.data_ptr(), IMAGE_BYTES)  # the tensor's bytes (no numpy needed)
    try:
        record = data if quality is None else encode_jpeg(image, quality)
    except Exception as e:
        return None, None, None, f"cannot encode as JPEG: {type(e).__name__}: {e}"
    sums = None
    if with_stats:
        # Exact in float64: every product is at most 255², and a sum over 65,536 pixels stays below 2^53.
        pixels = image.reshape(3, -1).double()
        sums = (pixels.sum(1).long().tolist(), (pixels @ pixels.T).long().tolist())
    return record, data if with_stats else None, sums, None  # (pickled once when record is data)


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

    def __init__(self, path: Path, fingerprint: str, store: Store):
        self.path, self.fingerprint, self.store = path, fingerprint, store
        self.done = 0  # source items consumed
        self.written = 0  # images in the partial files
        self.data_bytes = 0  # bytes in the partial data file
        self.skipped: list[dict] = []  # {"file", "error"}
        self.sum_image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.int64)
        self.sum_rgb = torch.zeros(3, dtype=torch.int64)
        self.sum_outer = torch.zeros(3, 3, dtype=torch.int64)

    @staticmethod
    def saved_store(path: Path, fingerprint: str) -> Store | None:
        """The store a saved record of this source was written for (None: no readable record of it)."""
        if not path.exists():
            return None
        try:
            meta, _ = read_safetensors(path)
            if meta.get("fingerprint") != fingerprint:
                return None
            quality = meta.get("quality")
            return Store(meta.get("store", "raw"), int(quality) if quality else None)
        except Exception:
            return None

    @classmethod
    def load(cls, path: Path, fingerprint: str, store: Store) -> _Progress | None:
        """The saved record, or None when there is none or it belongs to another source, version or store."""
        if not path.exists():
            return None
        try:
            meta, tensors = read_safetensors(path)
            if (
                meta.get("format_version") != str(format_version(store.kind))
                or meta.get("fingerprint") != fingerprint
                or cls.saved_store(path, fingerprint) != store
            ):
                return None
            record = cls(path, fingerprint, store)
            record.done, record.written = int(meta["done"]), int(meta["written"])
            record.data_bytes = int(meta.get("data_bytes", record.written * IMAGE_BYTES))
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
            "format_version": str(format_version(self.store.kind)),
            "fingerprint": self.fingerprint,
            "store": self.store.kind,
            "quality": str(self.store.quality or ""),
            "done": str(self.done),
            "written": str(self.written),
            "data_bytes": str(self.data_bytes),
            "skipped": json.dumps(self.skipped),
        }
        tensors = {"sum_image": self.sum_image, "sum_rgb": self.sum_rgb, "sum_outer": self.sum_outer}
        write_safetensors(self.path, tensors, meta)


def _index_store(index: dict) -> Store:
    return Store(index.get("store", "raw"), index.get("quality"))


def _split_complete(dest: Path, split: str, fingerprint: str, store: Store) -> dict | None:
    """The split's index when it was finished for this source and store, else None."""
    try:
        index = json.loads((dest / f"{split}.json").read_text())
    except (OSError, ValueError):
        return None
    if index.get("fingerprint") != fingerprint or _index_store(index) != store:
        return None
    count = len(index["labels"])
    expected = store.sizes(count, index.get("data_bytes", count * IMAGE_BYTES))
    for name, size in zip(store.files(split), expected):
        path = dest / name
        if not path.exists() or path.stat().st_size != size:
            return None
    return index


def prepare_split(
    source: Source, dest: Path, split: str, pool, chunk: int, show_progress: bool = True, store: Store = Store()
) -> dict:
    """Decode one split into its store's files (DEST/<split>.u8, or .jpg/.offsets/.crc32) + DEST/<split>.json;
    return its index."""
    fingerprint = source.fingerprint
    done_index = _split_complete(dest, split, fingerprint, store)
    if done_index is not None:
        print(f"{split}: already prepared ({len(done_index['labels']):,} images)", file=sys.stderr)
        return done_index

    items = source.items[split]
    finals = [dest / name for name in store.files(split)]  # the data file first
    partials = [dest / f".{name}.partial" for name in store.files(split)]
    record_path = dest / f".{split}.progress.safetensors"
    record = _Progress.load(record_path, fingerprint, store)
    if record is None:
        record = _Progress(record_path, fingerprint, store)
    elif record.done:
        print(f"{split}: continuing after {record.done:,} of {len(items):,} images", file=sys.stderr)
    with_stats = split == "train"

    sizes = store.sizes(record.written, record.data_bytes)
    if record.done == len(items) and _renamed(partials, finals, sizes):
        for partial, final in zip(partials, finals):  # interrupted after (some of) the renames: finish them
            if partial.exists():
                os.replace(partial, final)
    else:
        if record.written and not _partials_usable(partials, sizes, store, record):
            record = _Progress(record_path, fingerprint, store)  # nothing usable on disk: start the split over
        _decode_into(source, items, partials, record, pool, chunk, with_stats, split, show_progress)
        if with_stats:
            stats = stats_from_sums(record.sum_image, record.sum_rgb, record.sum_outer, record.written)
            save_stats(dest / "stats.safetensors", stats)
        for partial, final in zip(partials, finals):  # the complete files appear at once, the data file first
            os.replace(partial, final)

    skipped_items = {s["item"] for s in record.skipped}
    kept = [item for i, item in enumerate(items) if i not in skipped_items]
    index = {
        "format": FORMAT_NAME,
        "format_version": format_version(store.kind),
        "fingerprint": fingerprint,
        "split": split,
        "files": [path for path, _ in kept],
        "labels": [label for _, label in kept],
        "skipped": [{"file": s["file"], "error": s["error"]} for s in record.skipped],
    }
    if store.kind != "raw":
        index.update(store=store.kind, quality=store.quality, data_bytes=record.data_bytes)
    atomic_write(dest / f"{split}.json", json.dumps(index).encode())
    record_path.unlink(missing_ok=True)
    return index


def _renamed(partials: list[Path], finals: list[Path], sizes) -> bool:
    """The renames of a finished split began (its data file is in place) and every file has its size."""
    if partials[0].exists() or not finals[0].exists():
        return False
    present = [p if p.exists() else f for p, f in zip(partials, finals)]
    return all(path.exists() and path.stat().st_size == size for path, size in zip(present, sizes))


def _partials_usable(partials: list[Path], sizes, store: Store, record: _Progress) -> bool:
    """Every partial file holds at least what the record says, and (jpeg) the offsets agree with it."""
    if any(not p.exists() or p.stat().st_size < n for p, n in zip(partials, sizes)):
        return False
    if store.kind == "jpeg":
        with open(partials[1], "rb") as f:
            f.seek(record.written * 8)
            (last,) = struct.unpack("<q", f.read(8))
        return last == record.data_bytes
    return True


def _decode_into(source, items, partials, record, pool, chunk, with_stats, split, show_progress) -> None:
    store = record.store
    jpeg = store.kind == "jpeg"
    sizes = store.sizes(record.written, record.data_bytes)
    outs = [open(path, "ab") for path in partials]
    try:
        for out, size in zip(outs, sizes):
            out.truncate(size)  # drop whatever followed the last record (jpeg: a new file gets offsets[0] = 0)
            out.seek(size)
        data_out = outs[0]
        tasks = [(str(source.root / path), with_stats, store.quality) for path, _ in items[record.done :]]
        bar = Progress(len(items), f"prepare {split}", enabled=show_progress)
        bar.done = record.done
        since_record = 0
        for data, pixels, sums, error in pool.imap(_decode, tasks, chunksize=4):
            if error is None:
                data_out.write(data)
                record.written += 1
                record.data_bytes += len(data)
                if jpeg:
                    outs[1].write(struct.pack("<q", record.data_bytes))
                    outs[2].write(struct.pack("<I", zlib.crc32(data)))
                if with_stats:
                    record.sum_image += torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(
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
                for out in outs:
                    out.flush()
                    os.fsync(out.fileno())
                record.save()
                since_record = 0
        bar.close()
    finally:
        for out in outs:
            out.close()
    if record.written == 0:
        raise TrainingError(f"{source.root / split}: none of the {len(items):,} images could be decoded")


# 4. The command.


def _check_destination(dest: Path, source: Source, store: Store = Store()) -> bool:
    """True when DEST already holds this exact dataset in this store. Raises when DEST holds something else."""
    meta_path = dest / "dataset.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise TrainingError(f"{meta_path}: unreadable; choose another DEST") from None
        if meta.get("format") != FORMAT_NAME:
            raise TrainingError(f"{dest}: holds a dataset.json that `prepare` did not write; choose another DEST")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise TrainingError(
                f"{dest} holds a dataset prepared in format version {meta.get('format_version')} (this code writes "
                f"{', '.join(map(str, READABLE_VERSIONS))}); delete it or choose another DEST"
            )
        if meta.get("fingerprint") != source.fingerprint:
            raise TrainingError(
                f"{dest} already holds a prepared dataset from another source ({meta.get('source')}); "
                "choose another DEST"
            )
        held = Store(meta.get("store", "raw"), meta.get("quality"))
        if held != store:
            raise TrainingError(
                f"{dest} already holds this dataset as a {held.describe()} store, not {store.describe()}; "
                "choose another DEST"
            )
        return True
    for split in SPLITS:  # a partial preparation must be continued in the store it was started in
        held = _Progress.saved_store(dest / f".{split}.progress.safetensors", source.fingerprint)
        try:
            index = json.loads((dest / f"{split}.json").read_text())
            if index.get("fingerprint") == source.fingerprint:
                held = held or _index_store(index)
        except (OSError, ValueError, AttributeError):
            pass
        if held is not None and held != store:
            flags = "--store raw" if held.kind == "raw" else f"--store jpeg --quality {held.quality}"
            raise TrainingError(
                f"{dest} holds an unfinished {held.describe()} preparation, not {store.describe()}: rerun with "
                f"{flags} to continue it, or choose another DEST"
            )
    ours = {name for split in SPLITS for kind in STORES for name in store_files(kind, split)}
    ours |= {"train.json", "val.json", "stats.safetensors", "skipped.txt"}
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


def _check_disk_space(dest: Path, source: Source, store: Store = Store()) -> None:
    needed = 0
    for split in SPLITS:
        if _split_complete(dest, split, source.fingerprint, store) is None:
            record = _Progress.load(dest / f".{split}.progress.safetensors", source.fingerprint, store)
            needed += store.estimate(len(source.items[split]) - (record.written if record else 0))
    free = shutil.disk_usage(dest).free
    if needed > free:
        about = "" if store.kind == "raw" else "about "
        raise TrainingError(
            f"not enough disk space in {dest}: the prepared images need {about}{needed / 1e9:,.2f} GB "
            f"({store.describe()}), {free / 1e9:,.2f} GB are free"
        )


def _prepare_locked(source: Source, dest: Path, workers, name, chunk, show_progress, store: Store) -> dict:
    _check_disk_space(dest, source, store)
    counts = {s: len(v) for s, v in source.items.items()}
    print(
        f"{len(source.classes)} classes, {counts['train']:,} train and {counts['val']:,} val images → {dest} "
        f"({store.describe()})",
        file=sys.stderr,
    )

    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = _pool(workers)
    try:
        indexes = {split: prepare_split(source, dest, split, pool, chunk, show_progress, store) for split in SPLITS}
    finally:
        pool.terminate()
        pool.join()

    skipped_lines = [f"{split}\t{s['file']}\t{s['error']}" for split in SPLITS for s in indexes[split]["skipped"]]
    atomic_write(dest / "skipped.txt", "".join(line + "\n" for line in skipped_lines).encode())
    stats = load_stats(dest / "stats.safetensors")
    meta = {
        "format": FORMAT_NAME,
        "format_version": format_version(store.kind),
        "store": store.kind,
        "quality": store.quality,
        **({"chroma_subsampling": JPEG_SUBSAMPLING} if store.kind == "jpeg" else {}),
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
    store: str = DEFAULT_STORE,
    quality: int | None = None,
) -> dict:
    """Prepare SRC into DEST (see the module docstring); return the contents of DEST/dataset.json.
    ``store``: "raw" (uint8 arrays) or "jpeg" (re-encoded at ``quality``, default DEFAULT_QUALITY)."""
    started = time.perf_counter()
    kind = Store.make(store, quality)
    source = scan_source(src, val_labels)
    dest = Path(dest)
    if _check_destination(dest, source, kind):
        meta = json.loads((dest / "dataset.json").read_text())
        print(f"{dest}: already prepared from this source; nothing to do", file=sys.stderr)
        return meta
    lock = DirectoryLock(dest, "`prepare`")  # creates DEST; held until dataset.json is written
    try:
        remove_stale_temporaries(dest)  # left by a writer that was killed (its .partial files are resumed)
        meta = _prepare_locked(source, dest, workers, name, chunk, show_progress, kind)
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
