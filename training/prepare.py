"""``python -m training prepare SRC DEST``: decode every image once into the prepared format (see data.py).

Source forms (found by looking at SRC; training/sources.py lists them and how their labels are read):
folders (train/<wnid>/, val/<wnid>/ or a flat val/ with labels), image-net.org's tars + devkit, Kaggle's
root, Hugging Face's tar.gz shards, WebDataset shards. Archives are read in place or streamed, never unpacked.

Each image goes through the shared preprocessing (``model.load_image``: decode, EXIF orientation, RGB,
shorter side 256, centre 256×256) in a pool of worker processes, tasks of TASK_IMAGES images each. A worker
also re-encodes each image as a JPEG for ``--store jpeg`` (``--quality``, 4:4:4 chroma), and sums its task's
statistics, so the main process adds one array per task. Raw images and that sum come back through memory
shared with the (forked) workers, not through the pipe. The main process appends the results to the
split's partial files (raw: ``DEST/.<split>.u8.partial``; jpeg: ``.<split>.jpg.partial`` with
``.<split>.offsets.partial`` and ``.<split>.crc32.partial``) through a writer thread and, every ``--chunk``
images, fsyncs them (in another thread, while it goes on) and atomically records how far it got (images,
data bytes, the running sums for the statistics) in
``DEST/.<split>.progress.safetensors``. A rerun after an interruption truncates every partial file to
the last record, consistently, and continues from there. Finished files appear by rename;
``dataset.json`` is written last.

Statistics (over every image of the training split, all 65,536 pixels each): the mean image, and the 3×3
covariance of RGB values with its eigenvectors and eigenvalues for the paper's PCA lighting. The sums
are accumulated exactly in int64, so the result does not depend on the number of workers or on resuming.
"""

from __future__ import annotations

import ctypes
import io
import json
import mmap
import multiprocessing
import os
import queue
import shutil
import signal
import struct
import sys
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import torch

import numpy as np

from model import ImageError, load_image, open_image
from model.files import atomic_write, read_safetensors, remove_stale_temporaries, write_safetensors

from .data import (
    FORMAT_NAME,
    IMAGE_BYTES,
    IMAGE_SIZE,
    READABLE_VERSIONS,
    SPLITS,
    STORES,
    format_version,
    load_stats,
    save_stats,
    stats_from_sums,
    store_files,
)
from .directory_lock import DirectoryLock
from .errors import TrainingError
from .progress import Progress
from .sources import IMAGE_EXTENSIONS, Source, is_image_name, scan_source  # noqa: F401 (re-exported)

DEFAULT_CHUNK = 512  # images between progress records: ~100 MB of output, a few seconds of work
DEFAULT_STORE = "raw"
DEFAULT_QUALITY = 90  # jpeg store: RMSE 2.9 levels, 1/8 of the raw bytes (BENCHMARKS.md, "Training")
JPEG_SUBSAMPLING = "4:4:4"  # no chroma subsampling: at the same size, less error than 4:2:0 at a higher quality
TASK_IMAGES = 8  # images per worker task: fewer round trips, and one statistics sum per task, not per image
TINY_SIDE = 32  # a source image with a shorter side below this is kept, and named in the summary


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


# 1. What is in SRC: training/sources.py (the forms, their listing and their labels).


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


_archives: dict[str, int] = {}  # in each worker: archive path → an open descriptor, for reads in place


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
    memory (see _share_slots), raw records and the sum image are put there and an offset into it is
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


def _share_slots(method: str) -> None:
    """Map the slots before the workers are forked (they inherit the mapping); not with spawn."""
    global _slots
    _slots = mmap.mmap(-1, 2 * WINDOW * SLOT_BYTES) if method in ("fork", "inline") else None


def _release_slots() -> None:
    """Drop the mapping; it is unmapped when the last view of it goes (closing it would fail while an
    exception's traceback still holds one)."""
    global _slots
    _slots = None


def _from_slot(view: memoryview | None, record):
    return view[record : record + IMAGE_BYTES] if isinstance(record, int) else record


