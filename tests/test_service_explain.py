"""POST /explain over real HTTP: Grad-CAM of one image as a PNG overlay or JSON, equal to
model.visualize.grad_cam of the same preprocessed image computed here; the class by wnid or index; its own
concurrency limit (503 + Retry-After, never a queue) that leaves /classify answering; every bad request
refused as /classify refuses it. (That the map lands on the right object: tests/test_model_visualize.py.)"""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from support.corpus import corpus_request, write_corpus
from support.service import (
    Direct,
    assert_problem,
    hostile_requests,
    metric_value,
    same_refusal,
    write_checkpoint,
)

from model.visualize import grad_cam, overlay
from service.settings import Settings, SettingsError

LIMITS = {"max_body_bytes": 1_000_000, "max_files": 4, "max_pixels": 2_000_000}
CROP = 224


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "small.safetensors"
    return write_checkpoint(path, seed=2, width=0.125, mean_image=True, epoch=4)


@pytest.fixture(scope="module")
def direct(checkpoint):
    return Direct(checkpoint)


@pytest.fixture(scope="module")
def towers(direct):
    """The two-tower net Grad-CAM runs, built here from the same checkpoint."""
    return direct.checkpoint.build()


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    return module_live_service(
        "--threads", "1",
        "--decode-workers", "2",
        "--reload-interval-s", "0",
        checkpoint=checkpoint,
        env={"ALEXNET_EXPLAIN_CONCURRENCY": "1", **{f"ALEXNET_{k.upper()}": str(v) for k, v in LIMITS.items()}},
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def explain(client, data: bytes, name: str = "photo.jpg", **params) -> httpx.Response:
    return client.post("/explain", params=params, files={"file": (name, data)})


def expected_cam(direct: Direct, towers, data: bytes, class_index: int | None = None):
    x = direct.preprocessor.from_bytes(data)
    return grad_cam(towers, x, class_index)


def centre_crop(direct: Direct, data: bytes) -> Image.Image:
    image = direct.preprocessor.load(data)  # uint8 [3, 256, 256]
    offset = (image.shape[-1] - CROP) // 2
    crop = image[:, offset : offset + CROP, offset : offset + CROP].permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (CROP, CROP), crop.numpy().tobytes())


# Answers --------------------------------------------------------------------------------------------------


def test_png_is_the_overlay_on_the_centre_crop(client, direct, towers, photos):
    for path in photos[:4]:
        data = path.read_bytes()
        response = explain(client, data)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"  # never sniffed as anything else
        with Image.open(io.BytesIO(response.content)) as image:
            assert image.format == "PNG" and image.size == (CROP, CROP) and image.mode == "RGB"
            got = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).int()
        heat, index, probability = expected_cam(direct, towers, data)
        assert int(response.headers["x-class-index"]) == index
        assert response.headers["x-class-wnid"] == direct.checkpoint.classes[index].wnid
        assert float(response.headers["x-class-probability"]) == pytest.approx(probability, rel=1e-4)
        want = torch.frombuffer(bytearray(overlay(centre_crop(direct, data), heat).tobytes()), dtype=torch.uint8).int()
        difference = (got - want).abs()
        assert difference.max() <= 2 and difference.float().mean() < 0.05, (path.name, difference.max())


def test_json_map_shape_range_and_class(client, direct, towers, photos):
    data = photos[6].read_bytes()
    response = explain(client, data, format="json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"] == client.get("/model").json()["model"]
    assert body["size"] == CROP
    heatmap = torch.tensor(body["heatmap"], dtype=torch.float64)
    assert heatmap.shape == (CROP, CROP)
    # Scaled to its maximum on conv5's 13×13 grid, then upsampled bilinearly: in [0, 1], its peak near 1.
    assert heatmap.min() >= 0 and 0.9 < heatmap.max() <= 1.0
    assert all(v == round(v, 3) for row in body["heatmap"][:5] for v in row)
    heat, index, probability = expected_cam(direct, towers, data)
    torch.testing.assert_close(heatmap, heat.double(), rtol=0, atol=2e-3)
    image_class = direct.checkpoint.classes[index]
    explained = body["explained"]
    assert explained == {
        "index": index,
        "wnid": image_class.wnid,
        "label": image_class.label,
        "probability": pytest.approx(probability, rel=1e-4),
    }
    # The default class is /classify's top class (centre crop), with its score.
    (top,) = client.post("/classify", params={"top_k": 1}, files={"file": ("a.jpg", data)}).json()["results"]
    assert top["predictions"][0]["index"] == index
    assert top["predictions"][0]["score"] == pytest.approx(explained["probability"], rel=1e-3)


