"""HTTP correctness against a live server, as third-party clients found it: metric labels a client cannot
inflate, HEAD wherever GET is, a request framed two ways closes its connection, Content-Encoding refused,
and a client that half-closes is recorded as gone (499), not as answered. docs/http.md says the rules."""

from __future__ import annotations

import gzip
import json
import random
import re
import socket
import string
import time

import httpx
import pytest
from support.service import assert_problem, metric_value, write_checkpoint

from service.metrics import Counter, Histogram, Registry

REQUESTS = "alexnet_http_requests_total"


@pytest.fixture(scope="module")
def server(tmp_path_factory, module_live_service):
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("http") / "small.safetensors", seed=24, width=0.0625)
    return module_live_service("--threads", "1", "--decode-workers", "1", "--reload-interval-s", "0", checkpoint=checkpoint)


@pytest.fixture(scope="module")
def photo(photos) -> bytes:
    return photos[0].read_bytes()


def raw_exchange(server, data: bytes, *, half_close: bool = False, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection (then perhaps shut down writing), and read until the server closes
    the connection or stops sending for a while."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        sock.settimeout(3.0)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass  # the connection stayed open: everything there was to answer has been answered
        return received


def series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


# Metric labels ------------------------------------------------------------------------------------------


def test_made_up_methods_add_no_series(server):
    """200 random method tokens (and one 8,000 bytes long) add no series: each is counted as OTHER."""
    rng = random.Random(24)
    methods = ["".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12))) for _ in range(200)]
    methods.append("X" * 8000)
    with httpx.Client(base_url=server.url) as http:
        http.request("FIRST", "/healthz")  # the OTHER series of this route and status exist from here on
        http.get("/metrics")  # and so do those of the scrape itself
        before = http.get("/metrics").text
        for method in methods:
            assert http.request(method, "/healthz").status_code == 405
        after = http.get("/metrics").text
    assert series(after) == series(before)
    assert "X" * 20 not in after
    counted = metric_value(after, REQUESTS, method="OTHER", route="/healthz", status="405")
    assert counted - metric_value(before, REQUESTS, method="OTHER", route="/healthz", status="405") == len(methods)


def test_method_labels_come_from_a_fixed_set(server):
    with httpx.Client(base_url=server.url) as http:
        http.get("/healthz")
        text = http.get("/metrics").text
    labels = set(re.findall(r'method="([^"]*)"', text))
    assert labels and labels <= {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER"}


# HEAD ---------------------------------------------------------------------------------------------------


def get_routes(server) -> list[str]:
    """Every GET route, the documented ones (from /openapi.json, /v2's with the served model) and the pages."""
    schema = httpx.get(server.url + "/openapi.json").json()
    paths = [path for path, operations in schema["paths"].items() if "get" in operations]
    paths = [p.replace("{model_name}", "alexnet").replace("{model_version}", "1") for p in paths]
    return [*paths, "/openapi.json", "/", "/docs", "/static/page.js"]


def test_head_answers_wherever_get_does(server):
    routes = get_routes(server)
    assert {"/healthz", "/readyz", "/metrics", "/model", "/model/filters.png", "/v2/health/live"} <= set(routes)
    with httpx.Client(base_url=server.url) as http:
        for path in routes:
            get, head = http.get(path), http.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code, get.status_code)
            assert head.content == b"", path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
            if path != "/metrics":  # its body changes between the two requests (the counters)
                assert head.headers.get("content-length") == get.headers.get("content-length"), path


def test_head_is_not_allowed_where_get_is_not(server):
    response = httpx.head(server.url + "/classify")
    assert response.status_code == 405
    assert "HEAD" not in response.headers["allow"]
    assert "GET, HEAD" in httpx.post(server.url + "/healthz").headers["allow"].replace("HEAD, GET", "GET, HEAD")


# Two framings: Transfer-Encoding and Content-Length ------------------------------------------------------


