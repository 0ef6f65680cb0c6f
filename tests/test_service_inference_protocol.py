"""The Open Inference Protocol under /v2, through the real Triton client (tritonclient.http) against a live
server: metadata and readiness, inference with BYTES images (binary tensor data, and JSON strings, which
can only carry UTF-8 text) and with FP32 preprocessed tensors (binary and JSON), the classification
extension equal to /classify's top-k, and every error as the protocol's ``{"error": …}`` with /classify's
status. Then the body framing and the mixed batch in-process, and the README's example as written."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from support.service import REPO, Direct, metric_value, png_header_only, write_checkpoint
from tritonclient.utils import InferenceServerException

from service import protocol_wire as protocol
from service.engine import Task
from service.problems import ProblemError
from service.schemas import InferenceRequest

LIMITS = {"max_body_bytes": 8_000_000, "max_files": 4, "max_pixels": 2_000_000, "body_timeout_s": 3}
INFER = "/v2/models/alexnet/infer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("v2") / "small.safetensors", seed=3, width=0.125)


@pytest.fixture(scope="module")
def direct(checkpoint):
    return Direct(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    return module_live_service(
        "--threads", "1",
        "--decode-workers", "2",
        "--queue-size", "2",  # two stalled bodies fill it (test_a_full_queue_and_a_stalled_body)
        "--reload-interval-s", "0",
        checkpoint=checkpoint,
        env={f"ALEXNET_{k.upper()}": str(v) for k, v in LIMITS.items()},
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def image_input(images: list[bytes], *, binary: bool = True, shape: list[int] | None = None) -> triton.InferInput:
    tensor = triton.InferInput("image", shape or [len(images)], "BYTES")
    return tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape or [len(images)]), binary)


def tensor_input(x: np.ndarray, *, binary: bool = True) -> triton.InferInput:
    return triton.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x, binary)


def top(k: int, *, binary: bool = True) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=k)]


def parse_classes(row) -> list[tuple[float, int, str]]:
    out = []
    for element in row:
        score, index, label = (element.decode() if isinstance(element, bytes) else element).split(":", 2)
        out.append((float(score), int(index), label))
    return out


def refused(call, status: int) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == str(status), caught.value
    return caught.value.message()


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


# Health and metadata --------------------------------------------------------------------------------------


def test_server_metadata_and_health(client, http):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("alexnet") and client.is_model_ready("alexnet", "1")
    assert client.get_server_metadata() == {
        "name": "alexnet-api",
        "version": http.get("/openapi.json").json()["info"]["version"],
        "extensions": ["classification", "binary_tensor_data"],
    }
    # The protocol asks only for the status; KServe's client also reads these bodies (tests/test_service_kserve.py)
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    for path in ("/v2/models/alexnet/ready", "/v2/models/alexnet/versions/1/ready"):
        assert http.get(path).json() == {"name": "alexnet", "ready": True}


def test_model_metadata(client, http):
    metadata = client.get_model_metadata("alexnet")
    assert metadata == client.get_model_metadata("alexnet", "1")
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("alexnet", ["1"], "pytorch_safetensors")
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1, 1]},  # [N] is taken too
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
    ]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    preprocessing = http.get("/model").json()["preprocessing"]
    parameters = metadata["parameters"]
    assert parameters["input_crop"] == preprocessing["crop"] and parameters["input_resize"] == preprocessing["resize"]
    assert parameters["input_mean"] == ",".join(f"{v:g}" for v in preprocessing["mean"])
    assert "minus per channel" in parameters["input_preprocessing"]


def test_model_config_is_tritons(client, http):
    """What perf_analyzer reads before it sends a request: Triton's model configuration, here through Triton's
    client, with the service's limits in it (this server: ALEXNET_MAX_FILES 4, the default 100 ms wait)."""
    config = client.get_model_config("alexnet")
    assert config == client.get_model_config("alexnet", "1") == http.get("/v2/models/alexnet/config").json()
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("alexnet", "pytorch_safetensors", 4)
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, 224, 224], "optional": True},
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [1000]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 100_000}
    # the metadata's shapes are the config's dims behind the batch dimension
    metadata = client.get_model_metadata("alexnet")
    for tensor, dims in zip(metadata["inputs"] + metadata["outputs"], config["input"] + config["output"]):
        assert tensor["shape"] == [-1, *dims["dims"]]
    assert "unknown model" in refused(lambda: client.get_model_config("resnet"), 404)
    assert "no version '2'" in refused(lambda: client.get_model_config("alexnet", "2"), 404)