def test_the_class_by_wnid_or_index(client, direct, towers, photos):
    data = photos[1].read_bytes()
    classes = direct.checkpoint.classes
    index = 281 if classes[281].wnid == "n02123045" else 7  # tabby, in ImageNet's sorted order
    by_index = explain(client, data, format="json", class_index=index).json()
    by_wnid = explain(client, data, format="json", wnid=classes[index].wnid).json()
    for body in (by_index, by_wnid):
        assert body["explained"]["index"] == index and body["explained"]["wnid"] == classes[index].wnid
        assert body["explained"]["label"] == classes[index].label
    assert by_index["heatmap"] == by_wnid["heatmap"]
    heat, _, probability = expected_cam(direct, towers, data, index)
    torch.testing.assert_close(torch.tensor(by_index["heatmap"], dtype=torch.float64), heat.double(), rtol=0, atol=2e-3)
    assert by_index["explained"]["probability"] == pytest.approx(probability, rel=1e-4)
    top = explain(client, data, format="json").json()["explained"]["index"]
    assert top != index or by_index["explained"]["probability"] > 0
    png = explain(client, data, wnid=classes[999].wnid)
    assert png.status_code == 200 and int(png.headers["x-class-index"]) == 999


def test_a_raw_body_too(client, photos):
    response = client.post("/explain", content=photos[2].read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


# Parameters, limits and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, named",
    [
        ({"class_index": 1000}, "class_index"),  # out of range: 1000 classes
        ({"class_index": -1}, "class_index"),
        ({"class_index": "tabby"}, "class_index"),
        ({"wnid": "n99999999"}, "wnid"),  # not one of the model's classes
        ({"wnid": ""}, "wnid"),
        ({"format": "gif"}, "format"),
        ({"class_index": 5, "wnid": "n01440764"}, "not both"),
    ],
)
def test_bad_parameters_are_422(client, photos, params, named):
    body = assert_problem(explain(client, photos[0].read_bytes(), **params), 422, "invalid-parameter")
    assert named in body["detail"], body


def test_one_image_per_request(client, photos):
    data = photos[0].read_bytes()
    two = client.post("/explain", files=[("file", ("a.jpg", data)), ("file", ("b.jpg", data))])
    assert "one image" in assert_problem(two, 413, "too-many-files")["detail"]


def test_hostile_requests_are_refused_as_classify_refuses_them(client, photos):
    photo = photos[3].read_bytes()
    limits = {"max_body_bytes": LIMITS["max_body_bytes"], "max_files": LIMITS["max_files"]}
    for name in hostile_requests(photo, **limits):
        classify = client.post("/classify", **hostile_requests(photo, **limits)[name])
        response = client.post("/explain", **hostile_requests(photo, **limits)[name])
        try:
            same_refusal(classify, response, detail=name != "too-many-files")
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert client.get("/readyz").status_code == 200


def test_the_hostile_corpus_gets_the_answers_classify_gives(client, tmp_path):
    """Every entry of tests/corpus/make_corpus.py: what /classify refuses, /explain refuses alike; what it
    answers for one image, /explain draws; a form of several images is one too many for /explain."""
    wrong = {}
    for entry in write_corpus(tmp_path):
        request = corpus_request(entry, (tmp_path / entry["name"]).read_bytes())
        classify, response = client.post("/classify", **request), client.post("/explain", **request)
        try:
            if classify.status_code == 200 and len(classify.json()["results"]) == 1:
                assert response.status_code == 200, response.text[:200]
                assert response.headers["content-type"] == "image/png"
            elif classify.status_code == 200:
                assert_problem(response, 413, "too-many-files")
            else:
                same_refusal(classify, response, detail=False)
        except AssertionError as e:
            wrong[entry["name"]] = str(e)[:300]
    assert not wrong, json.dumps(wrong, indent=1)
    assert client.get("/readyz").status_code == 200


