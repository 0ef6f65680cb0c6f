"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..problems import ProblemError
from ..schemas import Health, Problem, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="The model is loaded and warmed up",
    responses={503: {"model": Problem, "description": "not ready (starting or shutting down)"}},
)
async def readyz(request: Request) -> Ready:
    state = request.app.state.service
    if not state.ready or state.model is None:
        raise ProblemError(503, "not-ready", "the model is not loaded (starting or shutting down)")
    if not state.batcher.running:
        raise ProblemError(503, "not-ready", "the batching worker has stopped (see the log)")
    return Ready(model=state.model.identity)
