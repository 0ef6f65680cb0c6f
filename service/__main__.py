"""``python -m service [--host H] [--port P] [--checkpoint FILE] …``: serve the API with uvicorn.

Flags override ``ALEXNET_*`` environment variables, which override the defaults (see settings.py).
Exit status (service/startup.py; docs/http.md): 0 after a clean shutdown, 1 for another start-up failure,
2 for invalid settings (or settings whose worst case does not fit the cgroup's memory limit), 3 for an
unusable checkpoint (a path given explicitly where there is no file included), 4 when the port cannot be
listened on, 5 when the device is not available. Each failure is one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .settings import Settings, SettingsError


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        allow_abbrev=False,  # --por is not --port: a whole flag name or an error
        description="AlexNet classification API. Every flag can also be set as ALEXNET_<NAME> in the environment.",
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help = f"{field.description} (ALEXNET_{name.upper()}, default {default})"
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help)
    return vars(parser.parse_args(argv))


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.load(**parse_args(argv))
    except SettingsError as e:
        print(f"python -m service: {e}", file=sys.stderr)
        return 2

    # Idle OpenMP threads sleep instead of spinning. The forward pass shares the cores with the decode
    # threads and the event loop; spinning workers would steal their time, and a decode thread holding a
    # core would stall the forward at every barrier. Set before torch loads OpenMP; the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn  # imported here: --help and settings errors answer without loading torch

    from .app import create_app
    from .logs import configure
    from .startup import EXIT_FAILED, EXIT_PORT, PortUnavailable, listen_socket, quiet_uvicorn_startup_failure

    # The port first: one in use is an answer in milliseconds, not after the model's load and warm-up.
    try:
        sock = listen_socket(settings.host, settings.port)
    except PortUnavailable as e:
        print(f"python -m service: {e}", file=sys.stderr)
        return EXIT_PORT
    configure(settings.log_level, settings.log_format)
    quiet_uvicorn_startup_failure()
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it found
    # installed. This one turns that into exit status 0: a requested, clean shutdown is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_config=None,  # our JSON logging (configure) handles uvicorn's loggers too
        log_level=settings.log_level,
        access_log=False,  # service.logs.ObserveRequests writes the access log
        timeout_graceful_shutdown=30,
        # Named, not uvicorn's "auto": auto takes httptools and uvloop whenever they are installed (kserve's
        # dependencies bring them). The service's HTTP behaviour is h11's and is tested as such: it answers
        # unknown methods with 405, and framing.py's smuggling guard relies on how h11 reads the body.
        http="h11",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    try:
        with sock:
            server.run(sockets=[sock])
    except SystemExit:
        if server.started:  # a shutdown (SIGTERM: _exit_cleanly)
            raise
        # uvicorn exits 3 for any start-up failure; the lifespan logged why, in one line, and chose the status
    if not server.started:
        return getattr(app.state, "startup_exit_status", None) or EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
