"""The Open Inference Protocol (KServe v2 / Triton HTTP/REST) under /v2, beside /classify: health, server and
model metadata, and inference through the same limits, decoding, queue and batcher as /classify.

Every failure under /v2 answers the protocol's ``{"error": "…"}`` (application/json) with the status
/classify gives the same cause, not problem+json: the routes' own class converts the errors raised in them,
and a last route answers the paths under /v2 that no route has (404, or 405 with Allow for a wrong method).
The body framing and the tensors are ``service.protocol_wire``'s business."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import protocol_wire as protocol
from .. import protocol_serving as serving
from ..problems import ProblemError
from ..schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ProtocolError,
    ServerMetadata,
)
from ..service_state import ServiceState
from ..uploads import read_body
from .dependencies import ReadyModel, State
from .images import admitted

log = logging.getLogger("service")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ProtocolRoute(APIRoute):
    """A route whose errors answer ``{"error": …}``: the app's handlers (service/problems.py) would make them
    problem+json, which /v2 clients (tritonclient reads ``error``) do not understand."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def handle_protocol_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except ProblemError as e:
                return error_response(e.status, e.detail, e.headers)
            except RequestValidationError as e:  # only the Inference-Header-Content-Length header is validated
                return error_response(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
            except StarletteHTTPException as e:
                detail = e.detail if isinstance(e.detail, str) else HTTPStatus(e.status_code).phrase
                return error_response(e.status_code, detail, getattr(e, "headers", None))
            except Exception as e:  # a bug: logged, and still a well-formed protocol answer
                log.exception("unhandled error while serving %s %s", request.method, request.url.path)
                return error_response(500, f"internal error ({type(e).__name__}); it has been logged")

        return handle_protocol_errors


router = APIRouter(tags=["inference protocol (v2)"], route_class=ProtocolRoute)


def errors(**texts: str) -> dict:
    """OpenAPI ``responses`` for these errors (``e404="…"``), each a protocol error body."""
    return {int(k[1:]): {"model": ProtocolError, "description": text} for k, text in texts.items()}


NOT_READY = "not ready: starting, shutting down, or the batching worker stopped (Retry-After)"
UNKNOWN_MODEL = f"no such model or version (the one model is {protocol.MODEL_NAME!r}, version {protocol.MODEL_VERSION})"
INFER_ERRORS = errors(
    e400=f"not JSON, not an inference request, or {protocol.HEADER_LENGTH} / binary_data_size that do not fit the body",
    e404=UNKNOWN_MODEL,
    e408="the body did not arrive within the body timeout",
    e413="body too large, more images than ALEXNET_MAX_FILES, or an image with too many pixels",
    e415="an element that is not an image format we read, or a Content-Encoding (compression) we do not",
    e422="corrupt, truncated or empty image; an unknown input or output, a wrong datatype, shape or data count",
    e503="queue full (see Retry-After), or " + NOT_READY,
)


# The one model and version, as the schema names them; any other is answered 404
# (protocol_serving.check_model), not 400.
ModelName = Annotated[str, Path(json_schema_extra={"enum": [protocol.MODEL_NAME]})]
ModelVersion = Annotated[str, Path(json_schema_extra={"enum": [protocol.MODEL_VERSION]})]


# Health and metadata --------------------------------------------------------------------------------------


@router.get("/v2", response_model=ServerMetadata, summary="Server metadata (Open Inference Protocol)")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata.model_validate(serving.server_metadata())


# The protocol says the status alone answers; KServe's InferenceRESTClient also reads {"live": true} and
# {"ready": true}, as KServe's own servers answer. Clients that read only the status ignore the body.
class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


@router.get("/v2/health/live", response_model=ServerLive, summary="The server is live")
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ServerReady,
    summary="The server is ready (as /readyz)",
    responses=errors(e503=NOT_READY),
)
async def server_ready(model: ReadyModel) -> ServerReady:
    return ServerReady(ready=True)


async def _model_ready(state: ServiceState, model_name: str, model_version: str | None) -> ModelReady:
    serving.ready_model(state, model_name, model_version)
    return ModelReady(name=protocol.MODEL_NAME, ready=True)


READY = {"response_model": ModelReady, "responses": errors(e404=UNKNOWN_MODEL, e503=NOT_READY)}


@router.get("/v2/models/{model_name}/ready", summary="The model is ready", **READY)
async def model_ready(state: State, model_name: ModelName) -> ModelReady:
    return await _model_ready(state, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="This model version is ready", **READY)
async def model_version_ready(state: State, model_name: ModelName, model_version: ModelVersion) -> ModelReady:
    return await _model_ready(state, model_name, model_version)


def _model_metadata(state: ServiceState, model_name: str, model_version: str | None) -> ModelMetadata:
    return ModelMetadata.model_validate(serving.model_metadata(serving.loaded_model(state, model_name, model_version)))


METADATA = {"response_model": ModelMetadata, "responses": errors(e404=UNKNOWN_MODEL, e503="no model loaded yet")}


@router.get("/v2/models/{model_name}", summary="Model metadata: inputs, outputs", **METADATA)
async def model_metadata(state: State, model_name: ModelName) -> ModelMetadata:
    return _model_metadata(state, model_name, None)


@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model version metadata", **METADATA)
async def model_version_metadata(state: State, model_name: ModelName, model_version: ModelVersion) -> ModelMetadata:
    return _model_metadata(state, model_name, model_version)


def _model_config(state: ServiceState, model_name: str, model_version: str | None) -> dict:
    return serving.model_config(state, serving.loaded_model(state, model_name, model_version))


