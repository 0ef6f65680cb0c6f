"""Decode: uploaded images → uint8 [3, S, S] tensors for a model's preprocessing, in the decode threads and
under the decode budget. The first step of every endpoint that computes (decode → batch → predict → encode).

Each decode first bounds its memory from the image's header (``Preprocessor.decode_peak_bytes``) and waits
for that much of the decode budget; an image that needs more than the whole budget is refused (413). No
tensor work happens on the event loop: a torch op there would wake OpenMP threads and stall every
connection while they come.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from model import CorruptImage, ImageError, ImageTooLarge, open_image

from . import problems
from .engine import LoadedModel
from .memory import MIB, ByteBudget
from .uploads import Upload

log = logging.getLogger("service")


class Decoder:
    """The decode threads and the decode budget (``ALEXNET_DECODE_MEMORY_BYTES``) they share."""

    def __init__(self, budget: ByteBudget, max_pixels: int):
        self.budget, self.max_pixels = budget, max_pixels
        self._threads: ThreadPoolExecutor | None = None

    def start(self, workers: int) -> None:
        self._threads = ThreadPoolExecutor(workers, "decode")

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    async def decode(self, model: LoadedModel, uploads: list[Upload]) -> list[torch.Tensor]:
        """Every upload decoded → uint8 [3, S, S] each, for this model's preprocessing; each upload's body is
        dropped once decoded. An image that cannot be used: the ProblemError its kind answers
        (problems.image_problem), naming the upload."""
        results = await asyncio.gather(*(self._decode_one(model, upload) for upload in uploads), return_exceptions=True)
        for position, (upload, result) in enumerate(zip(uploads, results), 1):
            upload.data = []
            if isinstance(result, ImageError):
                # "file 2 ('b.png')" among several; one upload is named by its filename alone (or "image").
                if len(uploads) > 1:
                    name = upload.describe(position)
                else:
                    name = repr(upload.filename) if upload.filename else "image"
                raise problems.image_problem(result, name)
            if isinstance(result, BaseException):
                raise result
        return results

    async def _decode_one(self, model: LoadedModel, upload: Upload) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        # The header is read (and checked) once; the opened image waits for room, then decodes.
        image, need = await loop.run_in_executor(self._threads, _open, model, upload.data, self.max_pixels)
        if need > self.budget.capacity:
            raise ImageTooLarge(
                f"decoding it needs up to {need / MIB:,.0f} MiB, more than all decodes together may use "
                f"({self.budget.capacity / MIB:,.0f} MiB, ALEXNET_DECODE_MEMORY_BYTES)"
            )
        async with self.budget.hold(need):
            return await loop.run_in_executor(self._threads, _decode, model, image)


def _open(model: LoadedModel, data, max_pixels: int):
    """The image, its header read and checked, and the most memory decoding it can take."""
    try:
        image = open_image(data, max_pixels=max_pixels)
        return image, model.preprocessor.decode_peak_bytes(image)
    except ImageError:
        raise
    except Exception as e:  # as in _decode
        log.warning("unexpected decoder error", exc_info=True)
        raise CorruptImage(f"cannot read image header: {type(e).__name__}: {e}") from None


def _decode(model: LoadedModel, image) -> torch.Tensor:
    try:
        return model.preprocessor.load(image)
    except ImageError:
        raise
    except Exception as e:  # a decoder failure the model package did not anticipate: still the input's fault
        log.warning("unexpected decoder error", exc_info=True)
        raise CorruptImage(f"cannot decode image: {type(e).__name__}: {e}") from None
