"""GET /metrics, the Prometheus scrape endpoint: the series service/metrics.py keeps, as text."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ..metrics import CONTENT_TYPE
from .dependencies import State

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics (text exposition format)",
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus(state: State) -> PlainTextResponse:
    """Every metric family with its HELP and TYPE lines. The `route` label of the HTTP metrics is the
    path template of the route that answered (`/classify`, `/embed`, `/explain`, `/model`,
    `/model/filters.png`, `/healthz`, `/readyz`, `/metrics`, `/`, `/docs`, `/static/{name}`, `/openapi.json`),
    whatever the status; `unmatched` only when the path
    matches no route (404, or a 307 redirect for a trailing slash)."""
    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)
