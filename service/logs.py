"""Logs: one JSON object per line (the default; uvicorn's own messages included) or, for a person at a
terminal, one plain line (``ALEXNET_LOG_FORMAT=text``); and the access log.

An access line says the method, path, route, status, duration, client and query (docs/serving.md, "Logs",
shows one in each format). Probes and scrapes (PROBE_ROUTES) that succeed are logged at debug: under
Kubernetes they come every few seconds, and a line each would bury the requests that matter. A failing
probe stays at info."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

from starlette.routing import Match

from .disconnects import CLIENT_CLOSED, ClientPresence
from .metrics import ServiceMetrics, method_label

access_log = logging.getLogger("service.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line for a person: local time, level, logger, message, then the fields the message leaves out."""

    SAID = frozenset({"method", "path", "status"})  # an access line's message already says these

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S")
        line = f"{when}.{int(record.msecs):03d} {record.levelname:<5} {record.name}  {record.getMessage()}"
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in self.SAID and v not in (None, ""))
        if extra:
            line += "  " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}


def configure(level: str, log_format: str = "json") -> None:
    """Lines on stderr for every logger, uvicorn's included (it is started with log_config=None): JSON
    objects, or plain text for a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[log_format]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


UNMATCHED = "unmatched"
# The routes that Kubernetes probes and Prometheus scrapes call every few seconds.
PROBE_ROUTES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


def route_template(scope) -> str:
    """The path template of the route that answered (``/classify``, ``/static/{name}``, ``/openapi.json``),
    or ``unmatched`` when no route matches the path: a 404, or the 307 that redirects ``/model/`` to
    ``/model``. The template, not the raw path: unknown paths must not create a metric series each.

    FastAPI records the route in the scope for its own routes (``@router.get``) only; the others, such as
    the ``/openapi.json`` route FastAPI adds itself, are found by matching the request against the app's
    routes again, as the router did: a full match first, else the first method-only match (its 405)."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    partial = None
    for route in getattr(scope.get("router"), "routes", ()):
        match, child_scope = route.matches(scope)
        if match is Match.FULL:
            return _template(route, child_scope)
        if match is Match.PARTIAL and partial is None:
            partial = _template(route, child_scope)
    return partial or UNMATCHED


def _template(route, child_scope) -> str:
    # An included router's match names the route inside it; a plain route is its own template.
    return getattr(child_scope.get("route"), "path", None) or getattr(route, "path", None) or UNMATCHED


class ObserveRequests:
    """ASGI middleware: an access-log line and the request metrics for every HTTP request."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500
        answer = None  # the status of an answer the client was gone for (then status is CLIENT_CLOSED)
        presence = ClientPresence(receive)

        async def send_and_observe(message):
            nonlocal status, answer
            if message["type"] == "http.response.start":
                status = message["status"]
                if await presence.gone():
                    status, answer = CLIENT_CLOSED, status
            await send(message)

        try:
            await self.app(scope, presence.receive, send_and_observe)
        finally:
            seconds = time.perf_counter() - started
            route_name = route_template(scope)
            method = scope["method"]
            self.metrics.requests.inc(method_label(method), route_name, str(status))
            self.metrics.latency.observe(seconds, method_label(method), route_name)
            client = scope.get("client")
            routine = route_name in PROBE_ROUTES and status < 400
            access_log.log(
                logging.DEBUG if routine else logging.INFO,
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={
                    "fields": {
                        "method": method,
                        "path": scope["path"],
                        "route": route_name,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                        "client": client[0] if client else None,
                        "query": scope.get("query_string", b"").decode("latin-1")[:200],
                        # 499: the client closed the connection first; this answer was never delivered
                        **({"undelivered_status": answer} if answer is not None else {}),
                    }
                },
            )


def identity_summary(identity) -> tuple[str, dict]:
    """What a log line says of the served weights (a schemas.ModelIdentity): in words, and as JSON fields."""
    text = (
        f"trained={identity.trained}, epoch {identity.epoch}, val top-1 error {identity.val_top1_error}, "
        f"top-5 {identity.val_top5_error}"
    )
    fields = {
        "sha256": identity.sha256,
        "trained": identity.trained,
        "val_top1_error": identity.val_top1_error,
        "val_top5_error": identity.val_top5_error,
    }
    return text, fields
