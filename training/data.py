"""The prepared dataset on disk, read back memory-mapped, and the order in which training visits it.

Two stores share everything but the images: raw (uint8 arrays, no decoding, 252 GB for ImageNet's train
split) and jpeg (each image re-encoded, ~1/8 of the bytes, decoded by the loader's worker processes).
The raw store is still written as format version 1, so older code keeps reading it and refuses a JPEG store.
Every file is mapped read-only and shared: nothing is charged to the machine's memory up front.
docs/training-formats.md has the layout of DEST and the reasons.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model import ImageClass
from model.files import read_safetensors, write_safetensors

from .errors import TrainingError

FORMAT_NAME = "alexnet-prepared"
FORMAT_VERSION = 2  # the newest: adds the JPEG store
RAW_FORMAT_VERSION = 1  # a raw store is written as version 1 (its layout is unchanged; see above)
READABLE_VERSIONS = (1, 2)
STORES = ("raw", "jpeg")
IMAGE_SIZE = 256
IMAGE_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE
SPLITS = ("train", "val")


def format_version(store: str) -> int:
    """The format version ``prepare`` writes for a store."""
    return RAW_FORMAT_VERSION if store == "raw" else FORMAT_VERSION


def store_files(store: str, split: str) -> tuple[str, ...]:
    """The files holding a split's images, the data file first."""
    if store == "raw":
        return (f"{split}.u8",)
    return (f"{split}.jpg", f"{split}.offsets", f"{split}.crc32")


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
    tensors = {
        "mean_image": stats.mean_image.contiguous(),
        "covariance": stats.covariance.contiguous(),
        "eigenvalues": stats.eigenvalues.contiguous(),
        "eigenvectors": stats.eigenvectors.contiguous(),
    }
    write_safetensors(path, tensors, {"images": str(stats.images)})


def load_stats(path: Path) -> ColorStats:
    try:
        meta, t = read_safetensors(path)
        images = int(meta["images"])
        return ColorStats(t["mean_image"], t["covariance"], t["eigenvalues"], t["eigenvectors"], images)
    except (OSError, KeyError, ValueError, Exception) as e:
        raise TrainingError(f"{path}: cannot read the dataset statistics ({e}); rerun `prepare`") from None


def _map_read_only(path: Path) -> mmap.mmap:
    """The whole file mapped read-only and shared: nothing is committed up front, pages are shared."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _tensor_of(mapped: mmap.mmap, dtype=torch.uint8) -> torch.Tensor:
    """A tensor over the mapping, no copy. It must only be read: writing to it crashes (SIGSEGV)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(mapped, dtype=dtype)


def writable_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for Pillow's output, without numpy)."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("expected a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class _Split:
    """What both stores share: ``name``, ``files``, ``labels`` (int64 [N]), ``skipped`` from <split>.json,
    ``len()``, and ``batch(indices)`` / ``read_into(indices, out)`` (implemented per store)."""

    store = ""
    threads_suffice = True  # True: reading releases the GIL (a copy); False: it needs processes (decoding)

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        index_path = root / f"{name}.json"
        try:
            index = json.loads(index_path.read_text())
            self.files: list[str] = index["files"]
            self.labels = torch.tensor(index["labels"], dtype=torch.int64)
            self.skipped: list[dict] = index.get("skipped", [])
        except (OSError, ValueError, KeyError) as e:
            raise TrainingError(f"{index_path}: missing or unreadable ({e}); rerun `prepare`") from None
        if len(self.labels) == 0:
            raise TrainingError(f"{root}: the {name} split is empty")
        self._index = index

    def __len__(self) -> int:
        return len(self.labels)

    def _size(self, path: Path, expected: int, what: str) -> None:
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes"
            raise TrainingError(f"{path}: expected {what} = {expected:,} bytes, found {found}; rerun `prepare`")

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The given images, uint8 [n, 3, 256, 256] (a copy), and their labels [n]."""
        images = torch.empty(len(indices), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        self.read_into(indices, images)
        return images, self.labels.index_select(0, indices)

    def read_into(self, indices: torch.Tensor, out: torch.Tensor) -> None:
        """Write images ``indices`` into ``out[:len(indices)]`` (uint8 [≥n, 3, 256, 256], contiguous)."""
        raise NotImplementedError


class PreparedSplit(_Split):
    """A raw split: ``images`` uint8 [N, 3, 256, 256] memory-mapped read-only (nothing read until used; the
    tensor must not be written to), ``labels`` [N]."""

    store = "raw"

    def __init__(self, root: Path, name: str):
        super().__init__(root, name)
        count = len(self.labels)
        data_path = root / f"{name}.u8"
        self._size(data_path, count * IMAGE_BYTES, f"{count:,} images")
        self._mapped = _map_read_only(data_path)
        self.images = _tensor_of(self._mapped).view(count, 3, IMAGE_SIZE, IMAGE_SIZE)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the given images out of the file: uint8 [n, 3, 256, 256] and labels [n]."""
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)

    def read_into(self, indices: torch.Tensor, out: torch.Tensor) -> None:
        torch.index_select(self.images, 0, indices, out=out[: len(indices)])  # one copy; releases the GIL