def test_unknown_model_or_version_is_404(client, http):
    assert "unknown model 'resnet'" in refused(lambda: client.get_model_metadata("resnet"), 404)
    assert "no version '2'" in refused(lambda: client.get_model_metadata("alexnet", "2"), 404)
    assert not client.is_model_ready("resnet") and not client.is_model_ready("alexnet", "2")
    photo = image_input([b"x"])
    assert "unknown model" in refused(lambda: client.infer("resnet", [photo]), 404)
    assert "no version" in refused(lambda: client.infer("alexnet", [photo], model_version="7"), 404)
    assert_error(http.get("/v2/models/resnet/versions/1/ready"), 404)


def test_other_paths_and_methods_under_v2(http):
    assert "no endpoint" in assert_error(http.get("/v2/models/alexnet/stats"), 404)
    assert_error(http.get("/v2/"), 404)
    response = http.get(INFER)
    assert "GET is not allowed" in assert_error(response, 405) and response.headers["allow"] == "POST"
    assert http.delete("/v2/models/alexnet").headers["allow"] == "GET, HEAD"
    # ... and outside /v2 nothing changed: problem+json
    assert http.get("/nowhere").headers["content-type"] == "application/problem+json"


# Inference ------------------------------------------------------------------------------------------------


def test_classification_equals_classify_for_every_photo(client, http, photos):
    for path in photos:
        data = path.read_bytes()
        expected = http.post("/classify", params={"top_k": 5}, files={"file": (path.name, data)}).json()
        predictions = expected["results"][0]["predictions"]
        for binary_output in (True, False):
            result = client.infer("alexnet", [image_input([data])], outputs=top(5, binary=binary_output))
            (row,) = result.as_numpy("probabilities")  # BYTES [1, 5]
            got = parse_classes(row)
            assert [(i, label) for _, i, label in got] == [(p["index"], p["label"]) for p in predictions], path.name
            for (score, _, _), p in zip(got, predictions):
                assert math.isclose(score, p["score"], abs_tol=1e-6), (score, p)  # 6 decimals, as Triton prints
                assert re.fullmatch(r"\d\.\d{6}", f"{score:.6f}")
            response = result.get_response()
            assert response["outputs"][0]["datatype"] == "BYTES" and response["outputs"][0]["shape"] == [1, 5]


