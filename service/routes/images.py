"""What the image endpoints (/classify, /embed, /explain) share: the request body and its OpenAPI
description, the errors, and the way in — a place in the queue (503 when full) held from before the body
is read until the answer (``admitted``, which /v2 infer takes too), the body read under the limits and the
images decoded (``receive``), and for /classify and /embed the batched forward pass (``batched``)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from fastapi import Request

from ..batcher import InferenceFailed, QueueFull
from ..engine import LoadedModel, Task
from ..problems import ProblemError
from ..schemas import Problem, Timing
from ..service_state import ServiceState
from ..uploads import Upload, discard_body, read_uploads

IMAGE_FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF"


def request_body(one: bool = False) -> dict:
    """The body is read by hand (to count bytes while streaming), so FastAPI cannot infer its schema.

    ``one``: exactly one image, a single ``file`` part (a second one: 413 too-many-files). The form has no
    other fields (another one: 422 unexpected-field)."""
    files = {
        "type": "array",
        "minItems": 1,  # an empty form is refused (422 no-image)
        "items": {"type": "string", "format": "binary"},
        "description": f"one or more images ({IMAGE_FORMATS})",
    }
    if one:
        one_file = f"exactly one image ({IMAGE_FORMATS}); a second file part: 413 too-many-files"
        files = {"type": "string", "format": "binary", "description": one_file}
    form = {"type": "object", "required": ["file"], "properties": {"file": files}, "additionalProperties": False}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": form},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }


ERRORS = {
    400: "malformed multipart body",
    408: "the body did not arrive within the body timeout",
    413: "body too large, too many files, or an image with too many pixels",
    415: "not an image format we read, a Content-Type other than multipart/form-data or image/*, or a "
    "Content-Encoding other than identity (see Accept-Encoding)",
    422: "corrupt, truncated or empty image; no file part; a bad query parameter",
    503: "queue full (see Retry-After) or the model is not loaded",
}


def error_responses(**overrides: str) -> dict:
    """OpenAPI ``responses`` for the errors (problem+json), ``overrides`` keyed ``e422`` etc."""
    texts = {**ERRORS, **{int(k[1:]): v for k, v in overrides.items()}}
    return {status: {"model": Problem, "description": text} for status, text in texts.items()}


@dataclass
class Clock:
    """When a request started, its decoding started, and its forward pass (or Grad-CAM) started and ended."""

    started: float = field(default_factory=time.perf_counter)
    decode_started: float = 0.0
    compute_started: float = 0.0
    done: float = 0.0

    def timing(self) -> Timing:
        ms = 1000.0
        return Timing(
            total_ms=round((time.perf_counter() - self.started) * ms, 3),
            preprocess_ms=round((self.compute_started - self.decode_started) * ms, 3),
            inference_ms=round((self.done - self.compute_started) * ms, 3),
        )


async def discard(request: Request, state: ServiceState) -> None:
    """Drop what is left of a refused request's body (see uploads.discard_body)."""
    settings = state.settings
    await discard_body(request, max_body_bytes=settings.max_body_bytes, timeout=settings.body_timeout_s)


@contextlib.asynccontextmanager
async def admitted(request: Request, state: ServiceState):
    """A place in the batcher's queue for the whole request, taken before its body is read (so at most
    queue_size bodies are held at once): none free, 503 queue-full with Retry-After (the body drained, so
    the connection stays usable); a forward pass that failed inside, 503 inference-failed."""
    try:
        with state.batcher.admission():
            yield
    except QueueFull as e:
        await discard(request, state)
        raise ProblemError(
            503, "queue-full", "the server is at capacity; retry later", {"Retry-After": str(e.retry_after)}
        ) from None
    except InferenceFailed as e:
        raise ProblemError(503, "inference-failed", str(e), {"Retry-After": "1"}) from None


async def receive(
    request: Request, state: ServiceState, model: LoadedModel, clock: Clock, *, max_files: int | None = None
) -> tuple[list[Upload], list[torch.Tensor]]:
    """The request's uploads and their decoded uint8 images [3, S, S], read under the service's limits. The
    bodies count against the body budget until they are decoded (then they are dropped)."""
    settings = state.settings
    with state.body_reservation() as reservation:
        uploads = await read_uploads(
            request,
            max_body_bytes=settings.max_body_bytes,
            max_files=settings.max_files if max_files is None else max_files,
            timeout=settings.body_timeout_s,
            reservation=reservation,
        )
        clock.decode_started = time.perf_counter()
        images = await state.decoder.decode(model, uploads)
    return uploads, images


async def batched(
    request: Request, state: ServiceState, model: LoadedModel, task: Task, clock: Clock
) -> tuple[list[Upload], torch.Tensor]:
    """Read and decode the request's images, then run ``task`` on them in the batcher's next batch."""
    async with admitted(request, state):
        uploads, images = await receive(request, state, model, clock)
        clock.compute_started = time.perf_counter()
        outputs = await state.batcher.infer(model, images, task)
        clock.done = time.perf_counter()
    return uploads, outputs
