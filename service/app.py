"""The FastAPI application: its routes, its error handlers, and its lifespan, which starts and stops the
service's state (state.py: the model, the batcher, the decode and explain threads, the reload watcher)."""

from __future__ import annotations

import contextlib
import gc
import logging

from fastapi import FastAPI
from fastapi.routing import APIRoute

import model as model_package

from . import problems
from .framing import CloseAmbiguousFraming
from .logs import ObserveRequests
from .routes import ROUTERS
from .settings import Settings
from .startup import QuietStartupFailure, exit_status
from .state import ServiceState

log = logging.getLogger("service")


DESCRIPTION = """\
ImageNet classification with the 2012 AlexNet (Krizhevsky, Sutskever & Hinton).

`POST /classify` with one or more images (multipart field `file`, or a raw `image/*` body) answers the
top-k ImageNet classes per image; `POST /embed`, their fc6 or fc7 feature vectors; `POST /explain` (one
image), a Grad-CAM heat map of where the net finds a class. `GET /model/filters.png` shows conv1's kernels.
Errors are RFC 9457 `application/problem+json` bodies.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    state = ServiceState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await state.start()
        except Exception as e:
            # One line, no traceback (QuietStartupFailure): the cause is in the message; the exit status
            # (startup.exit_status, which __main__ exits with) says which kind it is.
            app.state.startup_exit_status = status = exit_status(e)
            fields = {"event": "startup_failed", "exit_status": status}
            log.error("cannot start the service: %s", e, extra={"fields": fields})
            await state.stop()
            raise
        # Everything made so far (FastAPI's routes, pydantic's validators, torch's modules) lives as long as
        # the process: moved out of the collector's generations, its full passes, which the allocations of
        # each request trigger, stop walking it. About 2 ms less per request at 1 client (BENCHMARKS.md).
        gc.freeze()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="AlexNet classification API",
        version=model_package.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs is served by routes/page.py from this server's own files (FastAPI's loads Swagger UI from a
        # CDN, and its inline script breaks the Content-Security-Policy); no ReDoc, no OAuth2 redirect page.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.service = state
    problems.install(app)
    app.add_middleware(CloseAmbiguousFraming)
    app.add_middleware(QuietStartupFailure)
    app.add_middleware(ObserveRequests, metrics=state.metrics)  # added last: outermost, it sees every answer
    for router in ROUTERS:
        app.include_router(router)
    answer_head_where_get(app, [route for router in ROUTERS for route in router.routes])
    return app


def answer_head_where_get(app: FastAPI, routes: list) -> None:
    """HEAD on every GET route (RFC 9110 §9.1: a server that answers GET answers HEAD), as Starlette's own
    routes do and FastAPI's do not. The answer is GET's, whose body uvicorn leaves out. HEAD is implicit
    and stays out of the OpenAPI schema: documented, each GET route would have a second operation of the
    same operationId."""
    heads = [r for r in routes if isinstance(r, APIRoute) and "GET" in r.methods]
    for route in heads:
        route.methods.add("HEAD")
    generate = app.openapi

    def openapi() -> dict:
        for route in heads:
            route.methods.discard("HEAD")
        try:
            return generate()
        finally:
            for route in heads:
                route.methods.add("HEAD")

    app.openapi = openapi
