"""Writing one split of ``prepare``: the worker processes decode, the main process appends, resumably.

Each worker decodes TASK_IMAGES images through the shared preprocessing and sums their statistics.
Raw images and the sums come back through memory shared with the forked workers, not the pipe.
The main process appends the results to the split's partial files and records its progress.
A rerun truncates the partial files to the last record and continues; finished files appear by rename.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from model import ImageError, load_image, open_image
from model.files import atomic_write
from model.progress import Progress

from .archives import prefetched, streamed
from .data import (
    FORMAT_NAME,
    IMAGE_BYTES,
    IMAGE_SIZE,
    format_version,
    save_stats,
    stats_from_sums,
)
from .errors import TrainingError
from .resume_record import Appender, Recorder, ResumeRecord
from .sources import Source
from .store import Store, encode_jpeg

TASK_IMAGES = 8  # images per worker task: fewer round trips, and one statistics sum per task, not per image


TINY_SIDE = 32  # a source image with a shorter side below this is kept, and named in the summary


_archives: dict[str, int] = {}  # in each worker: archive path → an open descriptor, for reads in place


def close_archives() -> None:
    """Close the archives this process opened (the main process, when it decoded without workers)."""
    while _archives:
        os.close(_archives.popitem()[1])


def _read(locator) -> bytes:
    """An item's bytes: ``locator`` is a file path, ("at", archive, offset, size) (read in place), or the
    bytes themselves (streamed out of a .tar.gz by the main process)."""
    if isinstance(locator, (bytes, bytearray)):
        return locator
    if isinstance(locator, str):
        return Path(locator).read_bytes()
    _, archive, offset, size = locator
    descriptor = _archives.get(archive)
    if descriptor is None:
        descriptor = _archives[archive] = os.open(archive, os.O_RDONLY)
    data = os.pread(descriptor, size, offset)
    if len(data) != size:
        raise OSError(f"{archive} ends at {offset + len(data):,}, inside this member (truncated archive?)")
    return data


def _decode(task: tuple):
    """(locator, with_stats[, quality]) → (record, uint8 image [3,256,256] when with_stats, the source's
    (width, height), error or None). The record is what the store appends: the pixel bytes (raw), or their
    JPEG (quality given). Statistics are of the pixels before compression. Never raises."""
    locator, with_stats = task[:2]
    quality = task[2] if len(task) > 2 else None
    try:
        opened = open_image(_read(locator))
        size = opened.size
        image = load_image(opened, size=IMAGE_SIZE)
    except ImageError as e:
        return None, None, None, f"{type(e).__name__}: {e}"
    except OSError as e:
        return None, None, None, f"cannot read: {e.strerror or e}"
    except Exception as e:  # a decoder bug must not stop a day-long job; the file is listed as skipped
        return None, None, None, f"{type(e).__name__}: {e}"
    image = image.contiguous()
    try:
        record = ctypes.string_at(image.data_ptr(), IMAGE_BYTES) if quality is None else encode_jpeg(image, quality)
    except Exception as e:
        return None, None, None, f"cannot encode as JPEG: {type(e).__name__}: {e}"
    return record, image if with_stats else None, size, None


def _decode_task(job: tuple):
    """Decode a few images: ``job`` = (slot or None, [task, ...]). Return [(record, source size, error)]
    and, for the training split, their statistics summed here so the main process adds one array per
    task: (sum image (uint16), RGB sums, RGB outer-product sums), or None. With a slot of the shared
    memory (see share_slots), raw records and the sum image are put there and an offset into it is
    returned in their place: nothing big goes through the pipe."""
    slot, tasks = job
    base = None if slot is None or _slots is None else slot * SLOT_BYTES
    results, sums = [], None
    for i, task in enumerate(tasks):
        record, image, size, error = _decode(task)
        if base is not None and isinstance(record, bytes) and len(record) == IMAGE_BYTES and task[2] is None:
            _slots[base + i * IMAGE_BYTES : base + (i + 1) * IMAGE_BYTES] = record
            record = base + i * IMAGE_BYTES
        results.append((record, size, error))
        if image is None:
            continue
        if sums is None:  # uint16: TASK_IMAGES × 255 fits
            if base is None:
                total = np.zeros(IMAGE_BYTES, np.uint16)
            else:
                total = np.frombuffer(_slots, np.uint16, IMAGE_BYTES, base + TASK_IMAGES * IMAGE_BYTES)
                total[:] = 0
            sums = (total, np.zeros(3, np.int64), np.zeros((3, 3), np.int64))
        np.add(sums[0], image.numpy().reshape(-1), out=sums[0])
        # Exact in float64: every product is at most 255², and a sum over 65,536 pixels stays below 2^53.
        pixels = image.reshape(3, -1).double()
        sums[1][:] += pixels.sum(1).long().numpy()
        sums[2][:] += (pixels @ pixels.T).long().numpy()
    if sums is None:
        return results, None
    total = sums[0].tobytes() if base is None else base + TASK_IMAGES * IMAGE_BYTES
    return results, (total, sums[1], sums[2])


# Results too big for the pipe go through memory shared with the workers: a slot per task in flight
# (twice the window, so a slot is reused only once the writer thread has written what it held).
WINDOW = 4 * (os.cpu_count() or 1)  # tasks in flight


SLOT_BYTES = (TASK_IMAGES + 2) * IMAGE_BYTES  # a task's raw images, then its uint16 sum image


_slots: mmap.mmap | None = None


def share_slots(method: str) -> None:
    """Map the slots before the workers are forked (they inherit the mapping); not with spawn."""
    global _slots
    _slots = mmap.mmap(-1, 2 * WINDOW * SLOT_BYTES) if method in ("fork", "inline") else None


def release_slots() -> None:
    """Drop the mapping; it is unmapped when the last view of it goes (closing it would fail while an
    exception's traceback still holds one)."""
    global _slots
    _slots = None


def _from_slot(view: memoryview | None, record):
    return view[record : record + IMAGE_BYTES] if isinstance(record, int) else record


def index_store(index: dict) -> Store:
    return Store(index.get("store", "raw"), index.get("quality"))


def split_complete(dest: Path, split: str, fingerprint: str, store: Store) -> dict | None:
    """The split's index when it was finished for this source and store, else None."""
    try:
        index = json.loads((dest / f"{split}.json").read_text())
    except (OSError, ValueError):
        return None
    if index.get("fingerprint") != fingerprint or index_store(index) != store:
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
    done_index = split_complete(dest, split, fingerprint, store)
    if done_index is not None:
        print(f"{split}: already prepared ({len(done_index['labels']):,} images)", file=sys.stderr)
        return done_index

    items = source.items[split]
    finals = [dest / name for name in store.files(split)]  # the data file first
    partials = [dest / f".{name}.partial" for name in store.files(split)]
    record_path = dest / f".{split}.progress.safetensors"
    record = ResumeRecord.load(record_path, fingerprint, store)
    if record is None:
        record = ResumeRecord(record_path, fingerprint, store)
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
            record = ResumeRecord(record_path, fingerprint, store)  # nothing usable on disk: start the split over
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
        "tiny": record.tiny,
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


def _partials_usable(partials: list[Path], sizes, store: Store, record: ResumeRecord) -> bool:
    """Every partial file holds at least what the record says, and (jpeg) the offsets agree with it."""
    if any(not p.exists() or p.stat().st_size < n for p, n in zip(partials, sizes)):
        return False
    if store.kind == "jpeg":
        with open(partials[1], "rb") as f:
            f.seek(record.written * 8)
            (last,) = struct.unpack("<q", f.read(8))
        return last == record.data_bytes
    return True


def _tasks(source: Source, split: str, start: int, with_stats: bool, quality, per_task: int):
    """Lists of ``per_task`` decoding tasks, from item ``start`` on."""
    items = source.items[split]
    locators = source.locators.get(split) or [None] * len(items)
    given = (str(source.root / name) if at is None else at for (name, _), at in zip(items[start:], locators[start:]))
    if any(at is not None and at[0] == "gz" for at in locators[start : start + 1]):
        given = prefetched(streamed(locators[start:], source.root), depth=256)
    task: list[tuple] = []
    for payload in given:
        task.append((payload, with_stats, quality))
        if len(task) == per_task:
            yield task
            task = []
    if task:
        yield task


def _jobs(tasks, appender: Appender):
    """(slot, task) for each task; a slot is handed out again only once its earlier task's records are
    written (the writer thread reads them out of the slot)."""
    slots = 2 * WINDOW
    for i, task in enumerate(tasks):
        if _slots is None:
            yield None, task
            continue
        if i >= slots:
            appender.wait_for(i - slots + 1)
        yield i % slots, task


def _decode_into(source, items, partials, record, pool, chunk, with_stats, split, show_progress) -> None:
    store = record.store
    jpeg = store.kind == "jpeg"
    sizes = store.sizes(record.written, record.data_bytes)
    outs = [open(path, "ab") for path in partials]
    sum_image = record.sum_image.numpy()  # the same memory: numpy adds the uint16 task sums in one pass
    recorder, appender = Recorder(), None
    try:
        for out, size in zip(outs, sizes):
            out.truncate(size)  # drop whatever followed the last record (jpeg: a new file gets offsets[0] = 0)
            out.seek(size)
        per_task = min(TASK_IMAGES, chunk)  # a progress record falls between tasks: every ≥ chunk images
        tasks = _tasks(source, split, record.done, with_stats, store.quality, per_task)
        bar = Progress(len(items), f"prepare {split}", enabled=show_progress)
        bar.done = record.done
        since_record = 0
        appender = Appender(outs)
        view = None if _slots is None else memoryview(_slots)
        for results, sums in pool.in_order(_decode_task, _jobs(tasks, appender), window=WINDOW):
            pieces = []
            for data, size, error in results:
                if error is None:
                    data = _from_slot(view, data)
                    pieces.append((0, data))
                    record.written += 1
                    record.data_bytes += len(data)
                    if jpeg:
                        pieces.append((1, struct.pack("<q", record.data_bytes)))
                        pieces.append((2, struct.pack("<I", zlib.crc32(data))))
                    if min(size) < TINY_SIDE:
                        record.tiny.append({"file": items[record.done][0], "size": list(size)})
                else:
                    record.skipped.append({"item": record.done, "file": items[record.done][0], "error": error})
                record.done += 1
            appender.append(pieces)
            if sums is not None:
                total = sums[0]  # an offset into the shared slots, or the bytes themselves
                if isinstance(total, int):
                    total = np.frombuffer(_slots, np.uint16, IMAGE_BYTES, total)
                else:
                    total = np.frombuffer(total, np.uint16)
                np.add(sum_image.reshape(-1), total, out=sum_image.reshape(-1))
                record.sum_rgb += torch.from_numpy(sums[1])
                record.sum_outer += torch.from_numpy(sums[2])
            since_record += len(results)
            bar.update(len(results), skipped=len(record.skipped))
            if since_record >= chunk or record.done == len(items):
                recorder.record(appender, outs, record)
                since_record = 0
        bar.close()
    finally:
        try:
            if appender is not None:
                appender.close()
            recorder.wait()
        finally:
            for out in outs:
                out.close()
    if record.written == 0:
        raise TrainingError(f"{source.root / split}: none of the {len(items):,} images could be decoded")
