"""The service's logs: probes and scrapes that succeed are not access-log noise (debug), and a plain-text
format for a terminal beside the JSON lines that stay the default."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from support.service import run_service_command

from service.logs import JsonFormatter, ObserveRequests, TextFormatter, configure
from service.metrics import ServiceMetrics
from service.settings import Settings, SettingsError


def _app_with(ready: bool) -> ObserveRequests:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        return "# nothing"

    @app.get("/v2/health/ready")
    async def v2_ready():
        return {}

    @app.get("/model")
    async def model():
        return {"model": "x"}

    return ObserveRequests(app, metrics=ServiceMetrics(queue_depth=dict, model_info=dict))


def _access_levels(caplog, app, paths) -> dict[str, int]:
    caplog.set_level(logging.DEBUG, logger="service.access")
    caplog.clear()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for path in paths:
                await client.get(path)

    asyncio.run(run())
    return {r.fields["path"]: r.levelno for r in caplog.records if r.name == "service.access"}


def test_probes_and_scrapes_that_succeed_are_logged_at_debug(caplog):
    levels = _access_levels(
        caplog, _app_with(ready=True), ["/healthz", "/readyz", "/metrics", "/v2/health/ready", "/model"]
    )
    assert levels == {
        "/healthz": logging.DEBUG,
        "/readyz": logging.DEBUG,
        "/metrics": logging.DEBUG,
        "/v2/health/ready": logging.DEBUG,
        "/model": logging.INFO,  # everything else, as before
    }


def test_a_failing_probe_stays_at_info(caplog):
    levels = _access_levels(caplog, _app_with(ready=False), ["/readyz"])
    assert levels == {"/readyz": logging.INFO}


def _record(message="POST /classify 200", **fields) -> logging.LogRecord:
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, message, (), None)
    record.fields = fields
    return record


ACCESS_FIELDS = {"method": "POST", "path": "/classify", "route": "/classify", "status": 200, "duration_ms": 41.2,
                 "client": "127.0.0.1", "query": ""}  # fmt: skip


def test_text_format_is_one_plain_line():
    line = TextFormatter().format(_record(**ACCESS_FIELDS))
    assert "\n" not in line and not line.startswith("{")
    assert " INFO  service.access  POST /classify 200  " in line
    assert line.endswith("route=/classify duration_ms=41.2 client=127.0.0.1")  # no empty query, nothing said twice


def test_json_stays_the_default():
    assert Settings.load(environ={}).log_format == "json"
    entry = json.loads(JsonFormatter().format(_record(**ACCESS_FIELDS)))
    assert entry["message"] == "POST /classify 200" and entry["duration_ms"] == 41.2
    assert Settings.load(environ={"ALEXNET_LOG_FORMAT": "TEXT"}).log_format == "text"
    assert Settings.load(environ={"ALEXNET_LOG_FORMAT": "text"}, log_format="json").log_format == "json"
    with pytest.raises(SettingsError, match="ALEXNET_LOG_FORMAT"):
        Settings.load(environ={"ALEXNET_LOG_FORMAT": "xml"})


@pytest.mark.parametrize(("log_format", "formatter"), [("json", JsonFormatter), ("text", TextFormatter)])
def test_configure_sets_the_format_for_every_logger(log_format, formatter):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("info", log_format)
        (handler,) = root.handlers
        assert type(handler.formatter) is formatter
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_a_bad_log_format_flag_exits_2_in_one_line():
    done = run_service_command("--log-format", "xml")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--log-format" in done.stderr, done.stderr
