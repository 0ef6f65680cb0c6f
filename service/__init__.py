"""The HTTP classification API: ``python -m service``, or ``create_app(Settings(...))`` for any ASGI server."""

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]


def __getattr__(name: str):
    # Imported on first use: `python -m service --help` and a settings error answer without loading torch.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
