"""What the Open Inference Protocol's two transports share, HTTP/REST (routes/inference_protocol.py) and gRPC
(grpc_server.py): the model a request names, its metadata and configuration, the memory a request holds
against the body budget, and the classification itself (decoding, the batcher, the metrics).

Errors are ``ProblemError``s; each transport turns them into its own form ({"error": …} bodies, gRPC status
codes). Each transport takes the request's place in the batcher's queue (``Batcher.admission``) itself,
before it holds the request's memory, because only it knows what to do with a refused request."""

from __future__ import annotations

import torch

import model as model_package

from . import protocol_wire as protocol
from .engine import LoadedModel, Task
from .problems import ProblemError
from .schemas import InferenceRequest
from .service_state import ServiceState
from .uploads import Upload


def server_metadata() -> dict:
    return {"name": "alexnet-api", "version": model_package.__version__, "extensions": list(protocol.EXTENSIONS)}


def check_model(model_name: str, model_version: str | None = None) -> None:
    """404 for any model but ours, or a version (empty: none named) but ours."""
    if model_name != protocol.MODEL_NAME:
        raise ProblemError(404, None, f"unknown model {model_name[:100]!r}: this server serves {protocol.MODEL_NAME!r}")
    if model_version and model_version != protocol.MODEL_VERSION:
        raise ProblemError(
            404,
            None,
            f"{protocol.MODEL_NAME!r} has no version {model_version[:100]!r}, only {protocol.MODEL_VERSION!r}",
        )


def loaded_model(state: ServiceState, model_name: str, model_version: str | None) -> LoadedModel:
    """The model for metadata and configuration: loaded is enough, they need no forward pass."""
    check_model(model_name, model_version)
    loaded = state.model
    if loaded is None:
        raise ProblemError(503, None, "no model is loaded yet", {"Retry-After": "1"})
    return loaded


def ready_model(state: ServiceState, model_name: str, model_version: str | None) -> LoadedModel:
    """The model an inference (or a readiness check) uses: 404 for another model or version, before (whatever
    the readiness, as a v2 client expects) the readiness check every endpoint shares (503)."""
    check_model(model_name, model_version)
    model = state.ready_model()
    if model is None:
        raise ProblemError(503, "not-ready", "the model is not loaded yet", {"Retry-After": "1"})
    return model


def model_metadata(loaded: LoadedModel) -> dict:
    """The protocol's model metadata: name, versions, platform, inputs and outputs, and how to preprocess."""
    preprocessing = loaded.preprocessor.config
    crop = preprocessing.crop
    return {
        "name": protocol.MODEL_NAME,
        "versions": [protocol.MODEL_VERSION],
        "platform": protocol.PLATFORM,
        "inputs": [
            {"name": protocol.IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]},  # [N] is taken too
            {"name": protocol.TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, crop, crop]},
        ],
        "outputs": [{"name": protocol.OUTPUT, "datatype": "FP32", "shape": [-1, len(loaded.classes)]}],
        "parameters": protocol.input_description(preprocessing),
    }


def model_config(state: ServiceState, loaded: LoadedModel) -> dict:
    """Triton's model configuration of ``loaded`` as this service serves it (protocol_wire.model_config)."""
    return protocol.model_config(
        crop=loaded.preprocessor.config.crop,
        classes=len(loaded.classes),
        max_request_batch=state.settings.max_files,
        max_wait_ms=state.settings.max_wait_ms,
    )


async def hold(reservation, need: int, how: str) -> None:
    """Hold ``need`` bytes of the body budget for this request (what its body, parsed, takes: ``how`` says
    what makes it up). 413 when that can never fit the budget, 503 when not now."""
    budget = reservation.budget
    if need <= budget.capacity and await reservation.grow_to(need):
        return
    if need > budget.capacity:
        raise ProblemError(
            413,
            "body-too-large",
            f"parsing this request needs about {need / 2**20:,.0f} MiB ({how}), more than request bodies may hold "
            f"({budget.capacity / 2**20:,.0f} MiB, ALEXNET_BODY_MEMORY_BYTES)",
        )
    raise ProblemError(
        503, "memory-busy", "request bodies in memory are at the limit; retry later", {"Retry-After": "1"}
    )


async def classify(
    state: ServiceState, model: LoadedModel, request: InferenceRequest, parts: list[bytes | None]
) -> torch.Tensor:
    """The probabilities [N, classes] for the request's one input (``parts``: each input's binary data, or
    None), decoded and batched as /classify's images are, and counted in the metrics."""
    inputs = protocol.read_inputs(
        request, parts, crop=model.preprocessor.config.crop, max_elements=state.settings.max_files
    )
    if inputs.images is not None:
        images = await state.decoder.decode(model, [Upload(None, data) for data in inputs.images])
        task = Task.probabilities("center")
    else:
        images, task = list(inputs.tensor.unbind(0)), Task.probabilities_of_inputs()
    probabilities = await state.batcher.infer(model, images, task)
    if not bool(probabilities.isfinite().all()):  # NaN or infinite values in an FP32 input
        raise ProblemError(422, None, "the input gives non-finite probabilities: is every value a finite number?")
    state.metrics.images.inc("center", amount=len(inputs))
    return probabilities
