"""What routes are given (FastAPI dependencies), typed: the service's state, and the model a request uses.

``ReadyModel`` is the readiness check every endpoint that needs the model shares (the one /readyz reports):
503 not-ready with Retry-After before the model is loaded, while shutting down, or once the batching worker
has stopped, whatever the parameters' values. The dependencies are coroutines: FastAPI runs plain functions
in a thread, one hop per request for nothing. ``known_query_parameters`` runs first on every route: a query
parameter the route does not declare (``?topk=3``) answers 422 instead of being ignored."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.params import Query
from pydantic import BaseModel

from ..engine import LoadedModel
from ..problems import ProblemError
from ..service_state import ServiceState


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


async def known_query_parameters(request: Request) -> None:
    """422 naming the accepted parameters when the query has one the route does not declare. A route that
    declares none takes any (a cache-busting ``?v=`` on a picture, say): there is no typo to catch."""
    route = request.scope.get("route")
    accepted = declared_query_parameters(route.dependant) if hasattr(route, "dependant") else []
    if not accepted:
        return
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in accepted]
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        plural = "s" if len(unknown) > 1 else ""
        raise ProblemError(
            422,
            "invalid-parameter",
            f"unknown query parameter{plural} {names}: {request.url.path} accepts {', '.join(accepted)}",
        )


def declared_query_parameters(dependant) -> list[str]:
    """The query parameter names a route's endpoint and its dependencies declare, in order; a pydantic
    model given as ``Annotated[Model, Query()]`` declares its fields (by alias)."""
    names: list[str] = []
    for field in dependant.query_params:
        model = field.field_info.annotation
        if isinstance(field.field_info, Query) and isinstance(model, type) and issubclass(model, BaseModel):
            names += [f.alias or name for name, f in model.model_fields.items()]
        else:
            names.append(field.alias)
    for sub in dependant.dependencies:
        names += [name for name in declared_query_parameters(sub) if name not in names]
    return names
