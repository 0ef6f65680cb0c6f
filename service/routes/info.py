"""What is being served: the checkpoint's identity, classes, preprocessing and provenance; its conv1 kernels."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine import LoadedModel
from ..problems import ProblemError
from ..schemas import ModelInfo, Problem
from .dependencies import State

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="Metadata of the model being served",
    responses={503: {"model": Problem, "description": "no model loaded yet"}},
)
async def model_info(state: State) -> ModelInfo:
    # Answered whenever a model is loaded, ready or not (while shutting down, too).
    loaded = state.model
    if loaded is None:
        raise ProblemError(503, "not-ready", "no model is loaded yet")
    metadata = loaded.metadata
    return ModelInfo(
        model=loaded.identity,
        num_classes=len(loaded.classes),
        devices=[str(d) for d in loaded.devices],
        loaded_at=loaded.loaded_at,
        architecture=metadata["architecture"],
        preprocessing=metadata["preprocessing"],
        provenance=metadata["provenance"],
        training=metadata["training"],
    )


@router.get(
    "/model/filters.png",
    response_class=Response,
    summary="conv1's kernels, as the paper's Fig. 3 draws them",
    responses={
        200: {
            "description": "a PNG: tower 0's kernels in the upper block, tower 1's below, each kernel scaled to "
            "its own range (BGR-trained weights shown as RGB). ETag: the checkpoint's sha256",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "If-None-Match names the current model's picture: not modified"},
        503: {"model": Problem, "description": "no model loaded yet"},
    },
)
async def filters(request: Request, state: State) -> Response:
    """Drawn once per loaded model (a hot reload brings a new picture, and a new ETag); revalidated by
    browsers on every use (Cache-Control: no-cache)."""
    loaded: LoadedModel | None = state.model
    if loaded is None:
        raise ProblemError(503, "not-ready", "no model is loaded yet")
    png = await asyncio.get_running_loop().run_in_executor(None, lambda: loaded.filters_png)
    headers = {"ETag": loaded.filters_etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if _matches(request.headers.get("if-none-match", ""), loaded.filters_etag):
        return Response(status_code=304, headers=headers)
    return Response(png, media_type="image/png", headers=headers)


def _matches(if_none_match: str, etag: str) -> bool:
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags
