"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from ..problems import ProblemError
from ..schemas import Health, Problem, Ready
from ..service_state import NOT_LOADED
from .dependencies import State

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
async def readyz(state: State) -> Ready:
    # The readiness every endpoint checks (ServiceState.not_ready), here with the reason when not ready.
    reason = state.not_ready()
    if reason == NOT_LOADED:
        raise ProblemError(503, "not-ready", "the model is not loaded (starting or shutting down)")
    if reason is not None:
        raise ProblemError(503, "not-ready", "the batching worker has stopped (see the log)")
    return Ready(model=state.model.identity)
