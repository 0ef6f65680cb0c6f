"""The FastAPI application: its routes, its error handlers, and its lifespan, which starts and stops the
service's state (service_state.py: the model, the batcher, the decode and explain threads, the reload watcher)."""

from __future__ import annotations

import contextlib
import gc
import logging

from fastapi import Depends, FastAPI

import model as model_package

from . import openapi, problems
from .framing import CloseAmbiguousFraming
from .head import AnswerHead
from .logs import ObserveRequests
from .routes import ROUTERS
from .routes.dependencies import known_query_parameters
from .settings import Settings
from .startup import QuietStartupFailure, exit_status
from .service_state import ServiceState

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
        grpc_server = None
        if settings.grpc_port:
            try:
                from . import grpc_server as grpc_module  # imported here: grpcio loads only when gRPC is on

                grpc_server = await grpc_module.start(state)
            except Exception as e:
                log.error("cannot start the service: %s", e, extra={"fields": {"event": "startup_failed"}})
                await state.stop()
                raise
        # Everything made so far (FastAPI's routes, pydantic's validators, torch's modules) lives as long as
        # the process: moved out of the collector's generations, its full passes, which the allocations of
        # each request trigger, stop walking it. About 2 ms less per request at 1 client (BENCHMARKS.md).
        gc.freeze()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grpc_module.GRACE_S)
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
        dependencies=[Depends(known_query_parameters)],  # every route: an unknown query parameter is a 422
    )
    app.state.service = state
    problems.install(app)
    openapi.install(app, settings.max_files)
    app.add_middleware(AnswerHead)
    app.add_middleware(CloseAmbiguousFraming)
    app.add_middleware(QuietStartupFailure)
    app.add_middleware(ObserveRequests, metrics=state.metrics)  # added last: outermost, it sees every answer
    for router in ROUTERS:
        app.include_router(router)
    return app