CONFIG = {
    "responses": {
        200: {
            "description": "the model's configuration in Triton's form (model_config.proto as JSON): name, platform, "
            "max_batch_size, inputs and outputs with dims (no batch dimension), dynamic_batching",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **errors(e404=UNKNOWN_MODEL, e503="no model loaded yet"),
    }
}


@router.get("/v2/models/{model_name}/config", summary="Model configuration (Triton's model config)", **CONFIG)
async def model_config(state: State, model_name: str) -> JSONResponse:
    return JSONResponse(_model_config(state, model_name, None))


@router.get("/v2/models/{model_name}/versions/{model_version}/config", summary="Model version configuration", **CONFIG)
async def model_version_config(state: State, model_name: str, model_version: str) -> JSONResponse:
    return JSONResponse(_model_config(state, model_name, model_version))


# Inference ------------------------------------------------------------------------------------------------


def _inline(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` written in place: the body is read by hand, so FastAPI does not
    put the request's models into the OpenAPI components, where ``$ref``s would have to point."""
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def _request_schema() -> dict:
    """InferenceRequest's schema, with what this model accepts: exactly one input, ``image`` (BYTES) or
    ``input`` (FP32). The parser (InferenceRequest) takes any name and datatype, so that a wrong one is
    answered with read_inputs' message, which says what this model takes."""
    schema = _inline(InferenceRequest.model_json_schema())
    inputs = schema["properties"]["inputs"]
    inputs["maxItems"] = 1
    properties = inputs["items"]["properties"]
    properties["name"]["enum"] = [protocol.IMAGE_INPUT, protocol.TENSOR_INPUT]
    properties["datatype"]["enum"] = ["BYTES", "FP32"]
    return schema


INFER = {
    "response_class": Response,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": f"the JSON inference request, followed by binary tensor data when {protocol.HEADER_LENGTH} "
            "says where the JSON ends",
            "content": {
                "application/json": {"schema": _request_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    "responses": {
        200: {
            "description": "the outputs: JSON, or (some output with binary_data) the JSON response followed by the "
            f"binary tensor data, {protocol.HEADER_LENGTH} giving the JSON's length",
            "model": InferenceResponse,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **INFER_ERRORS,
    },
}
HEADER = Header(
    None, alias=protocol.HEADER_LENGTH, ge=1, description="the length of the JSON when binary tensor data follow it"
)


@router.post("/v2/models/{model_name}/infer", summary="Classify images (Open Inference Protocol)", **INFER)
async def infer(request: Request, state: State, model_name: ModelName, header_length: int | None = HEADER) -> Response:
    return await _infer(request, state, model_name, None, header_length)


@router.post("/v2/models/{model_name}/versions/{model_version}/infer", summary="Classify, this version", **INFER)
async def infer_version(
    request: Request,
    state: State,
    model_name: ModelName,
    model_version: ModelVersion,
    header_length: int | None = HEADER,
) -> Response:
    return await _infer(request, state, model_name, model_version, header_length)


async def _infer(
    request: Request, state: ServiceState, model_name: str, model_version: str | None, header_length: int | None
) -> Response:
    model = serving.ready_model(state, model_name, model_version)
    settings = state.settings
    # Admitted before the body is read, as /classify (routes/images.py, batched): at most queue_size bodies,
    # and each one's memory (the body, then what parsing it takes) held against the body budget.
    async with admitted(request, state):
        with state.body_reservation() as reservation:
            limits = {"max_body_bytes": settings.max_body_bytes, "timeout": settings.body_timeout_s}
            body = await read_body(request, reservation=reservation, **limits)
            header, binary = protocol.split_body(body, header_length)
            # Beside the body: its JSON as Python objects (up to JSON_BYTES_PER_BYTE times the JSON's size:
            # FP32 data in JSON) and a copy of its binary data (the cut elements, or the tensor).
            await serving.hold(
                reservation,
                len(body) + len(header) * protocol.JSON_BYTES_PER_BYTE + len(binary),
                f"{protocol.JSON_BYTES_PER_BYTE}× its {len(header):,}-byte JSON; send tensor data with the binary "
                "extension",
            )
            parsed = protocol.parse_request(header)
            outputs = protocol.requested_outputs(parsed)
            probabilities = await serving.classify(state, model, parsed, protocol.binary_parts(parsed, binary))

    content, json_length = protocol.encode_response(parsed, outputs, probabilities, model.classes)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={protocol.HEADER_LENGTH: str(json_length)})


# Anything else under /v2 ----------------------------------------------------------------------------------

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@router.api_route("/v2/{path:path}", methods=METHODS, include_in_schema=False)
async def elsewhere(request: Request, path: str) -> Response:
    """A path under /v2 no route above serves: 405 (with Allow) if one serves it with another method, else 404.
    For a 405 the request is counted under that route's template, as the app counts other 405s."""
    allowed, matched = set(), None
    for route in router.routes:  # this module's routes: all of /v2
        if isinstance(route, APIRoute) and route.endpoint is not elsewhere:
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                allowed |= route.methods
                matched = matched or route
    if matched is None:
        raise ProblemError(404, None, f"no endpoint {request.url.path[:200]!r} in the Open Inference Protocol")
    request.scope["route"] = matched  # the metrics' route label (service/logs.py reads it from the scope)
    raise ProblemError(
        405,
        None,
        f"{request.method} is not allowed here: {', '.join(sorted(allowed))}",
        {"Allow": ", ".join(sorted(allowed))},
    )
