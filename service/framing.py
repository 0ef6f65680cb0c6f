"""A request framed two ways at once closes its connection (RFC 9112 §6.3).

A request with both ``Transfer-Encoding`` and ``Content-Length`` is the request-smuggling pattern: a proxy in
front that trusts the other header sees a different end of the body, and what it takes for body bytes this
server would read as the next request. h11 (uvicorn's parser) reads such a body as chunked, as the RFC says,
but keeps the connection open, so a request pipelined behind it is answered too. The RFC requires the
server to close the connection after answering such a request; ``CloseAmbiguousFraming`` makes uvicorn do
so by adding ``Connection: close`` to the answer (h11 then closes once it is sent).
"""

from __future__ import annotations

CLOSE = (b"connection", b"close")


def framed_two_ways(headers) -> bool:
    names = {name.lower() for name, _ in headers}
    return b"transfer-encoding" in names and b"content-length" in names


class CloseAmbiguousFraming:
    """ASGI middleware: ``Connection: close`` on the answer to a request with both framing headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not framed_two_ways(scope["headers"]):
            return await self.app(scope, receive, send)

        async def send_and_close(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, CLOSE]}
            await send(message)

        await self.app(scope, receive, send_and_close)