def test_a_second_explanation_at_once_is_503_with_retry_after(client, server, photos):
    """ALEXNET_EXPLAIN_CONCURRENCY=1: while one explanation is under way (here: its body still arriving,
    which holds its place as a Grad-CAM does), the next is refused at once — and /classify and /embed are
    answered meanwhile. Once it is done, the next one is accepted."""
    data = photos[4].read_bytes()
    release, answers = threading.Event(), []

    def slow_body():
        yield data[:1000]
        release.wait(30)
        yield data[1000:]

    def first():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            answers.append(c.post("/explain", content=slow_body(), headers={"Content-Type": "image/jpeg"}))

    def explaining() -> float:
        return metric_value(client.get("/metrics").text, "alexnet_queue_depth", kind="explaining")

    rejected_before = metric_value(client.get("/metrics").text, "alexnet_explain_rejections_total")
    worker = threading.Thread(target=first)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while explaining() < 1:
            assert time.monotonic() < deadline, "the first explanation was never admitted"
            time.sleep(0.02)
        second = explain(client, data)
        body = assert_problem(second, 503, "explain-busy")
        assert int(second.headers["retry-after"]) >= 1 and "ALEXNET_EXPLAIN_CONCURRENCY" in body["detail"]
        assert client.post("/classify", files={"file": ("a.jpg", data)}).status_code == 200
        assert client.post("/embed", files={"file": ("a.jpg", data)}).status_code == 200
    finally:
        release.set()
        worker.join()
    (answer,) = answers
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    assert explaining() == 0
    assert explain(client, data).status_code == 200
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "alexnet_explain_rejections_total") == rejected_before + 1
    assert metric_value(metrics, "alexnet_http_requests_total", method="POST", route="/explain", status="503") >= 1
    assert metric_value(metrics, "alexnet_images_explained_total", format="png") >= 1
    assert metric_value(metrics, "alexnet_explain_duration_seconds_count") >= 1


def test_the_setting():
    assert Settings.load({}).explain_concurrency == 1
    assert Settings.load({"ALEXNET_EXPLAIN_CONCURRENCY": "3"}).explain_concurrency == 3
    assert Settings.load({}, explain_concurrency="2").explain_concurrency == 2
    for bad in ("0", "many"):
        with pytest.raises(SettingsError, match="ALEXNET_EXPLAIN_CONCURRENCY"):
            Settings.load({"ALEXNET_EXPLAIN_CONCURRENCY": bad})
    assert "503" in Settings.model_fields["explain_concurrency"].description


def test_openapi_documents_explain(client):
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert {p["name"] for p in operation["parameters"]} == {"class_index", "wnid", "format"}
    content = operation["responses"]["200"]["content"]
    assert set(content) == {"image/png", "application/json"}
    assert content["application/json"]["schema"]["$ref"].endswith("/ExplainResponse")
    files = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert "exactly one image" in files["description"] and "413 too-many-files" in files["description"]
    assert "ALEXNET_EXPLAIN_CONCURRENCY" in operation["responses"]["503"]["description"]
    assert set(schema["components"]["schemas"]["ExplainResponse"]["properties"]) == {
        "model", "explained", "size", "heatmap", "timing",
    }  # fmt: skip


# /classify while Grad-CAM runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size_server(tmp_path_factory, module_live_service):
    """No checkpoint: the paper's full-size (untrained) net, whose Grad-CAM takes a good fraction of a second
    on one CPU thread — long enough to classify while it runs."""
    directory = tmp_path_factory.mktemp("explain-full")
    return module_live_service(
        "--threads", "1",
        "--decode-workers", "1",
        "--reload-interval-s", "0",
        cwd=directory,  # no checkpoint there: the untrained full-size net
    )  # fmt: skip


