"""The prepared dataset on disk, read back memory-mapped, and the order in which training visits it.

Layout that ``prepare`` writes (format version 1):

    DEST/dataset.json        format, version, classes, image size, splits, source — written last: its
                             presence means the directory is complete
    DEST/train.u8            uint8 [N, 3, 256, 256], C order, no header (RGB, the shared preprocessing's
    DEST/val.u8              shorter side 256 + centre crop); read with mmap, so random access is a copy
    DEST/train.json          per split: files, labels (class index), skipped files with the reason
    DEST/val.json
    DEST/stats.safetensors   mean image, RGB covariance and its eigen-decomposition (over train)
    DEST/skipped.txt         every image that could not be decoded: split, file, reason

One raw array per split: reading a random image is one 196,608-byte copy out of the page cache (or one
read from disk), with no decoding; a 128-image batch is a single ``index_select``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from model import ImageClass

FORMAT_NAME = "alexnet-prepared"
FORMAT_VERSION = 1
IMAGE_SIZE = 256
IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE
SPLITS = ("train", "val")


class TrainingError(Exception):
    """A problem with the user's input or files, with a message that says what to do. Exit status 2."""


@dataclass(frozen=True)
class ColorStats:
    """What ``prepare`` measured over the training split.

    mean_image: float32 [3, 256, 256], pixel values 0–255 (what the preprocessing subtracts).
    covariance: 3×3 covariance of RGB pixel values scaled to [0, 1] (all pixels of all images).
    eigenvalues: of that covariance, largest first; eigenvectors: its columns, in the same order.
    The [0, 1] scale is the one the paper's lighting formula is usually applied in (see augment.py).
    """

    mean_image: torch.Tensor
    covariance: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    images: int

    def pca(self, alpha_std: float) -> dict:
        """The checkpoint's ``pca`` field."""
        return {
            "eigenvalues": self.eigenvalues.tolist(),
            "eigenvectors": self.eigenvectors.tolist(),  # columns are the eigenvectors
            "alpha_std": alpha_std,
            "pixel_range": [0.0, 1.0],  # units of the eigenvalues; shifts are scaled ×255 for 0–255 pixels
            "images": self.images,
        }


def stats_from_sums(sum_image: torch.Tensor, sum_rgb: torch.Tensor, sum_outer: torch.Tensor, images: int) -> ColorStats:
    """Mean image and RGB covariance from exact integer sums (so they do not depend on worker count)."""
    pixels = images * IMAGE_SIZE * IMAGE_SIZE
    mean_image = (sum_image.double() / images).float()
    mean_rgb = sum_rgb.double() / pixels
    covariance = (sum_outer.double() / pixels - torch.outer(mean_rgb, mean_rgb)) / 255.0**2
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    order = torch.argsort(eigenvalues, descending=True)
    eigenvectors = eigenvectors[:, order]
    # Fix each eigenvector's sign (eigh may return either): largest component positive, for stable output.
    signs = torch.sign(eigenvectors.gather(0, eigenvectors.abs().argmax(0, keepdim=True)))
    return ColorStats(
        mean_image=mean_image,
        covariance=covariance.float(),
        eigenvalues=eigenvalues[order].clamp_min(0).float(),
        eigenvectors=(eigenvectors * signs).float(),
        images=images,
    )


def save_stats(path: Path, stats: ColorStats) -> None:
    from model import atomic_path
    from model.checkpoint import save_safetensors

    tensors = {
        "mean_image": stats.mean_image.contiguous(),
        "covariance": stats.covariance.contiguous(),
        "eigenvalues": stats.eigenvalues.contiguous(),
        "eigenvectors": stats.eigenvectors.contiguous(),
    }
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, {"images": str(stats.images)}, destination=path)


