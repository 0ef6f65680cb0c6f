"""POST /embed: images in, the activations of a hidden layer (fc6 or fc7) of each out — the paper's Fig. 4
compares images by the Euclidean distance between their fc7 vectors.

The same body, limits and errors as /classify, and the same batcher: an embedding is one more kind of
forward pass (``engine.Task.features``), batched with the other requests in arrival order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..engine import Task
from ..schemas import EmbeddedImage, EmbedParams, EmbedResponse
from .dependencies import ReadyModel, State
from .images import Clock, batched, error_responses, request_body

router = APIRouter(tags=["embed"])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Feature vectors (fc6 or fc7 activations) of one or more images",
    openapi_extra={"requestBody": request_body()},
    responses=error_responses(e422="corrupt, truncated or empty image; no file part; bad layer, normalize or crops"),
)
async def embed(
    request: Request, state: State, model: ReadyModel, params: Annotated[EmbedParams, Query()]
) -> Response:
    """Per image, the activations of `layer` after its ReLU for the centre crop (float32; both towers'
    halves side by side, tower 0's first), optionally scaled to unit L2 norm."""
    clock = Clock()
    task = Task.features(params.layer, params.normalize)
    uploads, features = await batched(request, state, model, task, clock)

    state.metrics.images_embedded.inc(params.layer, amount=len(uploads))
    rows = features.tolist()  # float32 values, exactly (a float64 holds each one)
    body = EmbedResponse.model_construct(
        model=model.identity,
        layer=params.layer,
        normalize=params.normalize,
        crops=params.crops,
        dimension=features.shape[1],
        results=[EmbeddedImage.model_construct(filename=u.filename, features=r) for u, r in zip(uploads, rows)],
        timing=clock.timing(),
    )
    # Serialised here, in one pass of pydantic's JSON encoder: 16 × 4096 numbers through FastAPI's generic
    # encoder would take several times as long on the event loop.
    return Response(body.model_dump_json(), media_type="application/json")
