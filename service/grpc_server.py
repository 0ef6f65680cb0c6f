"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (KServe v2 as Triton serves
it) on its own port (ALEXNET_GRPC_PORT, 8001 as Triton's), in the HTTP server's process and event loop.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer are served;
any other method answers UNIMPLEMENTED. ModelInfer goes the way a /v2 HTTP request goes
(protocol_serving.py): a place in the queue, its memory against the body budget, the same checks, decoding
and batches. Inputs come in ``raw_input_contents`` or ``contents``; outputs go in ``raw_output_contents``.
Errors carry the HTTP answer's message with a status code for its status (``STATUS_CODES``), and a
Retry-After becomes the trailing metadata ``retry-after`` (docs/protocol.md)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import json_format

from . import protocol_wire as protocol
from . import protocol_serving as serving
from .batcher import InferenceFailed, QueueFull
from .grpc_generated import grpc_service_pb2 as pb
from .grpc_generated import model_config_pb2
from .problems import ProblemError
from .schemas import InferenceRequest
from .service_state import ServiceState

log = logging.getLogger("service")

SERVICE = "inference.GRPCInferenceService"
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
GRACE_S = 5.0  # how long requests under way may take to finish when the service stops


def status_code(http_status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(http_status, grpc.StatusCode.INTERNAL)


class InferenceService:
    """The methods, each ``async (request message, context) → response message``."""

    def __init__(self, state: ServiceState):
        self.state = state

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.state.not_ready() is None)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        serving.check_model(request.name, request.version)  # another model: NOT_FOUND, as HTTP's 404
        return pb.ModelReadyResponse(ready=self.state.not_ready() is None)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**serving.server_metadata())

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        metadata = serving.model_metadata(serving.loaded_model(self.state, request.name, request.version))
        metadata.pop("parameters")  # the message has no field for them (HTTP's metadata has them)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        config = serving.model_config(self.state, serving.loaded_model(self.state, request.name, request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        state = self.state
        model = serving.ready_model(state, request.model_name, request.model_version)
        try:
            with state.batcher.admission(), state.body_reservation() as reservation:
                size = request.ByteSize()
                # the message, and the copies cut from it (the BYTES elements, or the FP32 tensor)
                await serving.hold(reservation, 2 * size, f"twice its {size:,}-byte message")
                parsed, parts = read_request(request)
                # gRPC answers every output as raw contents; k of a classification output as asked
                outputs = [protocol.Output(True, o.classification) for o in protocol.requested_outputs(parsed)]
                probabilities = await serving.classify(state, model, parsed, parts)
        except QueueFull as e:
            raise ProblemError(
                503, "queue-full", "the server is at capacity; retry later", {"Retry-After": str(e.retry_after)}
            ) from None
        except InferenceFailed as e:
            raise ProblemError(503, "inference-failed", str(e), {"Retry-After": "1"}) from None
        tensors = protocol.output_tensors(outputs, probabilities, model.classes)
        return pb.ModelInferResponse(
            model_name=protocol.MODEL_NAME,
            model_version=protocol.MODEL_VERSION,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(name=protocol.OUTPUT, datatype=t.datatype, shape=t.shape)
                for t in tensors
            ],
            raw_output_contents=[t.data for t in tensors],
        )


def read_request(message: pb.ModelInferRequest) -> tuple[InferenceRequest, list[bytes | None]]:
    """The message as the protocol's request (protocol.parse_request checks it as it checks HTTP's JSON), and
    each input's binary data (None: its values are in ``data``)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise protocol.bad_request(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give one each")
    inputs, parts = [], []
    for i, tensor in enumerate(message.inputs):
        fields = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters(tensor.parameters)
        if raw:
            part = raw[i]
        elif tensor.contents.bytes_contents:
            part = protocol.pack_bytes(list(tensor.contents.bytes_contents))
        elif tensor.contents.fp32_contents:
            part, fields["data"] = None, list(tensor.contents.fp32_contents)
        else:
            part = None  # no data: the protocol's checks say so
        if part is not None:
            parameters["binary_data_size"] = len(part)
        inputs.append({**fields, "parameters": parameters or None})
        parts.append(part)
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters) or None} for o in message.outputs]
    request = {
        "id": message.id or None,
        "parameters": _parameters(message.parameters) or None,
        "inputs": inputs,
        "outputs": outputs or None,
    }
    parsed = protocol.parse_request(request)
    return parsed, parts


def _parameters(parameters) -> dict:
    """A protobuf map of InferParameter → plain values (bool, int, str, float)."""
    values = {}
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        values[name] = getattr(parameter, which) if which else None
    return values


def _handler(method: Callable[..., Awaitable], request_type) -> grpc.RpcMethodHandler:
    """``method`` as a unary gRPC method whose ProblemErrors become status codes (and other errors INTERNAL,
    logged)."""

    async def handle(request, context: grpc.aio.ServicerContext):
        try:
            return await method(request, context)
        except ProblemError as e:
            if e.headers and "Retry-After" in e.headers:
                context.set_trailing_metadata((("retry-after", e.headers["Retry-After"]),))
            await context.abort(status_code(e.status), e.detail)
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):  # context.abort's own way out
                raise
            log.exception("unhandled error while serving gRPC %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); it has been logged")

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
    )


def handlers(state: ServiceState) -> grpc.GenericRpcHandler:
    service = InferenceService(state)
    methods = {
        "ServerLive": pb.ServerLiveRequest,
        "ServerReady": pb.ServerReadyRequest,
        "ModelReady": pb.ModelReadyRequest,
        "ServerMetadata": pb.ServerMetadataRequest,
        "ModelMetadata": pb.ModelMetadataRequest,
        "ModelConfig": pb.ModelConfigRequest,
        "ModelInfer": pb.ModelInferRequest,
    }
    return grpc.method_handlers_generic_handler(
        SERVICE, {name: _handler(getattr(service, name), request) for name, request in methods.items()}
    )


async def start(state: ServiceState) -> grpc.aio.Server:
    """The gRPC server on ALEXNET_HOST:ALEXNET_GRPC_PORT, started; OSError when the port cannot be bound."""
    settings = state.settings
    # At most queue_size calls at once (more: RESOURCE_EXHAUSTED), so that at most that many messages are held
    # before a call reaches the queue and the body budget, as HTTP bodies are admitted before they are read.
    server = grpc.aio.server(
        maximum_concurrent_rpcs=settings.queue_size,
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a port shared with another server
        ],
    )
    server.add_generic_rpc_handlers((handlers(state),))
    address = (
        f"[{settings.host}]:{settings.grpc_port}" if ":" in settings.host else f"{settings.host}:{settings.grpc_port}"
    )
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's way of saying the port could not be bound
        raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) on %s", address, extra={"fields": {"event": "grpc_started"}})
    return server