def load_stats(path: Path) -> ColorStats:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            images = int(f.metadata()["images"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        return ColorStats(t["mean_image"], t["covariance"], t["eigenvalues"], t["eigenvectors"], images)
    except (OSError, KeyError, ValueError, Exception) as e:
        raise TrainingError(f"{path}: cannot read the dataset statistics ({e}); rerun `prepare`") from None


class PreparedSplit:
    """One split: ``images`` uint8 [N, 3, 256, 256] memory-mapped (nothing read until used), ``labels`` [N]."""

    def __init__(self, root: Path, name: str):
        self.name = name
        index_path, data_path = root / f"{name}.json", root / f"{name}.u8"
        try:
            index = json.loads(index_path.read_text())
            self.files: list[str] = index["files"]
            self.labels = torch.tensor(index["labels"], dtype=torch.int64)
            self.skipped: list[dict] = index.get("skipped", [])
        except (OSError, ValueError, KeyError) as e:
            raise TrainingError(f"{index_path}: missing or unreadable ({e}); rerun `prepare`") from None
        count = len(self.labels)
        if count == 0:
            raise TrainingError(f"{root}: the {name} split is empty")
        size = data_path.stat().st_size if data_path.exists() else None
        if size != count * IMAGE_BYTES:
            found = "missing" if size is None else f"{size:,} bytes"
            raise TrainingError(
                f"{data_path}: expected {count:,} images = {count * IMAGE_BYTES:,} bytes, found {found}; "
                "rerun `prepare`"
            )
        flat = torch.from_file(str(data_path), shared=False, size=count * IMAGE_BYTES, dtype=torch.uint8)
        self.images = flat.view(count, 3, IMAGE_SIZE, IMAGE_SIZE)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the given images out of the file: uint8 [n, 3, 256, 256] and labels [n]."""
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)


class PreparedDataset:
    """A directory written by ``python -m training prepare``."""

    def __init__(self, root: str | Path):
        self.root = root = Path(root)
        meta_path = root / "dataset.json"
        if not root.is_dir():
            raise TrainingError(f"{root}: no such directory (expected the output of `python -m training prepare`)")
        if not meta_path.exists():
            partial = any(root.glob(".*.progress.safetensors"))
            hint = "preparation did not finish; rerun `prepare` to continue it" if partial else "run `prepare` first"
            raise TrainingError(f"{root}: not a prepared dataset (no dataset.json): {hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise TrainingError(f"{meta_path}: unreadable ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise TrainingError(f"{meta_path}: not a dataset prepared by `python -m training prepare`")
        if meta.get("format_version") != FORMAT_VERSION:
            raise TrainingError(
                f"{root} was prepared in format version {meta.get('format_version')}; this code reads version "
                f"{FORMAT_VERSION}. Prepare the dataset again into a new directory."
            )
        self.meta = meta
        self.name: str = meta["name"]
        self.fingerprint: str = meta["fingerprint"]
        self.classes = tuple(ImageClass(c["wnid"], c["name"]) for c in meta["classes"])
        self._splits: dict[str, PreparedSplit] = {}
        self._stats: ColorStats | None = None

    def split(self, name: str) -> PreparedSplit:
        if name not in self.meta["splits"]:
            raise TrainingError(f"{self.root} has no split {name!r} (it has {sorted(self.meta['splits'])})")
        if name not in self._splits:
            self._splits[name] = PreparedSplit(self.root, name)
        return self._splits[name]

    @property
    def stats(self) -> ColorStats:
        if self._stats is None:
            self._stats = load_stats(self.root / "stats.safetensors")
        return self._stats


class DirectoryLock:
    """An exclusive lock on a directory for as long as this object lives (flock on DIR/.lock): two jobs
    writing the same files would ruin each other's work. Released by ``release()``, or when the process
    exits. Where flock does not exist (Windows), nothing is locked."""

    def __init__(self, directory: Path, what: str):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / ".lock"
        self._file = open(path, "a")
        try:
            import fcntl
        except ImportError:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise TrainingError(f"{directory} is in use by another {what} (it holds a lock on {path})") from None

    def release(self) -> None:
        self._file.close()  # closing the descriptor releases the flock


# The order of the data: every rank computes the same permutation and takes its own part of each batch.


def derive_seed(*parts) -> int:
    """A 63-bit seed from the run's seed and a purpose (e.g. ("order", epoch)); the same in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of the training set, a function of (seed, epoch) only: resumable anywhere."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(size, generator=generator)


@dataclass(frozen=True)
class ShardedBatches:
    """Global batches of one epoch, split by rank (DistributedSampler's role, but batch-aligned).

    Global batch ``step`` is ``order[step·B : (step+1)·B]``; rank r trains on its r-th contiguous slice of
    B / world images. One process with batch B sees exactly the same images in the same order as
    ``world`` processes with B / world each, which is what makes DDP equal to single-process training.
    The last incomplete batch of an epoch is dropped (the permutation changes every epoch).
    """

    dataset_size: int
    global_batch: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.global_batch % self.world:
            raise TrainingError(f"batch size {self.global_batch} does not split evenly over {self.world} processes")
        if self.global_batch > self.dataset_size:
            raise TrainingError(
                f"batch size {self.global_batch} is larger than the training split ({self.dataset_size} images)"
            )

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def local_indices(self, order: torch.Tensor, step: int) -> torch.Tensor:
        start = step * self.global_batch + self.rank * self.local_batch
        return order[start : start + self.local_batch]

    def local_slice(self) -> slice:
        """This rank's part of a global batch (to pick its augmentation parameters)."""
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)


def prefetch(load, items, workers: int):
    """Yield ``load(item)`` for each item in order, computing up to 2·workers ahead in threads.

    Threads suffice: the work is a memory copy out of the mapped file (and pinning), during which torch
    releases the GIL. ``workers=0`` loads in the calling thread.
    """
    if workers <= 0:
        for item in items:
            yield load(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="loader") as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(load, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
