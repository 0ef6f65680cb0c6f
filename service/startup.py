"""How a start-up that fails ends the process: one line saying why, and an exit status per cause.

Statuses (docs/http.md lists them for users): 0 a clean shutdown; 1 any other start-up failure; 2 invalid
settings, or a worst case that does not fit the memory limit; 3 an unusable checkpoint, or an explicitly
given path with no file (only the default path falls back to an untrained net); 4 the port cannot be
listened on; 5 the device is not available.
The port is bound first (``listen_socket``), so a port in use is found before the model loads. The rest
fail in the application's lifespan, which logs one line; ``QuietStartupFailure`` and
``quiet_uvicorn_startup_failure`` keep uvicorn from adding its traceback and a second message."""

from __future__ import annotations

import logging
import socket

from model import CheckpointError
from model.devices import DeviceError

from .memory import MemoryDoesNotFit

EXIT_FAILED = 1
EXIT_SETTINGS = 2
EXIT_CHECKPOINT = 3
EXIT_PORT = 4
EXIT_DEVICE = 5


class PortUnavailable(OSError):
    """The host and port cannot be listened on; the message says which and why."""


def exit_status(error: BaseException) -> int:
    """The exit status for an error that stopped the start-up."""
    if isinstance(error, MemoryDoesNotFit):
        return EXIT_SETTINGS  # settings that cannot work, like an invalid one
    if isinstance(error, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(error, DeviceError):
        return EXIT_DEVICE
    return EXIT_FAILED


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, for uvicorn to listen on (as uvicorn binds one itself)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on the connections it accepts only when the listening
    # socket says TCP. Without it every answer sent in two writes waited for the client's delayed ACK
    # (~40 ms more per request at one client; BENCHMARKS.md, "Service").
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop may bind
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class _NotTheFailureAgain(logging.Filter):
    """Drops uvicorn's "Application startup failed. Exiting.": the lifespan's line has said so, and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Application startup failed")


def quiet_uvicorn_startup_failure() -> None:
    logging.getLogger("uvicorn.error").addFilter(_NotTheFailureAgain())


class QuietStartupFailure:
    """ASGI wrapper: the lifespan's start-up failure is reported without its traceback. Starlette sends the
    traceback as the failure's message, and uvicorn logs it (some 5 KB) after the line the lifespan logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_quietly(message):
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_quietly)
