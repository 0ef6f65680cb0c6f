"""Requests the routes cannot serve as sent, answered in words: a wrong method (405) names the methods the
path answers, and an unknown query parameter (422) names the ones the route accepts, instead of being
silently ignored. Checked on the app in process, before any model is loaded: these answers come first."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from support.service import assert_problem

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def app():
    return create_app(Settings.load(environ={}))


def request(app, method: str, url: str) -> httpx.Response:
    async def send():
        transport = httpx.ASGITransport(app=app)  # no lifespan: no model, so a request that passes is a 503
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url)

    return asyncio.run(send())


def test_get_classify_says_to_post(app):
    response = request(app, "GET", "/classify")
    problem = assert_problem(response, 405)
    assert response.headers["allow"] == "POST"
    assert problem["detail"] == "GET is not served at /classify: use POST (every operation is listed at /docs)"


@pytest.mark.parametrize(("method", "path"), [("POST", "/healthz"), ("DELETE", "/model"), ("GET", "/embed")])
def test_every_405_names_the_methods_the_path_answers(app, method, path):
    response = request(app, method, path)
    problem = assert_problem(response, 405)
    allowed = response.headers["allow"].split(", ")
    assert allowed == sorted(allowed) and method not in allowed
    assert problem["detail"].startswith(f"{method} is not served at {path}: use {' or '.join(allowed)}")


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("/classify?topk=3", "unknown query parameter 'topk': /classify accepts top_k, crops"),
        ("/classify?top_k=3&crop=ten", "unknown query parameter 'crop': /classify accepts top_k, crops"),
        ("/explain?class=3&x=1", "unknown query parameters 'class', 'x': /explain accepts class_index, wnid, format"),
        ("/embed?layr=fc6", "unknown query parameter 'layr': /embed accepts layer, normalize, crops"),
    ],
)
def test_an_unknown_query_parameter_is_422_naming_the_accepted_ones(app, url, detail):
    problem = assert_problem(request(app, "POST", url), 422, "invalid-parameter")
    assert problem["detail"] == detail


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("POST", "/classify?top_k=3&crops=ten"),
        ("POST", "/explain?class_index=3&format=json"),
        ("POST", "/embed?layer=fc6&normalize=true"),
        ("GET", "/model/filters.png?model=abc"),  # declares no query: any goes (the page's cache key)
        ("GET", "/readyz?probe=1"),
    ],
)
def test_declared_parameters_pass(app, method, url):
    assert_problem(request(app, method, url), 503, "not-ready")  # past the check, to the model that is not there


def test_the_accepted_names_are_the_documented_ones(app):
    """The names a 422 lists for each route are its query parameters in the OpenAPI schema."""
    from service.routes import ROUTERS
    from service.routes.dependencies import declared_query_parameters

    paths = app.openapi()["paths"]
    checked = 0
    for route in (route for router in ROUTERS for route in router.routes):
        if not route.include_in_schema:
            continue
        for method in route.methods:
            documented = [
                p["name"] for p in paths[route.path][method.lower()].get("parameters", []) if p["in"] == "query"
            ]
            assert declared_query_parameters(route.dependant) == documented, route.path
            checked += bool(documented)
    assert checked >= 3  # classify, embed, explain
