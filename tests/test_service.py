"""The service over real HTTP: answers equal the model package's, batching keeps answers apart, every
limit and error answers problem+json. One server (a small checkpoint) serves the whole module."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time

import httpx
import pytest
from PIL import Image
from support.service import (
    BATCHING_FLAGS,
    SMALL_LIMITS_ENV,
    Direct,
    assert_problem,
    assert_same_predictions,
    encode,
    metric_value,
    png_header_only,
    write_checkpoint,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("service") / "small.safetensors"
    return write_checkpoint(path, seed=1, mean_image=True, epoch=7, val_top1_error=0.61, val_top5_error=0.38)


@pytest.fixture(scope="module")
def direct(checkpoint):
    return Direct(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint, module_live_service):
    # stopped by SIGTERM after the module: graceful shutdown, exit status 0
    return module_live_service(*BATCHING_FLAGS, checkpoint=checkpoint, env=SMALL_LIMITS_ENV)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def post_files(client, files: list[tuple[str, bytes]], **params) -> httpx.Response:
    return client.post("/classify", params=params, files=[("file", (name, data)) for name, data in files])


# Answers ------------------------------------------------------------------------------------------------


def test_real_photos_match_the_model_package(client, direct, photos, checkpoint):
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for path in photos:
        data = path.read_bytes()
        response = post_files(client, [(path.name, data)])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["crops"] == "center" and body["top_k"] == 5
        assert body["model"] == {
            "checkpoint": checkpoint.name,
            "path": str(checkpoint),
            "sha256": sha256,
            "format_version": 1,
            "trained": True,
            "epoch": 7,
            "val_top1_error": 0.61,
            "val_top5_error": 0.38,
        }
        (result,) = body["results"]
        assert result["filename"] == path.name
        assert_same_predictions(result, direct.probabilities(data))
        label = direct.checkpoint.classes[result["predictions"][0]["index"]]
        assert result["predictions"][0]["wnid"] == label.wnid and result["predictions"][0]["label"] == label.label
        assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0


def test_ten_crops_average_the_papers_ten_patches(client, direct, photos):
    for path in photos[:3]:
        data = path.read_bytes()
        response = post_files(client, [(path.name, data)], crops="ten", top_k=3)
        assert response.status_code == 200, response.text
        assert response.json()["crops"] == "ten"
        assert_same_predictions(response.json()["results"][0], direct.probabilities(data, "ten"), top_k=3)


def test_raw_image_body(client, direct, photos):
    data = photos[4].read_bytes()
    response = client.post("/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] is None
    assert_same_predictions(result, direct.probabilities(data))


def test_several_files_in_one_request_answer_in_order(client, direct, photos):
    chosen = [photos[1], photos[6], photos[3]]
    response = post_files(client, [(p.name, p.read_bytes()) for p in chosen], crops="ten", top_k=2)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in chosen]
    for path, result in zip(chosen, results):
        assert_same_predictions(result, direct.probabilities(path.read_bytes(), "ten"), top_k=2)


def test_top_k_spans_one_to_all_classes(client, photos):
    data = photos[0].read_bytes()
    (one,) = post_files(client, [("a.jpg", data)], top_k=1).json()["results"]
    assert len(one["predictions"]) == 1
    (every,) = post_files(client, [("a.jpg", data)], top_k=1000).json()["results"]
    assert sorted(p["index"] for p in every["predictions"]) == list(range(1000))
    assert sum(p["score"] for p in every["predictions"]) == pytest.approx(1.0, abs=1e-4)
    assert every["predictions"][0] == one["predictions"][0]


@pytest.mark.parametrize("params", [{"top_k": 0}, {"top_k": 1001}, {"top_k": "five"}, {"crops": "four"}])
def test_bad_parameters_are_422(client, photos, params):
    body = assert_problem(post_files(client, [("a.jpg", photos[0].read_bytes())], **params), 422)
    assert next(iter(params)) in body["detail"]


def unusual_images(photo: Image.Image) -> dict[str, bytes]:
    small = photo.resize((300, 200))
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90° clockwise to view"
    frames = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen_bit = small.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    images = {
        "grayscale.jpg": encode(small.convert("L"), "JPEG"),
        "palette.png": encode(small.convert("P"), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG"),
        "16bit.png": encode(sixteen_bit, "PNG"),
        "exif-rotated.jpg": encode(small, "JPEG", exif=exif),
        "animated.gif": animated,
        "tiny.png": encode(small.resize((7, 5)), "PNG"),
        "image.bmp": encode(small, "BMP"),
        "image.tiff": encode(small, "TIFF"),
        "image.webp": encode(small, "WEBP"),
    }
    assert Image.open(__import__("io").BytesIO(images["16bit.png"])).mode.startswith("I")
    return images


def test_unusual_images_are_classified_not_rejected(client, direct, photos):
    with Image.open(photos[5]) as photo:
        images = unusual_images(photo.convert("RGB"))
    for name, data in images.items():
        response = post_files(client, [(name, data)])
        assert response.status_code == 200, (name, response.text)
        assert_same_predictions(response.json()["results"][0], direct.probabilities(data))


def test_concurrent_requests_get_their_own_answers(server, direct, photos):
    """Many requests at once share forward passes (checked in /metrics), yet each gets its own answer."""
    jobs = [(path, crops) for path in photos for crops in ("center", "ten")][:16]
    jobs += [(path, "center") for path in photos]  # the same image twice in flight: still no mix-up
    expected = [direct.probabilities(path.read_bytes(), crops) for path, crops in jobs]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            before = (await client.get("/metrics")).text
            responses = await asyncio.gather(
                *(
                    client.post("/classify", params={"crops": crops}, files={"file": (p.name, p.read_bytes())})
                    for p, crops in jobs
                )
            )
            after = (await client.get("/metrics")).text
            return before, responses, after

    before, responses, after = asyncio.run(run())
    for (path, crops), response, probabilities in zip(jobs, responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["crops"] == crops and body["results"][0]["filename"] == path.name
        assert_same_predictions(body["results"][0], probabilities)
    forward_passes = metric_value(after, "alexnet_batch_requests_count") - metric_value(
        before, "alexnet_batch_requests_count"
    )
    assert 0 < forward_passes < len(jobs), "concurrent requests should have shared forward passes"


# Limits and errors ----------------------------------------------------------------------------------------


def test_body_limit_with_content_length(client):
    response = client.post("/classify", content=b"\xff" * 1_200_000, headers={"Content-Type": "image/jpeg"})
    assert "limit of 1,000,000 bytes" in assert_problem(response, 413, "body-too-large")["detail"]


def test_body_limit_counts_chunked_uploads(client, photos):
    """No Content-Length: the limit is enforced on the bytes as they stream in."""

    def chunks(total: int):
        for _ in range(total // 50_000):
            yield b"\xff" * 50_000

    response = client.post("/classify", content=chunks(1_200_000), headers={"Content-Type": "image/jpeg"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413, "body-too-large")

    data = photos[2].read_bytes()  # a chunked upload under the limit is fine
    response = client.post(
        "/classify", content=iter([data[:1000], data[1000:]]), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text


def test_body_limit_counts_chunked_multipart(client):
    boundary = "xyzzy"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(30):
            yield b"\xff" * 50_000
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/classify", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_problem(response, 413, "body-too-large")


def test_too_many_files(client, photos):
    small = photos[5].read_bytes()
    response = post_files(client, [(f"{i}.jpg", small) for i in range(5)])
    assert "more than 4 files" in assert_problem(response, 413, "too-many-files")["detail"]
    assert post_files(client, [(f"{i}.jpg", small) for i in range(4)]).status_code == 200


def test_pixel_limit_stops_decompression_bombs(client):
    body = assert_problem(post_files(client, [("bomb.png", png_header_only(3000, 3000))]), 413, "image-too-large")
    assert "9,000,000 pixels; the limit is 2,000,000" in body["detail"] and "bomb.png" in body["detail"]
    body = assert_problem(post_files(client, [("huge.png", png_header_only(50_000, 50_000))]), 413, "image-too-large")
    assert "huge.png" in body["detail"]
    # A real image (it compresses to a few kB) just over the configured 2 MP limit.
    big = encode(Image.new("L", (1500, 1500), 0), "PNG")
    assert len(big) < 20_000
    assert_problem(post_files(client, [("big.png", big)]), 413, "image-too-large")


@pytest.mark.parametrize(
    "name, data, status, slug",
    [
        ("notes.txt", b"this is not an image, it is text\n", 415, "unsupported-image"),
        ("page.html", b"<!doctype html><html><body>hi</body></html>", 415, "unsupported-image"),
        ("image.ppm", encode(Image.new("RGB", (40, 30)), "PPM"), 415, "unsupported-image"),  # a format we do not read
        ("empty.jpg", b"", 422, "invalid-image"),
    ],
)
def test_not_an_image(client, name, data, status, slug):
    body = assert_problem(post_files(client, [(name, data)]), status, slug)
    assert name in body["detail"]


def test_truncated_images_are_422(client, photos):
    data = photos[0].read_bytes()
    assert_problem(post_files(client, [("cut.jpg", data[: len(data) // 3])]), 422, "invalid-image")
    png = encode(Image.open(photos[1]).convert("RGB"), "PNG")
    assert_problem(post_files(client, [("cut.png", png[: len(png) // 2])]), 422, "invalid-image")


def test_one_bad_file_names_its_position(client, photos):
    data = photos[0].read_bytes()
    response = post_files(client, [("good.jpg", data), ("bad.jpg", data[:2000])])
    body = assert_problem(response, 422)
    assert body["detail"].startswith("file 2 ('bad.jpg')")


def test_empty_raw_body_is_422(client):
    assert (
        "empty"
        in assert_problem(client.post("/classify", content=b"", headers={"Content-Type": "image/png"}), 422)["detail"]
    )


def test_request_shapes_we_refuse(client, photos):
    data = photos[0].read_bytes()
    assert_problem(client.post("/classify", json={"image": "x"}), 415, "unsupported-media-type")
    assert_problem(client.post("/classify", content=data), 415, "unsupported-media-type")  # no Content-Type
    assert_problem(client.post("/classify", files={"image": ("a.jpg", data)}), 422, "unexpected-field")
    assert_problem(client.post("/classify", data={"note": "hi"}, files={"x": ("", b"")}), 422, "unexpected-field")
    no_parts = client.post(
        "/classify", content=b"--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_problem(no_parts, 422, "no-image")
    no_boundary = client.post("/classify", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert_problem(no_boundary, 400, "malformed-multipart")
    broken = client.post(
        "/classify", content=b"--b\r\nno header end", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_problem(broken, 400, "malformed-multipart")
    # Cut off after a complete first part: refused, not answered for one image fewer.
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + data
    truncated = client.post(
        "/classify", content=part + b"\r\n" + part[:500], headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert "closing boundary" in assert_problem(truncated, 400, "malformed-multipart")["detail"]
    complete = client.post(
        "/classify", content=part + b"\r\n--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert complete.status_code == 200 and len(complete.json()["results"]) == 1


def test_http_errors_are_problem_json(client):
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.get("/classify"), 405)


# Health, model, metrics, docs, logs ------------------------------------------------------------------------


def test_health_readiness_and_model_info(client, checkpoint, direct):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["checkpoint"] == checkpoint.name
    info = client.get("/model").json()
    assert info["num_classes"] == 1000 and info["devices"] == ["cpu"]
    assert info["model"]["trained"] is True
    assert info["preprocessing"] == direct.checkpoint.preprocessing.to_dict()
    assert info["architecture"]["width"] == 0.125
    assert info["provenance"]["epoch"] == 7 and info["provenance"]["trained"] is True


def test_trained_is_shown_with_its_validation_error(client, checkpoint):
    """Wherever the API says "trained", the validation errors that say how good the weights are come with
    it, and the schema says what the flag means."""
    identities = [client.get("/model").json()["model"], client.get("/readyz").json()["model"]]
    for identity in identities:
        assert identity["trained"] is True
        assert (identity["epoch"], identity["val_top1_error"], identity["val_top5_error"]) == (7, 0.61, 0.38)
    info = (
        'alexnet_model_info{checkpoint="%s",sha256="%s",trained="true",val_top1_error="0.61",val_top5_error="0.38"} 1'
        % (checkpoint.name, hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    )
    assert info in client.get("/metrics").text.splitlines()
    fields = client.get("/openapi.json").json()["components"]["schemas"]["ModelIdentity"]["properties"]
    trained = fields["trained"]["description"]
    assert "not how good" in trained and "val_top1_error" in trained and "val_top5_error" in trained
    assert "python -m training train" in trained and "import" in trained and "freshly initialised" in trained
    assert "validation" in fields["val_top1_error"]["description"]


def test_openapi_schema_and_docs(client):
    schema = client.get("/openapi.json").json()
    for name in ("ClassifyResponse", "Prediction", "ModelIdentity", "Problem", "ModelInfo"):
        assert name in schema["components"]["schemas"]
    classify = schema["paths"]["/classify"]["post"]
    assert {"multipart/form-data", "image/*"} <= set(classify["requestBody"]["content"])
    assert {p["name"] for p in classify["parameters"]} == {"top_k", "crops"}
    assert {"200", "413", "415", "422", "503"} <= set(classify["responses"])
    for path in ("/embed", "/explain"):
        operation = schema["paths"][path]["post"]
        assert {"multipart/form-data", "image/*"} <= set(operation["requestBody"]["content"]), path
        assert {"200", "400", "408", "413", "415", "422", "503"} <= set(operation["responses"]), path
    assert "image/png" in schema["paths"]["/model/filters.png"]["get"]["responses"]["200"]["content"]
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    assert classify["responses"]["413"]["content"] == {"application/problem+json": problem}
    assert set(schema["components"]["schemas"]["Prediction"]["properties"]) == {
        "rank",
        "index",
        "wnid",
        "label",
        "score",
    }


def test_filters_png_is_the_papers_figure_3_of_the_served_model(client, checkpoint, direct):
    """GET /model/filters.png: model.visualize.filters_image of the checkpoint's conv1 weights, in its
    channel order, as a PNG with an ETag keyed by the checkpoint's sha256 (If-None-Match → 304)."""
    from model.visualize import filters_image

    response = client.get("/model/filters.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    expected = filters_image(
        direct.checkpoint.state_dict["conv1.weight"], direct.checkpoint.preprocessing.channel_order
    )
    with Image.open(__import__("io").BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.size == expected.size
        assert image.convert("RGB").tobytes() == expected.tobytes()
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    etag = response.headers["etag"]
    assert sha256 in etag and etag.startswith('"') and etag.endswith('"')
    assert response.headers["cache-control"] == "no-cache"
    again = client.get("/model/filters.png", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get("/model/filters.png", headers={"If-None-Match": '"other"'}).status_code == 200


def test_docs_are_served_from_this_origin(client):
    """/docs is Swagger UI from the app's own files: every URL in it is relative, no inline script (the
    Content-Security-Policy allows scripts and styles from this origin only), and each file is served."""
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"] == "text/html; charset=utf-8"
    csp = dict(d.strip().split(" ", 1) for d in docs.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["img-src"] == "'self' data:"
    html = docs.text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts), scripts
    assert not re.search(r"\bon[a-z]+=|style=|javascript:", html)
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert {"static/swagger-ui-bundle.js", "static/swagger-ui.css", "static/docs.js"} <= set(urls)
    for url in urls:
        assert not re.match(r"[a-z]+:|//", url), url  # relative: this origin, under any path prefix
        asset = client.get(httpx.URL("/docs").join(url))
        assert asset.status_code == 200, url
    bundle = client.get("/static/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript") and "SwaggerUIBundle" in bundle.text
    assert client.get("/static/swagger-ui.css").headers["content-type"].startswith("text/css")
    # FastAPI's CDN pages are gone: no ReDoc, no OAuth2 redirect page (inline scripts, fonts from Google).
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert_problem(client.get(path), 404)


def test_metrics_exposition(client, photos):
    post_files(client, [("a.jpg", photos[0].read_bytes())])
    post_files(client, [("a.txt", b"text")])
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "alexnet_http_requests_total", method="POST", route="/classify", status="200") >= 1
    assert metric_value(text, "alexnet_http_requests_total", method="POST", route="/classify", status="415") >= 1
    assert metric_value(text, "alexnet_http_request_duration_seconds_count", method="POST", route="/classify") >= 2
    assert (
        metric_value(text, "alexnet_http_request_duration_seconds_bucket", method="POST", route="/classify", le="+Inf")
        >= 2
    )
    assert metric_value(text, "alexnet_batch_size_count") >= 1
    assert metric_value(text, "alexnet_batch_size_bucket", le="+Inf") == metric_value(text, "alexnet_batch_size_count")
    assert 'alexnet_queue_depth{kind="admitted"} 0' in text
    assert "# TYPE alexnet_forward_duration_seconds histogram" in text
    assert metric_value(text, "alexnet_images_classified_total", crops="center") >= 1
    # Every sample line is `name{labels} value`, every family has HELP and TYPE.
    for line in text.strip().splitlines():
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    assert text.count("# HELP") == text.count("# TYPE")


def test_metrics_label_each_route_by_its_template(client):
    """/docs, /openapi.json, the page and its files count as themselves; only paths that match no route
    count as "unmatched" (and then never as a 200)."""
    requests = [
        ("GET", "/docs", "/docs", 200),
        ("GET", "/openapi.json", "/openapi.json", 200),
        ("GET", "/", "/", 200),
        ("GET", "/static/page.js", "/static/{name}", 200),
        ("GET", "/static/nothing.js", "/static/{name}", 404),
        ("POST", "/openapi.json", "/openapi.json", 405),
        ("POST", "/healthz", "/healthz", 405),
        ("GET", "/no/such/path", "unmatched", 404),
        ("GET", "/model/", "unmatched", 307),  # the redirect to /model
        ("GET", "/model/filters.png", "/model/filters.png", 200),
        ("POST", "/model/filters.png", "/model/filters.png", 405),
        ("POST", "/embed", "/embed", 415),  # no body
        ("GET", "/embed", "/embed", 405),
        ("POST", "/explain", "/explain", 415),
        ("GET", "/explain", "/explain", 405),
    ]

    def counts() -> dict:
        text = client.get("/metrics").text
        return {
            (method, route, status): metric_value(
                text, "alexnet_http_requests_total", method=method, route=route, status=str(status)
            )
            for method, _, route, status in requests
        }

    before = counts()
    for method, path, _, status in requests:
        assert client.request(method, path, follow_redirects=False).status_code == status, path
    after = counts()
    for method, path, route, status in requests:
        assert after[method, route, status] - before[method, route, status] >= 1, (method, path, route, status)
    text = client.get("/metrics").text
    assert metric_value(text, "alexnet_http_requests_total", method="GET", route="unmatched", status="200") == 0
    assert metric_value(text, "alexnet_http_request_duration_seconds_count", method="GET", route="/docs") >= 1
    help_line = next(line for line in text.splitlines() if line.startswith("# HELP alexnet_http_requests_total "))
    assert "unmatched" in help_line and "/static/{name}" in help_line and "/openapi.json" in help_line
    assert "/embed" in help_line and "/explain" in help_line and "/model/filters.png" in help_line


def test_the_metrics_help_names_every_route():
    from service.metrics import ROUTE_EXAMPLES
    from service.routes import ROUTERS

    templates = {route.path for router in ROUTERS for route in router.routes}
    assert templates | {"/openapi.json"} == set(ROUTE_EXAMPLES.split(", "))
    assert {"/embed", "/explain", "/model/filters.png"} <= templates


def test_access_log_is_structured(client, server):
    client.get("/model", params={"probe": "1"})  # (not a probe route: those log at debug)
    for _ in range(100):  # the line is written just after the response is sent
        entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        access = [e for e in entries if e["logger"] == "service.access" and e.get("query") == "probe=1"]
        if access:
            break
        time.sleep(0.02)
    assert access and access[-1]["method"] == "GET" and access[-1]["path"] == "/model"
    assert access[-1]["status"] == 200 and access[-1]["duration_ms"] >= 0
    assert any(e["logger"] == "service" and "serving" in e["message"] for e in entries)
