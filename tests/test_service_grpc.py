"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService), through Triton's own client
(tritonclient.grpc) against a live server: health, metadata, configuration, inference of real photos equal to
the model package's, the limits and the error status codes."""

from __future__ import annotations

import socket
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from support.service import Direct, metric_value, write_checkpoint
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

LIMITS = {"ALEXNET_MAX_FILES": "3", "ALEXNET_MAX_BODY_BYTES": "2000000"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("grpc") / "small.safetensors", seed=7, width=0.125)


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    return module_live_service("--threads", "1", "--reload-interval-s", "0", checkpoint=checkpoint, env=LIMITS)


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def images(photos: list[bytes], shape: list[int] | None = None) -> triton.InferInput:
    shape = shape or [len(photos), 1]
    tensor = triton.InferInput("image", shape, "BYTES")
    return tensor.set_data_from_numpy(np.array(photos, dtype=np.object_).reshape(shape))


def refused(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_health_and_server_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("alexnet") and client.is_model_ready("alexnet", "1")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata == httpx.get(server.url + "/v2").json()


def test_model_metadata_and_config_are_https(client, server):
    """The same metadata (less the preprocessing parameters, which the message has no field for) and the
    same configuration as over HTTP; protobuf's JSON writes int64 as strings."""
    over_http = httpx.get(server.url + "/v2/models/alexnet").json()
    metadata = client.get_model_metadata("alexnet", "1", as_json=True)
    for tensor in metadata["inputs"] + metadata["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    assert metadata == {k: v for k, v in over_http.items() if k != "parameters"}

    config = client.get_model_config("alexnet", as_json=True)["config"]
    over_http = httpx.get(server.url + "/v2/models/alexnet/config").json()
    assert config["max_batch_size"] == over_http["max_batch_size"] == 3  # ALEXNET_MAX_FILES
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["input"] + config["output"]] == [
        (t["name"], t["dims"]) for t in over_http["input"] + over_http["output"]
    ]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": "100000"}


def test_bytes_inference_equals_the_model_packages(client, checkpoint, photos):
    """Three JPEGs in raw_input_contents: all probabilities, then the top 5 as classification strings."""
    direct = Direct(checkpoint)
    data = [p.read_bytes() for p in photos[:3]]
    expected = np.stack([direct.probabilities(d).numpy() for d in data])
    result = client.infer("alexnet", [images(data)], request_id="grpc-1")
    assert result.get_response().id == "grpc-1" and result.get_response().model_version == "1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=5e-4, atol=1e-6)

    top = triton.InferRequestedOutput("probabilities", class_count=5)
    rows = client.infer("alexnet", [images(data, [3])], outputs=[top]).as_numpy("probabilities")
    assert rows.shape == (3, 5)
    for row, probabilities in zip(rows, expected):
        assert [int(e.decode().split(":")[1]) for e in row] == list(np.argsort(-probabilities)[:5])


def test_fp32_input_is_classified_as_preprocessed(client, checkpoint, photos):
    direct = Direct(checkpoint)
    data = photos[0].read_bytes()
    x = direct.preprocessor.from_bytes(data).numpy()  # [1, 3, 224, 224]
    tensor = triton.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)
    result = client.infer("alexnet", [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(result[0], direct.probabilities(data).numpy(), rtol=5e-4, atol=1e-6)


def test_images_are_counted_in_the_metrics(client, server, photos):
    def count() -> float:
        return metric_value(httpx.get(server.url + "/metrics").text, "alexnet_images_classified_total", crops="center")

    before = count()
    client.infer("alexnet", [images([photos[1].read_bytes()] * 2)])
    assert count() == before + 2


def test_errors_have_status_codes(client, photos):
    photo = photos[0].read_bytes()
    status, message = refused(lambda: client.infer("resnet", [images([photo])]))
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'resnet'" in message
    status, message = refused(lambda: client.get_model_config("alexnet", "2"))
    assert status == "StatusCode.NOT_FOUND" and "no version '2'" in message
    # what /v2 over HTTP refuses with 422 and 415
    status, message = refused(lambda: client.infer("alexnet", [images([photo[: len(photo) // 3]])]))
    assert status == "StatusCode.INVALID_ARGUMENT", message
    status, message = refused(lambda: client.infer("alexnet", [images([b"not an image"])]))
    assert status == "StatusCode.INVALID_ARGUMENT", message
    wrong = triton.InferInput("pixels", [1, 1], "BYTES").set_data_from_numpy(np.array([[photo]], dtype=np.object_))
    status, message = refused(lambda: client.infer("alexnet", [wrong]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown input 'pixels'" in message
    # the limits: more images than ALEXNET_MAX_FILES (HTTP: 413), a message over ALEXNET_MAX_BODY_BYTES
    status, message = refused(lambda: client.infer("alexnet", [images([photo] * 4)]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "more than 3" in message
    status, message = refused(lambda: client.infer("alexnet", [images([b"\xff" * 2_100_000])]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED", message


def test_methods_not_served_are_unimplemented(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        statistics = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        with pytest.raises(grpc.RpcError) as caught:
            statistics(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_off(checkpoint, live_service):
    service = live_service("--grpc-port", "0", "--reload-interval-s", "0", checkpoint=checkpoint)
    assert httpx.get(service.url + "/readyz").status_code == 200
    with grpc.insecure_channel(service.grpc_url) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=2)


def test_grpc_waits_in_the_same_queue_as_http(checkpoint, live_service, photos):
    """With the one queue place held by an HTTP /v2 request whose body never finishes, a gRPC inference is
    refused UNAVAILABLE with retry-after; once the body times out, the place is free for gRPC."""
    flags = ("--queue-size", "1", "--body-timeout-s", "3", "--reload-interval-s", "0")
    service = live_service(*flags, checkpoint=checkpoint)
    request = service_pb2.ModelInferRequest(
        model_name="alexnet",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1, 1])],
        raw_input_contents=[len(data := photos[0].read_bytes()).to_bytes(4, "little") + data],
    )
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled, grpc.insecure_channel(service.grpc_url) as channel:
        stalled.sendall(b"POST /v2/models/alexnet/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        with pytest.raises(grpc.RpcError) as caught:
            infer(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "capacity" in caught.value.details()
        assert int(dict(caught.value.trailing_metadata())["retry-after"]) >= 1
        stalled.settimeout(30)
        assert stalled.recv(100).startswith(b"HTTP/1.1 408")  # the body timeout frees the place
        assert len(infer(request, timeout=60).raw_output_contents[0]) == 4 * 1000
