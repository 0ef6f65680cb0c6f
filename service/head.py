"""HEAD wherever GET is (RFC 9110 §9.1): uptime checkers send HEAD to /healthz; FastAPI's routes answer
HEAD with 405 unless they declare it.

``AnswerHead`` routes a HEAD request as the GET it stands for, and sends GET's status and headers
(Content-Length included) without the body. HEAD stays out of the OpenAPI schema, as it is implicit
wherever GET is; 405 answers list it in Allow beside GET.
"""

from __future__ import annotations


class AnswerHead:
    """ASGI middleware, inside ObserveRequests: the method is GET while the app routes and answers (the
    scope itself, so the route found is the one the access log and the metrics read), HEAD again after."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = scope["method"] == "HEAD"

        async def send_as_asked(message):
            if message["type"] == "http.response.start" and message["status"] == 405:
                message = {**message, "headers": [_allow_head(h) for h in message.get("headers", [])]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        if head:
            scope["method"] = "GET"
        try:
            await self.app(scope, receive, send_as_asked)
        finally:
            if head:
                scope["method"] = "HEAD"


def with_head(methods: list[str]) -> list[str]:
    """The methods a path answers, HEAD included wherever GET is."""
    if "GET" in methods and "HEAD" not in methods:
        methods = [*methods[: methods.index("GET") + 1], "HEAD", *methods[methods.index("GET") + 1 :]]
    return methods


def _allow_head(header: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    name, value = header
    if name.lower() != b"allow":
        return header
    methods = with_head([m.strip() for m in value.decode("latin-1").split(",")])
    return name, ", ".join(methods).encode("latin-1")