def test_probabilities_of_a_batch_equal_the_model_packages(client, direct, photos):
    images = [p.read_bytes() for p in photos[:4]]  # ALEXNET_MAX_FILES
    result = client.infer("alexnet", [image_input(images, shape=[4, 1])], request_id="batch-1")  # [N, 1] too
    response = result.get_response()
    assert response["id"] == "batch-1" and response["model_name"] == "alexnet" and response["model_version"] == "1"
    (output,) = response["outputs"]  # no outputs requested: all of them, binary (tritonclient asks so)
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [4, 1000])
    assert output["parameters"]["binary_data_size"] == 4 * 4 * 1000
    probabilities = torch.from_numpy(np.array(result.as_numpy("probabilities")))
    expected = torch.stack([direct.probabilities(data) for data in images])
    torch.testing.assert_close(probabilities, expected, rtol=5e-4, atol=1e-6)
    # JSON output: the same numbers
    as_json = client.infer(
        "alexnet", [image_input(images)], outputs=[triton.InferRequestedOutput("probabilities", False)]
    )
    assert "data" in as_json.get_response()["outputs"][0]
    torch.testing.assert_close(
        torch.from_numpy(np.array(as_json.as_numpy("probabilities"))), probabilities, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_input_preprocessed_by_the_client(client, direct, photos, binary):
    """What the metadata says the input is: the model package's preprocessing of the photo, centre crop."""
    data = [p.read_bytes() for p in photos[4:6]]
    x = torch.cat([direct.preprocessor.from_bytes(d) for d in data]).numpy()
    result = client.infer("alexnet", [tensor_input(x, binary=binary)], outputs=top(3, binary=binary))
    from_images = client.infer("alexnet", [image_input(data)], outputs=top(3))
    assert [[c[1:] for c in parse_classes(r)] for r in result.as_numpy("probabilities")] == [
        [c[1:] for c in parse_classes(r)] for r in from_images.as_numpy("probabilities")
    ]
    probabilities = torch.from_numpy(
        np.array(client.infer("alexnet", [tensor_input(x, binary=binary)]).as_numpy("probabilities"))
    )
    torch.testing.assert_close(
        probabilities, torch.stack([direct.probabilities(d) for d in data]), rtol=5e-4, atol=1e-6
    )


def test_json_bytes_are_utf8_strings(client, http):
    """In JSON a BYTES element is a string whose UTF-8 bytes are the element (Triton's rule, no base64): an
    encoded image is not UTF-8, so tritonclient will not send one that way; text reaches the decoder, which
    refuses it as /classify refuses a text file."""
    with pytest.raises(InferenceServerException, match="UTF-8"):
        image_input([b"\xff\xd8\xff\xe0 a JPEG"], binary=False)
    message = refused(lambda: client.infer("alexnet", [image_input([b"plain text"], binary=False)]), 415)
    expected = http.post("/classify", content=b"plain text", headers={"Content-Type": "image/jpeg"}).json()
    assert message == expected["detail"]


def test_images_are_counted_in_the_metrics(client, http, photos):
    before = http.get("/metrics").text
    client.infer("alexnet", [image_input([photos[0].read_bytes()] * 3)])
    after = http.get("/metrics").text
    counted = metric_value(after, "alexnet_images_classified_total", crops="center")
    assert counted == metric_value(before, "alexnet_images_classified_total", crops="center") + 3
    labels = {"method": "POST", "route": "/v2/models/{model_name}/infer", "status": "200"}
    assert metric_value(after, "alexnet_http_requests_total", **labels) >= 1
    assert metric_value(after, "alexnet_http_requests_total", method="GET", route="/v2", status="200") >= 1


# Errors ---------------------------------------------------------------------------------------------------


def test_bad_images(client, http, photos):
    photo = photos[0].read_bytes()
    assert refused(lambda: client.infer("alexnet", [image_input([photo[:400]])]), 422).startswith("image: ")
    assert "empty file" in refused(lambda: client.infer("alexnet", [image_input([b""])]), 422)
    message = refused(lambda: client.infer("alexnet", [image_input([photo, png_header_only(5000, 5000)])]), 413)
    assert message.startswith("file 2: ") and "pixels" in message  # elements are named as /classify names files
    assert "more than 4" in refused(lambda: client.infer("alexnet", [image_input([photo] * 5)]), 413)


def test_bad_tensors(client):
    x = np.zeros((1, 3, 224, 224), np.float32)
    cases = {
        "is BYTES": triton.InferInput("image", [1, 3, 224, 224], "FP32").set_data_from_numpy(x),
        "is FP32": triton.InferInput("input", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=np.object_)),
        "shape [N, 3, 224, 224]": tensor_input(np.zeros((1, 3, 227, 227), np.float32)),
        "shape [N] or [N, 1]": image_input([b"a", b"b"], shape=[1, 2]),
        "unknown input": triton.InferInput("pixels", [1], "FP32").set_data_from_numpy(np.zeros(1, np.float32)),
    }
    for expected, tensor in cases.items():
        assert expected in refused(lambda tensor=tensor: client.infer("alexnet", [tensor]), 422)
    both = [tensor_input(x), image_input([b"x"])]
    assert "exactly one input" in refused(lambda: client.infer("alexnet", both), 422)
    unknown = [triton.InferRequestedOutput("logits")]
    assert "unknown output" in refused(lambda: client.infer("alexnet", [tensor_input(x)], outputs=unknown), 422)
    for value in (np.nan, np.inf):
        bad = np.full((1, 3, 224, 224), value, np.float32)
        assert "NaN or infinite" in refused(lambda bad=bad: client.infer("alexnet", [tensor_input(bad)]), 422)
    # Finite but absurd values are the client's business: answered (the net's NaNs become 0s in oneDNN's
    # ReLU), or 422 should the probabilities come out non-finite; never a 500 or a NaN in the JSON.
    huge = np.full((1, 3, 224, 224), 3e38, np.float32)
    try:
        assert np.isfinite(client.infer("alexnet", [tensor_input(huge)]).as_numpy("probabilities")).all()
    except InferenceServerException as e:
        assert e.status() == "422" and "non-finite probabilities" in e.message()


