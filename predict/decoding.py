"""Decoding files in worker processes, into the uint8 256×256 image the classifier batches.

A worker sends back the uint8 image: a third of the float crop's bytes, a tenth of the ten crops'.
A file that cannot be read or decoded gets its error message instead; the run goes on.
"""

from __future__ import annotations

from model import ImageError
from model.decode_pool import DecodePool
from model.preprocessing import DEFAULT_MAX_PIXELS

CHUNK = 4  # files per task sent to a worker

_preprocessor = None
_max_pixels = DEFAULT_MAX_PIXELS


def _set_decoder(preprocessor, max_pixels: int) -> None:
    """What each worker (or this process, without workers) decodes with."""
    global _preprocessor, _max_pixels
    _preprocessor, _max_pixels = preprocessor, max_pixels


def _decode(path: str) -> tuple[bytes | None, str | None]:
    """A file → (its uint8 [3, S, S] pixels as bytes, None) or (None, why it cannot be classified). Never raises."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = _preprocessor.load(data, max_pixels=_max_pixels)
    except ImageError as e:
        return None, f"{type(e).__name__}: {e}"
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
    except Exception as e:  # a decoder bug must not stop a long run; the file gets an error record
        return None, f"{type(e).__name__}: {e}"
    return image.numpy().tobytes(), None


def _decode_many(paths: list[str]) -> list[tuple[bytes | None, str | None]]:
    return [_decode(p) for p in paths]


def decoded(paths: list[str], workers: int, window: int, preprocessor, max_pixels: int):
    """(path, pixels or None, error or None) for each path, in order.

    With workers, chunks of CHUNK files are decoded ahead, at most ``window`` files at a time.
    Unbounded read-ahead would hold every decoded image whenever the net is slower than the decoders.
    """
    if not paths:
        return
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with DecodePool(workers, _set_decoder, (preprocessor, max_pixels)) as pool:
        results = pool.in_order(_decode_many, chunks, window=max(1, window // CHUNK) + 1)
        for chunk, decoded_chunk in zip(chunks, results):
            for path, (pixels, error) in zip(chunk, decoded_chunk):
                yield path, pixels, error
