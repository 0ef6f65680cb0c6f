"""Whether the client was still there to read the answer.

A client that closes its side of the connection (a half-close after a complete request included) makes
uvicorn drop the answer silently: the application's ``send`` returns as if it had been delivered. Logs and
metrics must not count such a request as answered, so the answer's status is recorded as ``CLIENT_CLOSED``
(499, nginx's "client closed request"; never sent, since there is no one to send it to).
"""

from __future__ import annotations

import anyio

CLIENT_CLOSED = 499


class ClientPresence:
    """Wraps an ASGI ``receive``: remembers a disconnect the application saw, and looks for one without
    waiting (``gone``) when the answer is about to be sent."""

    def __init__(self, receive):
        self._receive = receive
        self.disconnected = False

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
        return message

    async def gone(self) -> bool:
        """Whether the client has gone, asked without waiting. Called when the answer starts, after the
        application has read the body it wanted; a request message still pending (a body it did not read) is
        dropped, and the next one looked at, a few times at most."""
        for _ in range(3):
            if self.disconnected:
                break
            message = None
            with anyio.CancelScope() as scope:
                scope.cancel()  # a message ready now is returned; waiting for one is cancelled at once
                message = await self.receive()
            if message is None:  # nothing ready: the client is still there
                break
        return self.disconnected