def test_a_request_framed_two_ways_closes_the_connection(server):
    """A chunked body that also declares a Content-Length, with a second request pipelined behind it: the
    first is answered, then the connection closes; the second is never answered (RFC 9112 §6.3)."""
    smuggled = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    received = raw_exchange(server, smuggled + pipelined)
    assert received.count(b"HTTP/1.1 ") == 1, received
    assert received.startswith(b"HTTP/1.1 4"), received  # 'abc' is not an image: refused, and only that
    assert b"connection: close" in received.lower()


def test_a_request_framed_one_way_keeps_the_connection(server):
    """The control: the same two requests, the first framed only as chunked, are both answered."""
    chunked = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    received = raw_exchange(server, chunked + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert received.count(b"HTTP/1.1 ") == 2, received


# Content-Encoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/classify", "/embed", "/explain"])
@pytest.mark.parametrize("coding", ["br", "gzip", "deflate", "identity, gzip"])
def test_a_content_coding_is_refused(server, photo, path, coding):
    """Whatever the body (a plain JPEG labelled br, a gzipped JPEG, a gzipped form): 415, Accept-Encoding."""
    bodies = {
        "plain": (photo, "image/jpeg"),
        "gzipped": (gzip.compress(photo), "image/jpeg"),
        "gzipped form": (
            gzip.compress(b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + photo
                          + b"\r\n--b--\r\n"),
            "multipart/form-data; boundary=b",
        ),
    }
    for body, content_type in bodies.values():
        headers = {"Content-Type": content_type, "Content-Encoding": coding}
        response = httpx.post(server.url + path, content=body, headers=headers)
        assert_problem(response, 415, "unsupported-content-encoding")
        assert response.headers["accept-encoding"] == "identity"


def test_identity_is_read_as_no_coding(server, photo):
    headers = {"Content-Type": "image/jpeg", "Content-Encoding": "identity"}
    assert httpx.post(server.url + "/classify", content=photo, headers=headers).status_code == 200


def test_the_inference_protocol_refuses_codings_the_same_way(server):
    response = httpx.post(
        server.url + "/v2/models/alexnet/infer", content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 415
    assert response.headers["accept-encoding"] == "identity"
    assert "uncompressed" in response.json()["error"]


# A client that half-closes ------------------------------------------------------------------------------


def test_a_half_closed_client_is_recorded_as_gone(server, photo):
    """A complete POST, then the client shuts down its sending side: uvicorn closes the connection, so no
    answer can reach it. The request is counted and logged as 499 (client closed), never as answered."""
    with httpx.Client(base_url=server.url) as http:
        before = http.get("/metrics").text
        request = (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(photo)}\r\n\r\n".encode()
            + photo
        )
        received = raw_exchange(server, request, half_close=True)
        assert received == b""  # nothing answered
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = http.get("/metrics").text
            gone = metric_value(after, REQUESTS, method="POST", route="/classify", status="499")
            if gone > metric_value(before, REQUESTS, method="POST", route="/classify", status="499"):
                break
            time.sleep(0.1)
    for status in ("200", "400"):
        assert metric_value(after, REQUESTS, method="POST", route="/classify", status=status) == metric_value(
            before, REQUESTS, method="POST", route="/classify", status=status
        )
    assert gone == metric_value(before, REQUESTS, method="POST", route="/classify", status="499") + 1
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "service.access" and line.get("status") == 499]
    assert access and access[-1]["path"] == "/classify" and "undelivered_status" in access[-1]


def test_prometheus_text_format():
    registry = Registry()
    counter = registry.add(Counter("things_total", "things", ("kind",)))
    histogram = registry.add(Histogram("size", "sizes", (1, 4)))
    counter.inc('a "quoted"\nname')
    counter.inc("b", amount=2)
    for value in (0.5, 1, 3, 9):
        histogram.observe(value)
    assert registry.render().splitlines() == [
        "# HELP things_total things",
        "# TYPE things_total counter",
        'things_total{kind="a \\"quoted\\"\\nname"} 1',
        'things_total{kind="b"} 2',
        "# HELP size sizes",
        "# TYPE size histogram",
        'size_bucket{le="1"} 2',
        'size_bucket{le="4"} 3',
        'size_bucket{le="+Inf"} 4',
        "size_sum 13.5",
        "size_count 4",
    ]
