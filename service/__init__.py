"""The HTTP classification API: ``python -m service``, or ``create_app(Settings(...))`` for any ASGI server.

One /classify request, file by file (decode → batch → predict → encode):
    routes/classify.py → routes/images.py (a place in the queue, body, decode, batch) → uploads.py (the body
    under its limits) → decoding.py (images decoded in threads) → batcher.py (a shared batch) → engine.py
    (LoadedModel.run, the forward pass) → back in routes/classify.py, the top k as schemas.py's bodies.
Which module holds which idea:
    app.py the app and its lifespan · service_state.py what runs, its start and stop · settings.py every setting
    routes/ the endpoints, and what they are given (dependencies.py) · schemas.py request and response bodies
    admission.py places and Retry-After · memory.py budgets, start-up memory check · problems.py errors
    explaining.py Grad-CAM's threads · reload.py hot reload · metrics.py, logs.py what the service reports
    protocol_wire.py, protocol_serving.py, routes/inference_protocol.py, grpc_server.py: the Open Inference
    Protocol's wire format, what its transports share, HTTP, gRPC · head.py, framing.py, disconnects.py,
    openapi.py, startup.py: HTTP details, the schema, how a failed start ends
"""

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]


def __getattr__(name: str):
    # Imported on first use: `python -m service --help` and a settings error answer without loading torch.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
