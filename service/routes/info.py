"""What is being served: the checkpoint's identity, classes, preprocessing and provenance."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..problems import ProblemError
from ..schemas import ModelInfo, Problem

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    response_model=ModelInfo,
    summary="Metadata of the model being served",
    responses={503: {"model": Problem, "description": "no model loaded yet"}},
)
async def model_info(request: Request) -> ModelInfo:
    loaded = request.app.state.service.model
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
