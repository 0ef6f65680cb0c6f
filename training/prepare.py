"""``python -m training prepare SRC DEST``: decode every image once into the prepared format.

The source's form is found by looking at SRC (training/sources.py); archives are read in place, never unpacked.
Each split is written by prepare_split.py, resumably; ``dataset.json`` is written last.
The statistics (mean image, RGB covariance and its eigen-decomposition) are summed exactly in int64.
So they depend neither on the number of workers nor on resuming. docs/training-formats.md has the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from model.decode_pool import DecodePool
from model.files import atomic_write, remove_stale_temporaries

from .data import (
    FORMAT_NAME,
    IMAGE_SIZE,
    READABLE_VERSIONS,
    SPLITS,
    STORES,
    format_version,
    load_stats,
    store_files,
)
from .directory_lock import DirectoryLock
from .errors import TrainingError
from .prepare_split import (
    TINY_SIDE,
    close_archives,
    index_store,
    prepare_split,
    release_slots,
    share_slots,
    split_complete,
)
from .resume_record import ResumeRecord
from .sources import Source, scan_source
from .store import DEFAULT_STORE, JPEG_SUBSAMPLING, Store

DEFAULT_CHUNK = 512  # images between progress records: ~100 MB of output, a few seconds of work


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
        held = ResumeRecord.saved_store(dest / f".{split}.progress.safetensors", source.fingerprint)
        try:
            index = json.loads((dest / f"{split}.json").read_text())
            if index.get("fingerprint") == source.fingerprint:
                held = held or index_store(index)
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
        if split_complete(dest, split, source.fingerprint, store) is None:
            record = ResumeRecord.load(dest / f".{split}.progress.safetensors", source.fingerprint, store)
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
    share_slots(DecodePool.method_for(workers))  # before the workers are forked: they inherit the mapping
    pool = DecodePool(workers)
    try:
        indexes = {split: prepare_split(source, dest, split, pool, chunk, show_progress, store) for split in SPLITS}
    finally:
        pool.close()
        release_slots()
        close_archives()  # opened here by --workers 0

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
