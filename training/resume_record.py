"""A split's partial files, appended by a thread and fsynced by another, and the record of how far they got.

The resume record (``DEST/.<split>.progress.safetensors``) lets a rerun continue an interrupted ``prepare``.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import torch

from model.files import read_safetensors, write_safetensors

from .data import (
    IMAGE_BYTES,
    IMAGE_SIZE,
    format_version,
)
from .store import Store


class ResumeRecord:
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
    def load(cls, path: Path, fingerprint: str, store: Store) -> ResumeRecord | None:
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

    def snapshot(self) -> ResumeRecord:
        """A copy to save while the main loop goes on changing this one."""
        copy = ResumeRecord(self.path, self.fingerprint, self.store)
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


class Appender:
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


class Recorder:
    """Makes the partial files durable and then saves the progress record, in a thread: the main loop goes
    on appending meanwhile (fsync writes ~100 MB a chunk; done inline it would hold the loop up). The record
    counts only bytes flushed before its fsync began, so it stays true; one record is in flight at a time."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def record(self, appender: Appender, outs, progress: ResumeRecord) -> None:
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