class _Later:
    """The inline pool's result: computed when asked for, as a worker's would arrive in order."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def get(self):
        return self.fn(*self.args)


class _InlinePool:
    """``--workers 0``: decode in this process (for debugging and small tests)."""

    def apply_async(self, fn, args):
        return _Later(fn, args)

    def terminate(self):
        pass

    def join(self):
        pass


def _in_order(pool, fn, tasks, window: int):
    """``fn`` over ``tasks`` in the pool, results in order, at most ``window`` tasks in flight (Pool.imap
    would read every task up front: all of a .tar.gz's bytes)."""
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _streamed(locators: list, root: Path):
    """What a worker is given for each locator: a path, an in-place locator, or the bytes of a .tar.gz
    member, streamed in order (a resumed split reads past the members already done)."""
    stream = shard = None
    position = 0  # image members of ``shard`` read so far
    try:
        for locator in locators:
            if locator is None or locator[0] != "gz":
                yield locator
                continue
            _, wanted_shard, n = locator
            if wanted_shard != shard or n < position:
                if stream is not None:
                    stream.close()
                stream, shard, position = tarfile.open(wanted_shard, mode="r|gz"), wanted_shard, 0
            while (member := stream.next()) is not None:  # (iterating the TarFile again would start over)
                if member.isfile() and is_image_name(member.name):
                    position += 1
                    if position - 1 == n:
                        yield stream.extractfile(member).read()
                        break
            else:
                raise TrainingError(f"{shard}: ended before image {n + 1}; it changed since it was listed")
            stream.members.clear()  # a stream keeps every header it read: not 1.28 million of them
    finally:
        if stream is not None:
            stream.close()


def _prefetched(items, depth: int):
    """``items`` produced by a thread, up to ``depth`` ahead: gzip inflation lets go of the GIL, so it runs
    beside the main loop."""
    done = object()
    box: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            box.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            box.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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
        self.tiny: list[dict] = []  # {"file", "size"}: kept, but named in the summary (TINY_SIDE)
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
            record.tiny = json.loads(meta.get("tiny", "[]"))
            record.sum_image, record.sum_rgb, record.sum_outer = (
                tensors["sum_image"],
                tensors["sum_rgb"],
                tensors["sum_outer"],
            )
            return record
        except Exception:
            return None  # unreadable: start the split over (the partial file is rewritten from 0)

    def snapshot(self) -> _Progress:
        """A copy to save while the main loop goes on changing this one."""
        copy = _Progress(self.path, self.fingerprint, self.store)
        copy.done, copy.written, copy.data_bytes = self.done, self.written, self.data_bytes
        copy.skipped, copy.tiny = list(self.skipped), list(self.tiny)
        copy.sum_image, copy.sum_rgb = self.sum_image.clone(), self.sum_rgb.clone()
        copy.sum_outer = self.sum_outer.clone()
        return copy

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
            "tiny": json.dumps(self.tiny),
        }
        tensors = {"sum_image": self.sum_image, "sum_rgb": self.sum_rgb, "sum_outer": self.sum_outer}
        write_safetensors(self.path, tensors, meta)


