"""POST /embed over real HTTP: fc6/fc7 features equal the model package's ``net.features`` of the same
preprocessed image, batching (with other embeddings and with classifications) does not change them,
normalize gives unit vectors, and every bad request is refused exactly as /classify refuses it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math

import httpx
import pytest
import torch
from support.corpus import corpus_request, write_corpus
from support.service import (
    BATCHING_FLAGS,
    SMALL_LIMITS,
    SMALL_LIMITS_ENV,
    Direct,
    assert_problem,
    assert_same_predictions,
    hostile_requests,
    metric_value,
    same_refusal,
    write_checkpoint,
)

from service import engine
from service.engine import Task

LIMITS = SMALL_LIMITS
WIDTH = 0.125  # 4096 × 0.125 = 512 units in fc6 and fc7
# Measured: the service's CPUInferenceNet (oneDNN, Winograd convolutions) and the grouped net differ by ~2e-6
# of a vector's norm (batch 1 or 10 alike, width 1/8 or full); a mix-up of images differs by ~1.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "small.safetensors"
    return write_checkpoint(path, seed=1, width=WIDTH, mean_image=True, epoch=3, val_top1_error=0.7)


@pytest.fixture(scope="module")
def direct(checkpoint):
    return Direct(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    return module_live_service(*BATCHING_FLAGS, checkpoint=checkpoint, env=SMALL_LIMITS_ENV)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@torch.inference_mode()
def expected_features(direct: Direct, data: bytes, layer: str = "fc7") -> torch.Tensor:
    """``net.features`` of the grouped net (the model package's) for the centre crop, computed here."""
    return direct.net.features(direct.preprocessor.from_bytes(data), layer)[0]


def assert_same_features(got: list[float], expected: torch.Tensor) -> None:
    features = torch.tensor(got, dtype=torch.float64)
    expected = expected.double()
    assert features.shape == expected.shape
    assert (features - expected).norm() <= TOLERANCE * expected.norm(), float(
        (features - expected).norm() / expected.norm()
    )
    torch.testing.assert_close(features, expected, rtol=TOLERANCE, atol=TOLERANCE * float(expected.abs().max()))


def embed(client, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return client.post("/embed", params=params, files=[("file", (name, data)) for name, data in files])


# Answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["fc7", "fc6"])
def test_features_equal_the_model_packages(client, direct, photos, checkpoint, layer):
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for path in photos:
        data = path.read_bytes()
        params = {} if layer == "fc7" else {"layer": layer}  # fc7 is the default
        response = embed(client, [(path.name, data)], **params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["model"] == client.get("/model").json()["model"] and body["model"]["sha256"] == sha256
        assert (body["layer"], body["normalize"], body["crops"]) == (layer, False, "center")
        assert body["dimension"] == int(4096 * WIDTH)
        (result,) = body["results"]
        assert result["filename"] == path.name and len(result["features"]) == body["dimension"]
        assert min(result["features"]) >= 0  # after the ReLU
        assert_same_features(result["features"], expected_features(direct, data, layer))
        assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0


def test_features_are_float32_values_exactly(client, photos):
    (result,) = embed(client, [("a.jpg", photos[0].read_bytes())]).json()["results"]
    values = torch.tensor(result["features"], dtype=torch.float64)
    assert torch.equal(values.float().double(), values)  # each number is a float32, printed exactly


def test_several_files_and_a_raw_body(client, direct, photos):
    chosen = [photos[2], photos[7], photos[5]]
    response = embed(client, [(p.name, p.read_bytes()) for p in chosen], layer="fc6")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in chosen]
    for path, result in zip(chosen, results):
        assert_same_features(result["features"], expected_features(direct, path.read_bytes(), "fc6"))
    data = photos[9].read_bytes()
    raw = client.post("/embed", content=data, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    (result,) = raw.json()["results"]
    assert result["filename"] is None
    assert_same_features(result["features"], expected_features(direct, data))


def test_normalize_gives_unit_vectors(client, direct, photos):
    files = [(p.name, p.read_bytes()) for p in photos[:4]]
    for layer in ("fc6", "fc7"):
        response = embed(client, files, layer=layer, normalize="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["normalize"] is True
        for (_, data), result in zip(files, body["results"]):
            features = torch.tensor(result["features"], dtype=torch.float64)
            assert features.norm().item() == pytest.approx(1.0, abs=1e-6)
            expected = expected_features(direct, data, layer)
            assert_same_features(result["features"], expected / expected.norm())


def test_batching_does_not_change_the_features(server, direct, photos):
    """Embeddings of both layers and classifications, all at once: they share forward passes (checked in
    /metrics), and each answer equals the model package's for its own image."""
    jobs = [("embed", path, layer) for path in photos for layer in ("fc7", "fc6")]
    jobs += [("classify", path, None) for path in photos[:6]]
    jobs += [("embed", path, "fc7") for path in photos[:4]]  # the same image twice in flight: no mix-up

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            def send(kind, path, layer):
                params = {"layer": layer} if layer else {}
                return client.post(f"/{kind}", params=params, files={"file": (path.name, path.read_bytes())})

            before = (await client.get("/metrics")).text
            responses = await asyncio.gather(*(send(*job) for job in jobs))
            after = (await client.get("/metrics")).text
            return before, responses, after

    before, responses, after = asyncio.run(run())
    for (kind, path, layer), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["filename"] == path.name
        if kind == "classify":
            assert_same_predictions(result, direct.probabilities(path.read_bytes()))
        else:
            assert response.json()["layer"] == layer
            assert_same_features(result["features"], expected_features(direct, path.read_bytes(), layer))
    passes = metric_value(after, "alexnet_batch_requests_count") - metric_value(before, "alexnet_batch_requests_count")
    assert 0 < passes < len(jobs), "concurrent requests should have shared forward passes"
    embedded = metric_value(after, "alexnet_images_embedded_total", layer="fc7") - metric_value(
        before, "alexnet_images_embedded_total", layer="fc7"
    )
    assert embedded == len(photos) + 4


@pytest.mark.slow
def test_one_batch_of_mixed_tasks_answers_each_as_alone(checkpoint, photos):
    """engine.LoadedModel.run: probabilities (one and ten crops) and features of both layers in one batch,
    each equal to what its request gets on its own, whatever max_batch chunks the batch into."""
    model = engine.load(checkpoint, (torch.device("cpu"),))
    images = [model.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    requests = [images[:1], images[1:], images[:2], images, images[2:]]
    tasks = [
        Task.features("fc7"),
        Task.probabilities("ten"),
        Task.features("fc6", normalize=True),
        Task.probabilities("center"),
        Task.features("fc7", normalize=True),
    ]
    for max_batch in (3, 64):
        mixed = model.run(requests, tasks, max_batch)
        for request, task, answer in zip(requests, tasks, mixed):
            (alone,) = model.run([request], [task], 64)
            assert answer.shape == alone.shape == (len(request), 1000 if task.layer == "fc8" else 512)
            torch.testing.assert_close(answer, alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))
    assert Task.features("fc6").rows_per_image == 1 and Task.probabilities("ten").rows_per_image == 10
    with pytest.raises(ValueError, match="fc6, fc7"):
        Task.features("fc8")


# Parameters, limits and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, named",
    [
        ({"layer": "fc8"}, "layer"),
        ({"layer": "conv5"}, "layer"),
        ({"layer": ""}, "layer"),
        ({"normalize": "perhaps"}, "normalize"),
        ({"crops": "ten"}, "crops"),
    ],
)
def test_bad_parameters_are_422(client, photos, params, named):
    body = assert_problem(embed(client, [("a.jpg", photos[0].read_bytes())], **params), 422, "invalid-parameter")
    assert body["detail"].startswith(f"{named}: "), body


def test_hostile_requests_are_refused_as_classify_refuses_them(client, photos):
    photo = photos[3].read_bytes()
    names = hostile_requests(photo, **_limits())
    for name in names:
        # Built anew for each request: a chunked body is a generator, good for one request.
        classify = client.post("/classify", **hostile_requests(photo, **_limits())[name])
        response = client.post("/embed", **hostile_requests(photo, **_limits())[name])
        try:
            same_refusal(classify, response)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert client.get("/readyz").status_code == 200


def _limits() -> dict:
    return {"max_body_bytes": LIMITS["max_body_bytes"], "max_files": LIMITS["max_files"]}


def test_the_hostile_corpus_gets_the_answers_classify_gives(client, tmp_path):
    """Every entry of tests/corpus/make_corpus.py: the same status (and problem type) from /embed as from
    /classify, a 200 with as many vectors as /classify has results."""
    wrong = {}
    for entry in write_corpus(tmp_path):
        request = corpus_request(entry, (tmp_path / entry["name"]).read_bytes())
        classify, response = client.post("/classify", **request), client.post("/embed", **request)
        if classify.status_code == 200:
            if response.status_code != 200 or len(response.json()["results"]) != len(classify.json()["results"]):
                wrong[entry["name"]] = f"{response.status_code}: {response.text[:200]}"
            elif not all(len(r["features"]) == 512 for r in response.json()["results"]):
                wrong[entry["name"]] = "wrong dimension"
            continue
        try:
            same_refusal(classify, response, detail=False)
        except AssertionError as e:
            wrong[entry["name"]] = str(e)[:300]
    assert not wrong, json.dumps(wrong, indent=1)
    assert client.get("/readyz").status_code == 200


# Documentation and metrics ----------------------------------------------------------------------------------


def test_openapi_documents_embed(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/embed"]["post"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == {"layer", "normalize", "crops"}
    assert parameters["layer"]["schema"]["enum"] == ["fc6", "fc7"] and parameters["layer"]["schema"]["default"] == "fc7"
    assert parameters["normalize"]["schema"]["type"] == "boolean"
    assert parameters["crops"]["schema"].get("const", parameters["crops"]["schema"].get("enum")) in (
        "center",
        ["center"],
    )
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbedResponse")
    components = schema["components"]["schemas"]
    assert set(components["EmbedResponse"]["properties"]) == {
        "model", "layer", "normalize", "crops", "dimension", "results", "timing",
    }  # fmt: skip
    assert set(components["EmbeddedImage"]["properties"]) == {"filename", "features"}
    assert "fc7" in parameters["layer"]["description"] and "Euclidean" in parameters["layer"]["description"]


def test_metrics_count_embed_as_its_own_route(client, photos):
    before = client.get("/metrics").text
    embed(client, [("a.jpg", photos[1].read_bytes())])
    embed(client, [("a.txt", b"text")])
    after = client.get("/metrics").text
    for status in ("200", "415"):
        labels = {"method": "POST", "route": "/embed", "status": status}
        assert (
            metric_value(after, "alexnet_http_requests_total", **labels)
            - metric_value(before, "alexnet_http_requests_total", **labels)
            == 1
        )


def test_nearest_neighbours_example(client, photos):
    """The README's example, in Python: each photo's nearest neighbour by Euclidean distance between fc7
    vectors is another photo, at a positive distance."""
    response = embed(client, [(p.name, p.read_bytes()) for p in photos[:4]])
    results = response.json()["results"]
    for a in results:
        distance, name = min((math.dist(a["features"], b["features"]), b["filename"]) for b in results if b is not a)
        assert distance > 0 and name != a["filename"]