def test_malformed_bodies(http):
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 10}}]}).encode()  # fmt: skip
    cases = {
        "not JSON": (b"{", {}),
        "an object": (b"[1]", {}),
        "no inputs": (b'{"inputs": []}', {}),
        "a header length past the end": (header, {protocol.HEADER_LENGTH: str(len(header) + 1)}),
        "a header length that is no number": (header, {protocol.HEADER_LENGTH: "ten"}),
        "binary sizes that do not add up": (header + b"\0" * 4, {protocol.HEADER_LENGTH: str(len(header))}),
    }
    for name, (content, headers) in cases.items():
        assert_error(http.post(INFER, content=content, headers=headers), 400), name
    # a BYTES element whose length runs past its data: a bad tensor
    framed = header + b"\x20\0\0\0" + b"\0" * 6
    assert "element 1 says 32 bytes" in assert_error(
        http.post(INFER, content=framed, headers={protocol.HEADER_LENGTH: str(len(header))}), 422
    )
    assert "uncompressed" in assert_error(http.post(INFER, content=b"{}", headers={"Content-Encoding": "gzip"}), 415)


def test_too_large_a_body(http):
    assert "larger than the limit" in assert_error(
        http.post(INFER, content=b"\0" * (LIMITS["max_body_bytes"] + 1)), 413
    )

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(LIMITS["max_body_bytes"] // 1_000_000 + 1):
            yield b"\0" * 1_000_000

    assert_error(http.post(INFER, content=chunks()), 413)


def stalled_body(url: str) -> socket.socket:
    """A request whose body never finishes: it holds a queue place until the body timeout."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
    return sock


def read_response(sock: socket.socket) -> tuple[str, bytes]:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head.decode(), body


def test_a_full_queue_and_a_stalled_body(server, client, http, photos):
    stalled = [stalled_body(server.url) for _ in range(2)]  # --queue-size 2
    try:
        time.sleep(0.5)
        response = http.post(INFER, content=b"{}")
        assert "capacity" in assert_error(response, 503) and int(response.headers["retry-after"]) >= 1
        refused(lambda: client.infer("alexnet", [image_input([photos[0].read_bytes()])]), 503)
        for sock in stalled:  # ALEXNET_BODY_TIMEOUT_S later: 408
            head, body = read_response(sock)
            assert head.startswith("HTTP/1.1 408"), head
            assert json.loads(body) == {"error": "the request body did not arrive within 3 s"}
    finally:
        for sock in stalled:
            sock.close()
    assert client.infer("alexnet", [image_input([photos[0].read_bytes()])]).as_numpy("probabilities").shape == (1, 1000)


def test_not_ready_is_503(checkpoint):
    """Before the lifespan has loaded the model (here: never), as /readyz says."""
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings.load({}, checkpoint=str(checkpoint), device="cpu"))

    async def requests():
        # httpx's ASGI transport runs no lifespan: the app never loads its model
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            for path in ("/v2/health/ready", "/v2/models/alexnet/ready", "/v2/models/alexnet"):
                assert_error(await c.get(path), 503)
            response = await c.post(INFER, content=b"{}")
            assert "not loaded" in assert_error(response, 503) and response.headers["retry-after"] == "1"
            assert (await c.get("/v2/health/live")).status_code == 200

    asyncio.run(requests())


# The README's example ---------------------------------------------------------------------------------------


def test_the_readme_example_runs(server):
    readme = (REPO / "docs" / "api.md").read_text()  # the README's reference moved to docs/ (issue 25)
    section = readme.split("## Open Inference Protocol", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)  # its first example
    code = code.replace("127.0.0.1:8000", server.url.removeprefix("http://"))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d\.\d{6}:\d+:", result.stdout), result.stdout


# Framing and the mixed batch, in-process ---------------------------------------------------------------------


def test_bytes_framing_round_trips():
    elements = [b"", b"a", b"\0\xff" * 300, b"tabby"]
    packed = protocol.pack_bytes(elements)
    assert packed[:4] == b"\0\0\0\0" and packed[4:9] == b"\x01\0\0\0a"
    assert protocol.unpack_bytes(packed) == elements and protocol.unpack_bytes(b"") == []
    for broken in (packed[:-1], packed + b"\x01\0"):
        with pytest.raises(ProblemError) as caught:
            protocol.unpack_bytes(broken)
        assert caught.value.status == 422


def test_split_body_and_binary_parts():
    header = b'{"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 3}},' \
             b' {"name": "b", "shape": [1], "datatype": "FP32", "data": [1.5]},' \
             b' {"name": "c", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}'  # fmt: skip
    json_part, binary = protocol.split_body(header + b"abc" + b"wxyz", len(header))
    assert json_part == header and binary == b"abcwxyz"
    assert protocol.split_body(b"{}", None) == (b"{}", b"")
    request = protocol.parse_request(json_part)
    assert protocol.binary_parts(request, binary) == [b"abc", None, b"wxyz"]
    for wrong in (b"abcwxy", b"abcwxyz!"):
        with pytest.raises(ProblemError) as caught:
            protocol.binary_parts(request, wrong)
        assert caught.value.status == 400
    for length in (0, len(header) + 8):
        with pytest.raises(ProblemError):
            protocol.split_body(header + b"abcwxyz", length)


def test_requested_outputs():
    def outputs(body: dict):
        image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}
        return protocol.requested_outputs(InferenceRequest.model_validate({"inputs": [image], **body}))

    assert outputs({}) == [protocol.Output(binary=False)]
    assert outputs({"parameters": {"binary_data_output": True}}) == [protocol.Output(binary=True)]
    wanted = {"parameters": {"binary_data_output": True},
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": False, "classification": 3}}]}  # fmt: skip
    assert outputs(wanted) == [protocol.Output(binary=False, classification=3)]
    for bad in ({"classification": -1}, {"classification": True}, {"binary_data": "yes"}):
        with pytest.raises(ProblemError):
            outputs({"outputs": [{"name": "probabilities", "parameters": bad}]})


def test_classification_strings_are_tritons():
    from model import ImageClass

    classes = (ImageClass("n1", "tench, Tinca tinca"), ImageClass("n2", "goldfish"), ImageClass("n3", "shark"))
    probabilities = torch.tensor([[0.25, 0.7, 0.05], [0.1, 0.2, 0.7]])
    shape, strings = protocol.classifications(probabilities, 5, classes)  # more than there are: all of them
    assert shape == [2, 3]
    assert strings[:3] == ["0.700000:1:goldfish", "0.250000:0:tench", "0.050000:2:shark"]
    assert strings[3] == "0.700000:2:shark"


def test_nested_json_data_is_row_major():
    assert protocol._flat([[1, [2, 3]], [], [[4]], 5]) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_a_batch_mixing_images_and_preprocessed_tensors(checkpoint, photos):
    """The batcher may put /classify's uint8 images and /v2's FP32 tensors in one forward pass."""
    from service import engine

    model = engine.load(checkpoint, (torch.device("cpu"),))
    images = [model.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    tensors = list(model.preprocessor.from_uint8(torch.stack(images[:2]), "center").unbind(0))
    tasks = [Task.probabilities("ten"), Task.probabilities_of_inputs(), Task.probabilities()]
    mixed = model.run([[images[0]], tensors, [images[2]]], tasks, max_batch=32)
    alone = [model.run([r], [t], max_batch=32)[0] for r, t in zip([[images[0]], tensors, [images[2]]], tasks)]
    for got, expected in zip(mixed, alone):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert mixed[1].shape == (2, 1000)
    (uint8_path,) = model.run([images[:2]], [Task.probabilities()], max_batch=32)
    torch.testing.assert_close(mixed[1], uint8_path, rtol=1e-4, atol=1e-6)


def test_concurrent_v2_and_classify_requests_share_batches(server, photos):
    data = photos[7].read_bytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(data)}}]}).encode()  # fmt: skip
    body = header + protocol.pack_bytes([data])

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(
                c.post(INFER, content=body, headers={protocol.HEADER_LENGTH: str(len(header))}),
                c.post("/classify", files={"file": ("a.jpg", data)}),
            )

    v2, classify = asyncio.run(both())  # --queue-size 2: both admitted
    assert v2.status_code == 200 and classify.status_code == 200, (v2.text, classify.text)
    probabilities = v2.json()["outputs"][0]["data"]
    top = max(range(len(probabilities)), key=probabilities.__getitem__)
    assert top == classify.json()["results"][0]["predictions"][0]["index"]