def test_classify_answers_while_an_explanation_runs(full_size_server, photos):
    """Grad-CAM runs in its own thread: classifications sent while explanations are being computed are
    answered (200) before those explanations finish, not after."""
    url = full_size_server.url
    data = photos[5].read_bytes()
    explanations: list[tuple[float, float, int]] = []
    done = threading.Event()

    def explain_repeatedly():
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(4):
                started = time.monotonic()
                status = c.post("/explain", files={"file": ("a.jpg", data)}).status_code
                explanations.append((started, time.monotonic(), status))
        done.set()

    worker = threading.Thread(target=explain_repeatedly)
    classifications: list[tuple[float, float, int]] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/classify", files={"file": ("a.jpg", data)})  # warm connections
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while metric_value(client.get("/metrics").text, "alexnet_queue_depth", kind="explaining") < 1:
                assert time.monotonic() < deadline, "no explanation started"
                time.sleep(0.01)
            while not done.is_set() and time.monotonic() < deadline + 60:
                started = time.monotonic()
                status = client.post("/classify", files={"file": ("b.jpg", data)}).status_code
                classifications.append((started, time.monotonic(), status))
        finally:
            worker.join()
    assert [status for *_, status in explanations] == [200] * 4
    assert classifications and all(status == 200 for *_, status in classifications)
    inside = [c for c in classifications if any(e_start < c[0] and c[1] < e_end for e_start, e_end, _ in explanations)]
    spans = [round(end - start, 3) for start, end, _ in explanations]
    print(f"explanations took {spans} s; {len(inside)} of {len(classifications)} classifications inside one")
    assert inside, f"no classification finished during an explanation (explanations took {spans} s)"
    longest_explanation = max(end - start for start, end, _ in explanations)
    assert max(end - start for start, end, _ in classifications) < longest_explanation


@pytest.mark.slow
def test_the_explain_net_is_built_once_and_goes_with_its_model(checkpoint, photos):
    """Built on the first explanation (not at load), reused, and freed with its LoadedModel when nothing
    refers to that any more (a hot reload drops the old model)."""
    import gc
    import weakref

    from service import engine

    model = engine.load(checkpoint, (torch.device("cpu"),))
    assert not model.explainer.built
    image = model.preprocessor.load(photos[0].read_bytes())
    first = model.explain(image)
    net = model.explainer.net()
    assert model.explainer.built and type(net).__name__ == "AlexNet"
    second = model.explain(image, first.class_index)
    assert model.explainer.net() is net and torch.equal(first.heat, second.heat)
    assert first.heat.shape == (CROP, CROP) and first.crop.size == (CROP, CROP)
    with torch.inference_mode():  # the inference net is left as it was: no hooks, no autograd state
        (probabilities,) = model.predict([[image]], ["center"], 1)
    assert int(probabilities.argmax()) == first.class_index
    assert float(probabilities[0, first.class_index]) == pytest.approx(first.probability, rel=1e-4)
    gone = weakref.ref(net)
    del model, net
    gc.collect()
    assert gone() is None


@pytest.mark.slow
def test_the_explain_net_has_the_served_weights_without_keeping_a_second_copy(checkpoint, tmp_path, photos):
    """Until the first explanation the loaded model keeps no copy of the checkpoint's tensors: the net is
    built from the file it was loaded from (held open: renamed over or deleted, it is still that file), or
    for the untrained net from its seed. A file rewritten in place is not used: WeightsUnavailable."""
    import shutil

    from model.files import atomic_write
    from service import engine

    def conv1(net) -> torch.Tensor:
        return net.grouped_state_dict()["conv1.weight"]

    path = tmp_path / "served.safetensors"
    shutil.copy(checkpoint, path)
    model = engine.load(path, (torch.device("cpu"),))
    atomic_write(path, write_checkpoint(tmp_path / "other.safetensors", seed=9, width=0.125).read_bytes())
    assert torch.equal(conv1(model.explainer.net()), model.conv1_weight)  # the file it was loaded from

    moved = engine.load(path, (torch.device("cpu"),))
    path.unlink()
    assert torch.equal(conv1(moved.explainer.net()), moved.conv1_weight)

    rewritten = engine.load(shutil.copy(checkpoint, path), (torch.device("cpu"),))
    path.write_bytes((tmp_path / "other.safetensors").read_bytes())  # in place: the same inode, other bytes
    with pytest.raises(engine.WeightsUnavailable, match="rewritten"):
        rewritten.explainer.net()

    untrained = engine.untrained((torch.device("cpu"),))
    assert torch.equal(conv1(untrained.explainer.net()), untrained.conv1_weight)
    image = untrained.preprocessor.load(photos[0].read_bytes())
    explanation = untrained.explain(image)
    (probabilities,) = untrained.predict([[image]], ["center"], 1)
    assert explanation.class_index == int(probabilities.argmax())
