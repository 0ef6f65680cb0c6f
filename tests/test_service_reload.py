"""A server started without a checkpoint: the untrained fallback, the full queue, then hot reload.

The tests share one server and run in file order: untrained first, then checkpoints appear.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import httpx
import pytest
import torch
from support.service import (
    Direct,
    assert_problem,
    assert_same_predictions,
    metric_value,
    write_checkpoint,
)

from model.files import atomic_write
from service import engine


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reload") / "checkpoints"  # checkpoints/best.safetensors: the default path
    directory.mkdir()
    return directory


@pytest.fixture(scope="module")
def server(directory, module_live_service):
    return module_live_service(
        "--threads", "1",
        "--decode-workers", "1",
        "--queue-size", "2",
        "--max-batch", "4",
        env={"ALEXNET_RELOAD_INTERVAL_S": "0.1"},
        cwd=directory.parent,  # the default path, directory / "best.safetensors": the only one with a fallback
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def classify(client, data: bytes) -> dict:
    response = client.post("/classify", files={"file": ("photo.jpg", data)})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_without_a_checkpoint_serves_an_untrained_net_and_says_so(client, server, photos):
    assert "NO CHECKPOINT" in server.log()
    info = client.get("/model").json()
    assert info["model"]["trained"] is False and info["model"]["checkpoint"] is None
    assert info["architecture"]["width"] == 1.0 and info["num_classes"] == 1000  # the paper's full net
    body = classify(client, photos[0].read_bytes())
    assert body["model"]["trained"] is False and body["model"]["sha256"] is None
    assert len(body["results"][0]["predictions"]) == 5
    assert info["provenance"]["init_seed"] == engine.UNTRAINED_SEED
    filters = client.get("/model/filters.png")  # the untrained net's kernels: no sha256 to key them by
    assert filters.status_code == 200 and filters.headers["etag"].startswith('"conv1-untrained-')
    # Seeded: this process builds the same net, so another start gives the same answer.
    here = engine.untrained((torch.device("cpu"),))
    (expected,) = here.predict([[here.preprocessor.load(photos[0].read_bytes())]], ["center"], 1)
    assert_same_predictions(body["results"][0], expected[0])


def test_full_queue_answers_503_with_retry_after(server, photos):
    """queue_size=2 and the full-size net: a burst of 16 requests overflows, the rest are answered."""
    data = photos[3].read_bytes()

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/classify", files={"file": ("a.jpg", data)}) for _ in range(16)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "a burst of 16 requests should overflow a queue of 2"
    assert all(r.status_code in (200, 503) for r in responses)
    for response in refused:
        assert_problem(response, 503, "queue-full")
        assert int(response.headers["retry-after"]) >= 1
    assert any(r.status_code == 200 for r in responses)
    metrics = httpx.get(server.url + "/metrics").text
    assert metric_value(metrics, "alexnet_queue_rejections_total") == len(refused)


def test_hot_reload_switches_without_failing_a_request(client, server, directory, photos):
    path = directory / "best.safetensors"
    data = photos[4].read_bytes()
    first = write_checkpoint(directory / "first.safetensors", seed=11, epoch=1)
    second = write_checkpoint(directory / "second.safetensors", seed=12, epoch=2)
    expected = {hashlib.sha256(p.read_bytes()).hexdigest(): Direct(p).probabilities(data) for p in (first, second)}

    # Traffic throughout: every answer must be a 200 from a model whose identity matches its predictions.
    stop, answers, failures = threading.Event(), [], []

    def traffic():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                response = c.post("/classify", files={"file": ("photo.jpg", data)})
                (answers if response.status_code == 200 else failures).append(response)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        # Training writes its checkpoints atomically (write a temporary file, rename it over the old).
        atomic_write(path, first.read_bytes())
        sha_first = wait_for(lambda: client.get("/model").json()["model"]["sha256"], what="the first checkpoint")
        assert sha_first == hashlib.sha256(first.read_bytes()).hexdigest()

        # A broken file replaces it: rejected, logged, and the first model keeps serving.
        atomic_write(path, first.read_bytes()[:50_000])
        wait_for(lambda: "rejected the new checkpoint" in server.log(), what="the rejection log line")
        assert client.get("/model").json()["model"]["sha256"] == sha_first
        assert client.get("/readyz").status_code == 200

        atomic_write(path, second.read_bytes())
        sha_second = hashlib.sha256(second.read_bytes()).hexdigest()
        wait_for(lambda: client.get("/model").json()["model"]["sha256"] == sha_second, what="the second checkpoint")
        time.sleep(0.3)  # a few more requests on the new model
    finally:
        stop.set()
        worker.join()

    assert not failures, [f.text for f in failures]
    seen = set()
    for response in answers:
        body = response.json()
        sha = body["model"]["sha256"]
        seen.add(sha)
        if sha is not None:  # None: the untrained net, before the first checkpoint arrived
            assert_same_predictions(body["results"][0], expected[sha])
    assert set(expected) <= seen, "traffic should have been answered by both checkpoints"

    # What is cached per model follows the reload: conv1's picture (and its ETag), Grad-CAM's net.
    filters = client.get("/model/filters.png")
    assert filters.headers["etag"] == f'"conv1-{sha_second}"'
    assert filters.content == engine.load(second, (torch.device("cpu"),)).filters_png
    assert client.get("/model/filters.png", headers={"If-None-Match": f'"conv1-{sha_first}"'}).status_code == 200
    explained = client.post("/explain", params={"format": "json"}, files={"file": ("photo.jpg", data)})
    assert explained.status_code == 200 and explained.json()["model"]["sha256"] == sha_second
    assert explained.json()["explained"]["index"] == int(expected[sha_second].argmax())

    metrics = client.get("/metrics").text
    assert metric_value(metrics, "alexnet_model_reloads_total", result="ok") == 2
    assert metric_value(metrics, "alexnet_model_reloads_total", result="failed") == 1
    info = client.get("/model").json()
    assert info["model"]["trained"] is True and info["model"]["epoch"] == 2 and info["architecture"]["width"] == 0.125
