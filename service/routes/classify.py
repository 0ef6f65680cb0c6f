"""POST /classify: images in, the top-k ImageNet classes of each out."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Query, Request

from model import imagenet_classes

from ..engine import LoadedModel, Task
from ..problems import ProblemError
from ..schemas import ClassifyResponse, Crops, ImageResult, Prediction
from .dependencies import ReadyModel, State
from .images import Clock, batched, error_responses, request_body

router = APIRouter(tags=["classify"])


DEFAULT_TOP_K = 5  # the paper's top-5; a checkpoint with fewer classes answers with all of them
MAX_TOP_K = len(imagenet_classes())  # the schema's bound: ImageNet's 1000 (a checkpoint's own count: 422 above it)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify one or more images",
    openapi_extra={"requestBody": request_body()},
    responses=error_responses(e422="corrupt, truncated or empty image; no file part; bad top_k or crops"),
)
async def classify(
    request: Request,
    state: State,
    model: ReadyModel,
    top_k: int | None = Query(
        None,
        ge=1,
        le=MAX_TOP_K,
        description="how many classes to return per image: 1..number of classes (more: 422); "
        "default 5, or every class of a checkpoint with fewer",
    ),
    crops: Crops = Query("center", description="center: one 224 crop; ten: the paper's 10-patch average"),
) -> ClassifyResponse:
    clock = Clock()
    top_k = min(DEFAULT_TOP_K, len(model.classes)) if top_k is None else top_k
    if top_k > len(model.classes):
        raise ProblemError(422, "invalid-parameter", f"top_k: at most {len(model.classes)} (the number of classes)")
    uploads, probabilities = await batched(request, state, model, Task.probabilities(crops), clock)

    state.metrics.images.inc(crops, amount=len(uploads))
    scores, indices = probabilities.topk(top_k, dim=1)
    results = [
        ImageResult(filename=upload.filename, predictions=_predictions(model, s, i))
        for upload, s, i in zip(uploads, scores, indices)
    ]
    return ClassifyResponse(model=model.identity, crops=crops, top_k=top_k, results=results, timing=clock.timing())


def _predictions(model: LoadedModel, scores: torch.Tensor, indices: torch.Tensor) -> list[Prediction]:
    out = []
    for rank, (score, index) in enumerate(zip(scores.tolist(), indices.tolist()), 1):
        image_class = model.classes[index]
        out.append(Prediction(rank=rank, index=index, wnid=image_class.wnid, label=image_class.label, score=score))
    return out
