"""Every error is an RFC 9457 problem+json body: ``{type, title, status, detail}``.

``type`` is ``urn:alexnet:problem:<slug>`` for the errors this service defines and ``about:blank`` for plain
HTTP errors (unknown path, wrong method), where the status says it all. docs/api.md lists them, in a table
that scripts/docs_tables.py generates from the raises in this package.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model import CorruptImage, ImageError, ImageTooLarge, UnsupportedImage

from .head import with_head
from .schemas import Problem

log = logging.getLogger("service")

MEDIA_TYPE = "application/problem+json"

# What each kind of bad image answers. The model package names the kinds (its ImageError subclasses) and
# knows nothing of HTTP; the statuses and problem types are this service's choice, made here.
IMAGE_PROBLEMS: dict[type[ImageError], tuple[int, str]] = {
    ImageTooLarge: (413, "image-too-large"),  # more pixels (or decoding memory) than allowed: a limit
    UnsupportedImage: (415, "unsupported-image"),  # not a format we read
    CorruptImage: (422, "invalid-image"),  # empty, truncated or corrupt data
}
OTHER_IMAGE_PROBLEM = (422, "invalid-image")  # an ImageError of no kind above


class ProblemError(Exception):
    """Raise anywhere in a request to answer with this status and a problem+json body."""

    def __init__(self, status: int, slug: str | None, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = headers or {}


def problem_response(status: int, slug: str | None, detail: str, headers: dict[str, str] | None = None):
    body = Problem(
        type=f"urn:alexnet:problem:{slug}" if slug else "about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers, media_type=MEDIA_TYPE)


def _problem_media_type(schema: dict) -> dict:
    """FastAPI documents every response model as application/json; Problem bodies go out as problem+json."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                body = content.get("application/json", {})
                if body.get("schema", {}).get("$ref", "").endswith("/Problem"):
                    content.pop("application/json")
                    content[MEDIA_TYPE] = body
    return schema


def image_problem(error: ImageError, source: str) -> ProblemError:
    """A model.ImageError for one uploaded image (``source`` names it), as IMAGE_PROBLEMS answers its kind."""
    kind = next((k for k in IMAGE_PROBLEMS if isinstance(error, k)), None)
    status, slug = IMAGE_PROBLEMS[kind] if kind is not None else OTHER_IMAGE_PROBLEM
    return ProblemError(status, slug, f"{source}: {error}")


def method_hint(method: str, path: str, allow: str) -> tuple[str, str]:
    """A 405's detail, naming the methods the path answers (``GET /classify`` → use POST), and its Allow
    header with the methods in a stable order."""
    methods = sorted(with_head(sorted({m.strip().upper() for m in allow.split(",") if m.strip()})))
    detail = f"{method} is not served at {path}: use {' or '.join(methods)} (every operation is listed at /docs)"
    return detail, ", ".join(methods)


def install(app: FastAPI) -> None:
    """Route FastAPI's own errors and anything unexpected to problem+json, and say so in the OpenAPI schema."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _problem_media_type(generate())
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(exc.status, exc.slug, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and "Allow" in headers:
            detail, headers["Allow"] = method_hint(request.method, request.url.path, headers["Allow"])
        return problem_response(exc.status_code, None, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body"))
            problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return problem_response(422, "invalid-parameter", "; ".join(problems))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not bad input. Logged with its traceback; the client still gets a well-formed answer.
        log.exception("unhandled error while serving %s %s", request.method, request.url.path)
        return problem_response(500, "internal-error", f"internal error ({type(exc).__name__}); it has been logged")