class _Appender:
    """Appends to the partial files in a thread, in order: writing 196 KB into the page cache is the main
    loop's largest cost per image, and write() lets go of the GIL, so it overlaps the rest of the loop."""

    def __init__(self, outs):
        self.outs = outs
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self.completed = 0  # appends written (or dropped after an error)
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="prepare-append", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (pieces := self._queue.get()) is not None:
            try:
                if self._error is None:
                    for file, data in pieces:
                        self.outs[file].write(data)
            except BaseException as e:  # raised in the main thread by the next append() or drain()
                self._error = e
            finally:
                with self._progress:
                    self.completed += 1
                    self._progress.notify_all()
                self._queue.task_done()
        self._queue.task_done()

    def wait_for(self, appends: int) -> None:
        """Until the first ``appends`` appends are written."""
        with self._progress:
            self._progress.wait_for(lambda: self.completed >= appends)
        self._raise()

    def append(self, pieces: list[tuple[int, bytes]]) -> None:
        """Write ``pieces`` ((index into outs, bytes), ...) after everything appended before."""
        self._raise()
        self._queue.put(pieces)

    def drain(self) -> None:
        """Until everything appended so far is written."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _Recorder:
    """Makes the partial files durable and then saves the progress record, in a thread: the main loop goes
    on appending meanwhile (fsync writes ~100 MB a chunk; done inline it would hold the loop up). The record
    counts only bytes flushed before its fsync began, so it stays true; one record is in flight at a time."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def record(self, appender: _Appender, outs, progress: _Progress) -> None:
        self.wait()
        appender.drain()
        for out in outs:
            out.flush()
        descriptors, snapshot = [out.fileno() for out in outs], progress.snapshot()

        def durable():
            try:
                for descriptor in descriptors:
                    os.fsync(descriptor)
                snapshot.save()
            except BaseException as e:  # raised in the main thread by wait()
                self._error = e

        self._thread = threading.Thread(target=durable, name="prepare-fsync", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Until the record in flight is saved; raises what saving it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


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


def _tasks(source: Source, split: str, start: int, with_stats: bool, quality, per_task: int):
    """Lists of ``per_task`` decoding tasks, from item ``start`` on."""
    items = source.items[split]
    locators = source.locators.get(split) or [None] * len(items)
    given = (str(source.root / name) if at is None else at for (name, _), at in zip(items[start:], locators[start:]))
    if any(at is not None and at[0] == "gz" for at in locators[start : start + 1]):
        given = _prefetched(_streamed(locators[start:], source.root), depth=256)
    task: list[tuple] = []
    for payload in given:
        task.append((payload, with_stats, quality))
        if len(task) == per_task:
            yield task
            task = []
    if task:
        yield task


def _jobs(tasks, appender: _Appender):
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
    recorder, appender = _Recorder(), None
    try:
        for out, size in zip(outs, sizes):
            out.truncate(size)  # drop whatever followed the last record (jpeg: a new file gets offsets[0] = 0)
            out.seek(size)
        per_task = min(TASK_IMAGES, chunk)  # a progress record falls between tasks: every ≥ chunk images
        tasks = _tasks(source, split, record.done, with_stats, store.quality, per_task)
        bar = Progress(len(items), f"prepare {split}", enabled=show_progress)
        bar.done = record.done
        since_record = 0
        appender = _Appender(outs)
        view = None if _slots is None else memoryview(_slots)
        for results, sums in _in_order(pool, _decode_task, _jobs(tasks, appender), window=WINDOW):
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
    print(f"{source.root}: {source.describe()}", file=sys.stderr)
    print(f"→ {dest} ({store.describe()})", file=sys.stderr)

    workers = (os.cpu_count() or 1) if workers is None else workers
    _share_slots("inline" if workers <= 0 else "fork" if sys.platform == "linux" else "spawn")
    pool = _pool(workers)
    try:
        indexes = {split: prepare_split(source, dest, split, pool, chunk, show_progress, store) for split in SPLITS}
    finally:
        pool.terminate()
        pool.join()
        _release_slots()
        while _archives:  # opened here by --workers 0
            os.close(_archives.popitem()[1])

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
        "source_form": source.form,
        "val_labels_from": source.val_labels_from,
        "classes_sha256": source.classes_sha256,
        "fingerprint": source.fingerprint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "image_size": IMAGE_SIZE,
        "preprocessing": "model.load_image: EXIF orientation, RGB, shorter side 256 (bilinear), centre 256×256",
        "classes": [{"wnid": c.wnid, "name": c.name} for c in source.classes],
        "splits": {s: {"images": len(indexes[s]["labels"]), "skipped": len(indexes[s]["skipped"])} for s in SPLITS},
        "tiny_images": {s: len(indexes[s].get("tiny", [])) for s in SPLITS},  # kept, named in <split>.json
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
    threads = torch.get_num_threads()
    # The main loop only appends and adds: torch's thread pool would cost more than it saves (idle OpenMP
    # threads spin), and the workers need the cores.
    torch.set_num_threads(1)
    try:
        remove_stale_temporaries(dest)  # left by a writer that was killed (its .partial files are resumed)
        meta = _prepare_locked(source, dest, workers, name, chunk, show_progress, kind)
    finally:
        torch.set_num_threads(threads)
        lock.release()

    seconds = time.perf_counter() - started
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"{split}: {s['images']:,} images, {s['skipped']} skipped", file=sys.stderr)
        tiny = json.loads((dest / f"{split}.json").read_text()).get("tiny", [])
        if tiny:
            named = ", ".join(f"{t['file']} ({t['size'][0]}×{t['size'][1]})" for t in tiny[:5])
            more = f" and {len(tiny) - 5} more" if len(tiny) > 5 else ""
            print(
                f"{split}: {len(tiny)} tiny source images (shorter side under {TINY_SIDE} px), kept, enlarged to "
                f"{IMAGE_SIZE} px: {named}{more}",
                file=sys.stderr,
            )
    if meta["splits"]["train"]["skipped"] + meta["splits"]["val"]["skipped"]:
        print(f"skipped images are listed in {dest / 'skipped.txt'}", file=sys.stderr)
    eig = ", ".join(f"{v:.4g}" for v in meta["stats"]["eigenvalues"])
    print(f"RGB covariance eigenvalues ([0,1] pixels): {eig}; done in {seconds:.1f} s", file=sys.stderr)
    return meta