class JpegSplit(_Split):
    """A JPEG split: record i of <split>.jpg is image i re-encoded as a JPEG; decoded on every read.

    Decoding uses Pillow's JPEG decoder object directly (no ``Image.open``: its marker parsing is Python)
    into one reused RGB canvas, then Pillow's raw encoder writes each colour plane, so the CHW output needs
    no transposing copy (BENCHMARKS.md has the time per image). Reading needs the GIL for
    the Python around it, so the loader decodes in worker processes (``threads_suffice`` is False).
    """

    store = "jpeg"
    threads_suffice = False

    def __init__(self, root: Path, name: str):
        super().__init__(root, name)
        count = len(self.labels)
        data_path, offsets_path, crc_path = (root / f for f in store_files("jpeg", name))
        self._size(offsets_path, (count + 1) * 8, f"{count + 1:,} offsets")
        self._size(crc_path, count * 4, f"{count:,} checksums")
        self._offsets_map, self._crc_map = _map_read_only(offsets_path), _map_read_only(crc_path)
        offsets = _tensor_of(self._offsets_map, torch.int64)
        data_size = data_path.stat().st_size if data_path.exists() else None
        ordered = int(offsets[0]) == 0 and not bool((offsets.diff() <= 0).any())
        if data_size is None or not ordered or int(offsets[-1]) != data_size:
            found = "missing" if data_size is None else f"{data_size:,} bytes"
            raise TrainingError(
                f"{data_path} ({found}) does not match {offsets_path.name} (records end at {int(offsets[-1]):,}); "
                "rerun `prepare`"
            )
        self.data_path = data_path
        self.offsets = offsets  # int64 [N + 1], read-only
        self._data_map = _map_read_only(data_path)
        # memoryviews: indexing one gives a Python int / a zero-copy slice, the cheapest per-image access
        self._data = memoryview(self._data_map)
        self._offset = memoryview(self._offsets_map).cast("q")
        self._crc = memoryview(self._crc_map).cast("I")

    def record(self, i: int) -> memoryview:
        """Record i's JPEG bytes (zero copy)."""
        return self._data[self._offset[i] : self._offset[i + 1]]

    def read_into(self, indices: torch.Tensor, out: torch.Tensor) -> None:
        n = len(indices)
        self.decode_into(indices.tolist(), writable_view(out[:n]), 0)

    def decode_into(self, indices: list[int], out: memoryview, start: int) -> None:
        """Decode records ``indices`` as CHW uint8 into ``out[start:]``, image after image. Raises
        TrainingError naming the record and its source file when one is damaged."""
        from PIL import Image

        core = Image.core
        plane = IMAGE_SIZE * IMAGE_SIZE
        canvas = core.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        extents = (0, 0, IMAGE_SIZE, IMAGE_SIZE)
        jpeg_decoder, raw_encoder, crc32 = core.jpeg_decoder, core.raw_encoder, zlib.crc32
        data, offset, crc = self._data, self._offset, self._crc
        position = start
        for i in indices:
            record = data[offset[i] : offset[i + 1]]
            if crc32(record) != crc[i]:
                self._damaged(i, "its checksum does not match")
            decoder = jpeg_decoder("RGB", "RGB", "")
            decoder.setimage(canvas, extents)
            try:
                consumed, status = decoder.decode(record)
            finally:
                decoder.cleanup()
            if consumed >= 0 or status < 0:  # (-1, 0): the whole image was decoded
                self._damaged(i, f"the JPEG decoder stopped ({consumed}, {status})")
            for band in ("R", "G", "B"):
                encoder = raw_encoder("RGB", band, 0, 1)
                encoder.setimage(canvas, extents)
                _, _, pixels = encoder.encode(plane + 1024)  # one call: the whole plane
                out[position : position + plane] = pixels
                position += plane

    def _damaged(self, i: int, why: str):
        raise TrainingError(
            f"{self.data_path}: record {i} of the {self.name} split ({self.files[i]}) is damaged ({why}); the "
            f"file changed after `prepare` wrote it. Run `python -m training prepare` again into a new directory."
        )


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
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise TrainingError(
                f"{root} was prepared in format version {version}; this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Prepare the dataset again into a new directory."
            )
        store = meta.get("store", "raw")  # version 1 predates the key: raw
        if store not in STORES or (version == RAW_FORMAT_VERSION and store != "raw"):
            raise TrainingError(
                f"{meta_path}: unknown image store {store!r} for format version {version}; "
                "prepare the dataset again into a new directory"
            )
        self.meta = meta
        self.store: str = store
        self.name: str = meta["name"]
        self.fingerprint: str = meta["fingerprint"]
        self.classes = tuple(ImageClass(c["wnid"], c["name"]) for c in meta["classes"])
        self._splits: dict[str, PreparedSplit | JpegSplit] = {}
        self._stats: ColorStats | None = None

    def provenance(self) -> str:
        """Where the data came from: the source's form, where the val labels came from, the class list's
        checksum (datasets prepared before these were recorded say so)."""
        meta = self.meta
        checksum = meta.get("classes_sha256", "not recorded")
        return (
            f"data: {meta.get('source', '?')} (form {meta.get('source_form', 'not recorded')}); val labels from "
            f"{meta.get('val_labels_from', 'not recorded')}; {len(self.classes)} classes, sha256 {checksum[:16]}"
        )

    def split(self, name: str) -> PreparedSplit | JpegSplit:
        if name not in self.meta["splits"]:
            raise TrainingError(f"{self.root} has no split {name!r} (it has {sorted(self.meta['splits'])})")
        if name not in self._splits:
            self._splits[name] = (PreparedSplit if self.store == "raw" else JpegSplit)(self.root, name)
        return self._splits[name]

    @property
    def stats(self) -> ColorStats:
        if self._stats is None:
            self._stats = load_stats(self.root / "stats.safetensors")
        return self._stats


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
