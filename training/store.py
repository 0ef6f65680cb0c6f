"""The two stores ``prepare`` writes: raw uint8 arrays, or each image re-encoded as a JPEG."""

from __future__ import annotations

import ctypes
import io
from dataclasses import dataclass

import torch

from .data import (
    IMAGE_BYTES,
    STORES,
    store_files,
)
from .errors import TrainingError

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


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """uint8 [3, 256, 256] → one baseline JPEG of the jpeg store (4:4:4 chroma, deterministic)."""
    from PIL import Image

    hwc = image.permute(1, 2, 0).contiguous()
    pil = Image.frombuffer("RGB", (hwc.shape[1], hwc.shape[0]), ctypes.string_at(hwc.data_ptr(), hwc.numel()), "raw")
    out = io.BytesIO()
    pil.save(out, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return out.getvalue()
