"""What routes are given (FastAPI dependencies), typed: the service's state, and the model a request uses.

    async def endpoint(state: State, model: ReadyModel): …

``ReadyModel`` is the readiness check every endpoint that needs the model shares (ServiceState.not_ready,
the one /readyz reports): 503 not-ready with Retry-After before the model is loaded, while shutting down,
or once the batching worker has stopped. Dependencies are solved before the query is validated, so a
service that is not ready answers 503 whatever the parameters. They are coroutines: FastAPI runs plain
functions in a thread, one hop per request for nothing.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..engine import LoadedModel
from ..problems import ProblemError
from ..state import ServiceState


async def service_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(service_state)]


async def require_ready(state: State) -> LoadedModel:
    """The model this request uses throughout, even across a reload; 503 when requests cannot be served."""
    model = state.ready_model()
    if model is None:
        raise ProblemError(503, "not-ready", "the model is not loaded yet", {"Retry-After": "1"})
    return model


ReadyModel = Annotated[LoadedModel, Depends(require_ready)]
