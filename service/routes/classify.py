"""POST /classify: images in, the top-k ImageNet classes of each out."""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Query, Request

from ..batcher import InferenceFailed, QueueFull
from ..engine import LoadedModel
from ..problems import ProblemError
from ..schemas import ClassifyResponse, Crops, ImageResult, Prediction, Problem, Timing
from ..uploads import read_uploads

router = APIRouter(tags=["classify"])

# The body is read by hand (to count bytes while streaming), so FastAPI cannot infer its schema.
REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "array",
                        "minItems": 1,  # an empty form is refused (422 no-image)
                        "items": {"type": "string", "format": "binary"},
                        "description": "one or more images (JPEG, PNG, WebP, GIF, BMP, TIFF)",
                    }
                },
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
}

ERRORS = {
    400: "malformed multipart body",
    408: "the body did not arrive within the body timeout",
    413: "body too large, too many files, or an image with too many pixels",
    415: "not an image format we read, or a Content-Type other than multipart/form-data or image/*",
    422: "corrupt, truncated or empty image; no file part; bad top_k or crops",
    503: "queue full (see Retry-After) or the model is not loaded",
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify one or more images",
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={status: {"model": Problem, "description": text} for status, text in ERRORS.items()},
)
async def classify(
    request: Request,
    top_k: int = Query(5, ge=1, description="how many classes to return per image (1..number of classes)"),
    crops: Crops = Query("center", description="center: one 224 crop; ten: the paper's 10-patch average"),
) -> ClassifyResponse:
    started = time.perf_counter()
    state = request.app.state.service
    model: LoadedModel | None = state.model  # this request uses this model throughout, even across a reload
    if model is None or not state.ready or not state.batcher.running:
        raise ProblemError(503, "not-ready", "the model is not loaded yet", {"Retry-After": "1"})
    if top_k > len(model.classes):
        raise ProblemError(422, "invalid-parameter", f"top_k: at most {len(model.classes)} (the number of classes)")
    settings = state.settings
    try:
        # Admitted before the body is read: at most queue_size bodies are held in memory at once.
        with state.batcher.admission():
            uploads = await read_uploads(
                request,
                max_body_bytes=settings.max_body_bytes,
                max_files=settings.max_files,
                timeout=settings.body_timeout_s,
            )
            decode_started = time.perf_counter()
            images = await state.decode(model, uploads)
            infer_started = time.perf_counter()
            probabilities = await state.batcher.infer(model, images, crops)
            done = time.perf_counter()
    except QueueFull as e:
        raise ProblemError(
            503, "queue-full", "the server is at capacity; retry later", {"Retry-After": str(e.retry_after)}
        ) from None
    except InferenceFailed as e:
        raise ProblemError(503, "inference-failed", str(e), {"Retry-After": "1"}) from None

    state.metrics.images.inc(crops, amount=len(uploads))
    scores, indices = probabilities.topk(top_k, dim=1)
    results = [
        ImageResult(filename=upload.filename, predictions=_predictions(model, s, i))
        for upload, s, i in zip(uploads, scores, indices)
    ]
    ms = 1000.0
    return ClassifyResponse(
        model=model.identity,
        crops=crops,
        top_k=top_k,
        results=results,
        timing=Timing(
            total_ms=round((time.perf_counter() - started) * ms, 3),
            preprocess_ms=round((infer_started - decode_started) * ms, 3),
            inference_ms=round((done - infer_started) * ms, 3),
        ),
    )


def _predictions(model: LoadedModel, scores: torch.Tensor, indices: torch.Tensor) -> list[Prediction]:
    out = []
    for rank, (score, index) in enumerate(zip(scores.tolist(), indices.tolist()), 1):
        image_class = model.classes[index]
        out.append(Prediction(rank=rank, index=index, wnid=image_class.wnid, label=image_class.label, score=score))
    return out
