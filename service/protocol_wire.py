"""The Open Inference Protocol's wire format (KServe v2, as Triton speaks it over HTTP/REST) for this model:
what a request body holds, and the body of the answer.

A body is JSON, optionally followed by binary tensor data (Inference-Header-Content-Length says where the
JSON ends). The model takes one of two inputs: ``image`` (BYTES, encoded images, preprocessed as /classify
does) or ``input`` (FP32 [N, 3, crop, crop], already preprocessed); it gives ``probabilities`` (FP32
[N, classes]) or, with ``"classification": k``, the top k as ``"score:index:label"`` strings.
docs/api.md and docs/protocol.md specify both. Errors are ``ProblemError``s with /classify's statuses for the same
causes; the router turns them into the protocol's ``{"error": …}`` bodies."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from model import ImageClass, Preprocessing

from .problems import ProblemError
from .schemas import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

MODEL_NAME = "alexnet"
MODEL_VERSION = "1"  # one version: whatever checkpoint is being served (hot reload keeps the number)
PLATFORM = "pytorch_safetensors"  # the protocol's "<project>_<format>": informational only
EXTENSIONS = ("classification", "binary_tensor_data")
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT, TENSOR_INPUT, OUTPUT = "image", "input", "probabilities"
_LENGTH = struct.Struct("<I")


def bad_request(message: str) -> ProblemError:
    return ProblemError(400, "malformed-request", message)


# What the request's JSON takes once parsed, per byte of JSON, at most: FP32 data written as short numbers
# ("1.5,") become a Python float and a list slot each (measured 8.3×; tests/test_service_memory.py).
JSON_BYTES_PER_BYTE = 10


def bad_tensor(message: str) -> ProblemError:
    return ProblemError(422, "invalid-tensor", message)


# Binary framing ---------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, bytes]:
    """The JSON object and the binary data after it (none without ``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, b""
    if not 0 < header_length <= len(body):
        raise bad_request(f"{HEADER_LENGTH} is {header_length}: it must be 1..{len(body)} (the body's length)")
    return body[:header_length], body[header_length:]


def pack_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements as binary tensor data: each one's 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def unpack_bytes(data: bytes) -> list[bytes]:
    """The inverse of ``pack_bytes``; a length running past the end is a bad tensor."""
    elements, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise bad_tensor(f"BYTES data: {len(data) - at} byte(s) at offset {at} cannot hold a 4-byte length")
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + size > len(data):
            raise bad_tensor(f"BYTES data: element {len(elements) + 1} says {size} bytes, {len(data) - at} are left")
        elements.append(data[at : at + size])
        at += size
    return elements


def binary_parts(request: InferenceRequest, binary: bytes) -> list[bytes | None]:
    """Each input's binary data (None: it has none), cut from ``binary`` in input order."""
    parts, at = [], 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad_request(f"input {tensor.name!r}: binary_data_size must be a non-negative integer")
        parts.append(binary[at : at + size])
        at += size
    if at != len(binary):
        raise bad_request(f"the inputs' binary_data_size add up to {at} bytes, but {len(binary)} follow the JSON")
    return parts


def parse_request(header: bytes | dict) -> InferenceRequest:
    """The request: its JSON (HTTP), or its fields already read (gRPC's message, as a dict)."""
    try:
        if isinstance(header, dict):
            return InferenceRequest.model_validate(header)
        return InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        problems = []
        for error in e.errors()[:5]:
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        raise bad_request("not an inference request: " + "; ".join(problems)) from None


# Inputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What a request asks to classify: encoded images (``image``) or preprocessed tensors (``input``)."""

    images: list[bytes] | None = None
    tensor: torch.Tensor | None = None  # float32 [N, 3, crop, crop]

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else self.tensor.shape[0]


def read_inputs(request: InferenceRequest, parts: list[bytes | None], *, crop: int, max_elements: int) -> Inputs:
    if len(request.inputs) != 1:
        raise bad_tensor(f"send exactly one input, {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32)")
    (tensor,), (binary,) = request.inputs, parts
    if tensor.name not in (IMAGE_INPUT, TENSOR_INPUT):
        raise bad_tensor(f"unknown input {tensor.name[:100]!r}: this model takes {IMAGE_INPUT!r} or {TENSOR_INPUT!r}")
    if binary is not None and tensor.data is not None:
        raise bad_tensor(f"input {tensor.name!r} has both binary data and a data field")
    if binary is None and tensor.data is None:
        raise bad_tensor(f"input {tensor.name!r} has no data (no data field, no binary_data_size)")
    if tensor.name == IMAGE_INPUT:
        return Inputs(images=_images(tensor, binary, max_elements))
    return Inputs(tensor=_tensor(tensor, binary, crop, max_elements))


def _batch_size(tensor: RequestInput, max_elements: int) -> int:
    n = tensor.shape[0]
    if n == 0:
        raise bad_tensor(f"input {tensor.name!r}: shape {tensor.shape} holds no image")
    if n > max_elements:
        # /classify's limit on files per request (ALEXNET_MAX_FILES), and its status
        raise ProblemError(413, "too-many-files", f"input {tensor.name!r}: {n} images, more than {max_elements}")
    return n


def _images(tensor: RequestInput, binary: bytes | None, max_elements: int) -> list[bytes]:
    if tensor.datatype != "BYTES":
        raise bad_tensor(f"input {IMAGE_INPUT!r} is BYTES (one encoded image per element), not {tensor.datatype[:20]}")
    if len(tensor.shape) not in (1, 2) or len(tensor.shape) == 2 and tensor.shape[1] != 1:
        raise bad_tensor(f"input {IMAGE_INPUT!r}: shape [N] or [N, 1], not {tensor.shape}")
    n = _batch_size(tensor, max_elements)
    if binary is not None:
        elements = unpack_bytes(binary)
    else:
        strings = _flat(tensor.data)
        if not all(isinstance(s, str) for s in strings):
            raise bad_tensor(f"input {IMAGE_INPUT!r}: BYTES data in JSON are strings")
        try:
            elements = [s.encode("utf-8") for s in strings]
        except UnicodeEncodeError:
            raise bad_tensor(f"input {IMAGE_INPUT!r}: a string that is not valid Unicode") from None
    if len(elements) != n:
        raise bad_tensor(
            f"input {IMAGE_INPUT!r}: shape {tensor.shape} says {n} element(s), the data has {len(elements)}"
        )
    return elements


def _tensor(tensor: RequestInput, binary: bytes | None, crop: int, max_elements: int) -> torch.Tensor:
    if tensor.datatype != "FP32":
        raise bad_tensor(f"input {TENSOR_INPUT!r} is FP32 (preprocessed images), not {tensor.datatype[:20]}")
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, crop, crop]:
        raise bad_tensor(f"input {TENSOR_INPUT!r}: shape [N, 3, {crop}, {crop}], not {tensor.shape}")
    n = _batch_size(tensor, max_elements)
    count = n * 3 * crop * crop
    if binary is not None:
        if len(binary) != 4 * count:
            raise bad_tensor(
                f"input {TENSOR_INPUT!r}: shape {tensor.shape} is {4 * count} bytes of FP32, not {len(binary)}"
            )
        values = torch.from_numpy(np.frombuffer(binary, dtype="<f4").astype(np.float32))  # a copy, native order
    else:
        try:
            values = torch.tensor(tensor.data, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise bad_tensor(f"input {TENSOR_INPUT!r}: FP32 data are numbers, in a flat or rectangular array") from None
        if values.numel() != count:
            raise bad_tensor(
                f"input {TENSOR_INPUT!r}: shape {tensor.shape} is {count} numbers, the data has {values.numel()}"
            )
    # NaN would not reach the answer (oneDNN's ReLU turns it into 0): refused rather than silently classified.
    # numpy's check, not torch's, on the event loop: a torch op this size would wake its OpenMP threads.
    if not np.isfinite(values.numpy()).all():
        raise bad_tensor(f"input {TENSOR_INPUT!r}: NaN or infinite values")
    return values.view(n, 3, crop, crop)


def _flat(data: list) -> list:
    """Nested JSON arrays → one row-major list (the protocol allows either form)."""
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


# Outputs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One requested output: raw probabilities, or its top ``classification`` classes as strings."""

    binary: bool
    classification: int = 0


def requested_outputs(request: InferenceRequest) -> list[Output]:
    """What to answer with; no outputs named: every output (there is one), in the default form."""
    default_binary = _flag(request.parameters, "binary_data_output", "the request")
    if not request.outputs:
        return [Output(default_binary)]
    outputs, names = [], set()
    for output in request.outputs:
        if output.name != OUTPUT:
            raise bad_tensor(f"unknown output {output.name[:100]!r}: this model gives {OUTPUT!r}")
        if output.name in names:
            raise bad_tensor(f"output {output.name!r} is requested twice")
        names.add(output.name)
        parameters = output.parameters or {}
        binary = _flag(parameters, "binary_data", f"output {output.name!r}") if "binary_data" in parameters else None
        k = parameters.get("classification", 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise bad_tensor(f"output {output.name!r}: classification is a number of classes (an integer ≥ 1)")
        outputs.append(Output(default_binary if binary is None else binary, k))  # k = 0: not a classification
    return outputs


def _flag(parameters: dict | None, name: str, where: str) -> bool:
    value = (parameters or {}).get(name, False)
    if not isinstance(value, bool):
        raise bad_tensor(f"{where}: parameter {name} is true or false")
    return value


@dataclass(frozen=True)
class OutputTensor:
    """One answered output: its datatype, shape, and data (bytes: binary tensor data; else a JSON list)."""

    datatype: str
    shape: list[int]
    data: bytes | list


def output_tensors(
    outputs: list[Output], probabilities: torch.Tensor, classes: tuple[ImageClass, ...]
) -> list[OutputTensor]:
    """The requested outputs of these probabilities, each binary or in JSON form as requested."""
    tensors = []
    for output in outputs:
        if output.classification:
            datatype, shape, elements = "BYTES", *classifications(probabilities, output.classification, classes)
            data = pack_bytes([e.encode("utf-8") for e in elements]) if output.binary else elements
        else:
            datatype, shape = "FP32", list(probabilities.shape)
            values = probabilities.contiguous().numpy()
            data = values.astype("<f4").tobytes() if output.binary else values.ravel().tolist()
        tensors.append(OutputTensor(datatype, shape, data))
    return tensors


def encode_response(
    request: InferenceRequest, outputs: list[Output], probabilities: torch.Tensor, classes: tuple[ImageClass, ...]
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON's length when binary data follow it (else None)."""
    described, binary = [], []
    for tensor in output_tensors(outputs, probabilities, classes):
        if isinstance(tensor.data, bytes):
            binary.append(tensor.data)
            described.append(
                ResponseOutput(
                    name=OUTPUT,
                    shape=tensor.shape,
                    datatype=tensor.datatype,
                    parameters={"binary_data_size": len(tensor.data)},
                )
            )
        else:
            described.append(
                ResponseOutput(name=OUTPUT, shape=tensor.shape, datatype=tensor.datatype, data=tensor.data)
            )
    answer = InferenceResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request.id, outputs=described)
    header = answer.model_dump_json(exclude_none=True).encode()
    return (header + b"".join(binary), len(header)) if binary else (header, None)


def classifications(
    probabilities: torch.Tensor, k: int, classes: tuple[ImageClass, ...]
) -> tuple[list[int], list[str]]:
    """Triton's classification strings for each row's top min(k, classes): "score:index:label", the score
    as C++'s std::to_string prints a float (six decimals), the label our class name (/classify's label)."""
    k = min(k, probabilities.shape[1])
    scores, indices = probabilities.topk(k, dim=1)  # as /classify ranks them, ties included
    strings = [
        f"{score:f}:{index}:{classes[index].label}"
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist())
        for score, index in zip(row_scores, row_indices)
    ]
    return [probabilities.shape[0], k], strings


# Metadata -----------------------------------------------------------------------------------------------


def input_description(preprocessing: Preprocessing) -> dict[str, str | int | float]:
    """How an FP32 ``input`` must be made from an image: exactly what the service does after decoding
    (``Preprocessor.from_uint8`` on the uint8 square, centre crop)."""
    p = preprocessing
    mean = (
        f"the checkpoint's mean image [3, {p.resize}, {p.resize}] (its centre {p.crop}x{p.crop}), in {p.channel_order}"
        if p.mean == "image"
        else f"per channel {list(p.mean)} ({p.channel_order})"
    )
    return {
        "input_preprocessing": (
            f"decode, shorter side to {p.resize} ({p.resample}), central {p.resize}x{p.resize}, values 0..255 "
            f"scaled to 0..{p.pixel_scale:g}, channels in {p.channel_order} order, minus {mean}, divided by "
            f"{list(p.std)}, then the centre {p.crop}x{p.crop}; NCHW, float32"
        ),
        "input_resize": p.resize,
        "input_crop": p.crop,
        "input_channel_order": p.channel_order,
        "input_pixel_scale": p.pixel_scale,
        "input_mean": "image" if p.mean == "image" else ",".join(f"{v:g}" for v in p.mean),
        "input_std": ",".join(f"{v:g}" for v in p.std),
    }


def model_config(*, crop: int, classes: int, max_request_batch: int, max_wait_ms: float) -> dict:
    """The model's configuration as Triton serves it (GET …/config, gRPC ModelConfig): the JSON form of Triton's
    ``ModelConfig`` message (model_config.proto), which perf_analyzer reads before it sends a request.

    ``max_batch_size`` is the most elements one request may carry (ALEXNET_MAX_FILES), so ``dims`` leave out the
    batch dimension. ``image`` is one encoded image per batch element: dims [1], a request's shape [N, 1] (the
    metadata's [-1, 1]; [N] is taken too). Not dims [1] reshaped to [], as Triton would allow: perf_analyzer
    cannot send an input whose shape without the batch dimension is empty. Each input is optional because the model takes exactly one of the two. The dynamic batcher
    is the service's, which waits up to ALEXNET_MAX_WAIT_MS for more requests (its batch limit, ALEXNET_MAX_BATCH,
    counts crops and is not a preferred size, so it is not listed)."""
    return {
        "name": MODEL_NAME,
        "platform": PLATFORM,
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
        "max_batch_size": max_request_batch,
        "input": [
            {"name": IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
            {
                "name": TENSOR_INPUT,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": [3, crop, crop],
                "optional": True,
            },
        ],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [classes]}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(max_wait_ms * 1000)},
    }
