"""``python -m service [--host H] [--port P] [--checkpoint FILE] …``: serve the API with uvicorn.

Flags override ``ALEXNET_*`` environment variables, which override the defaults (see settings.py).
Exit status: 0 after a clean shutdown, 2 for invalid settings (or settings whose worst case does not fit the
cgroup's memory limit), 3 when the model cannot be loaded.
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

    configure(settings.log_level, settings.log_format)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler it found
    # installed. This one turns that into exit status 0: a requested, clean shutdown is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    app = create_app(settings)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # our logging (configure) handles uvicorn's loggers too
            log_level=settings.log_level,
            access_log=False,  # service.logs.ObserveRequests writes the access log
            timeout_graceful_shutdown=30,
        )
    except SystemExit as e:
        # uvicorn exits 3 for any start-up failure; settings that cannot fit in memory are a usage error (2)
        raise SystemExit(getattr(app.state, "startup_exit_status", None) or e.code) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
