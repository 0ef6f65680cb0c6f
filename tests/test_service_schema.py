"""The published OpenAPI schema says exactly what the service accepts: Schemathesis, every check, against a
live server. A request the schema allows must be accepted (positive_data_acceptance) and one it forbids
refused (negative_data_rejection); answers must match the schema; nothing may be a 5xx.

The exceptions, each a rule HTTP's schema language cannot state (docs/http.md lists them too):
- ``UNSTATABLE``: the /v2 infer bodies. Their rules join fields (the number of ``data`` elements is the
  product of ``shape``; FP32 ``input`` is [N, 3, 224, 224]; ``binary_data_size`` adds up to the binary
  part), and an octet-stream body is JSON followed by bytes, split where a header says: a schema-valid
  body is mostly not a request. Those two operations are checked for everything but positive acceptance.
- ``class_index`` and ``wnid`` together (at most one of two query parameters): the 422 is not checked
  against positive acceptance.
- 413 counts as a refusal of a schema-violating request (more files than ``maxItems``): Schemathesis's list
  of refusals leaves it out.
- Images: a schema says ``format: binary``, not "an image". Binary values are drawn from real images here
  (small JPEGs and PNGs), so positive requests are meant to be accepted; the invalid-image answers are
  covered by tests/test_service.py.

Bounded (derandomized, few examples per operation) to stay within about two minutes on two busy cores.
For a longer hunt: ``ALEXNET_SCHEMA_EXAMPLES=200 .venv/bin/python -m pytest tests/test_service_schema.py``.
"""

from __future__ import annotations

import io
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary
from support.service import write_checkpoint

EXAMPLES = int(os.environ.get("ALEXNET_SCHEMA_EXAMPLES", "0"))  # 0: the fixed budget below

UNSTATABLE = {"/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"}


def image(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [image((48, 32), "JPEG"), image((20, 30), "PNG"), image((64, 64), "JPEG")]
schemathesis.openapi.format("binary", st.sampled_from(IMAGES).map(Binary))


def openapi_schema() -> dict:
    """The schema the server publishes at /openapi.json (built without starting anything)."""
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings.load({})).openapi()


API = schemathesis.openapi.from_dict(openapi_schema())


def both_classes_asked(case) -> bool:
    """class_index and wnid together (/explain): OpenAPI cannot say "at most one of two query parameters"."""
    query = case.query or {}
    return query.get("class_index") is not None and query.get("wnid") is not None


@schemathesis.check
def negative_data_rejection_or_413(ctx, response, case):
    """negative_data_rejection, with 413 counted as a refusal: a form with more ``file`` parts than maxItems
    (ALEXNET_MAX_FILES) is refused as Content Too Large (RFC 9110 §15.5.14), a status Schemathesis does not
    list among its rejections."""
    if response.status_code == 413:
        return None
    return schemathesis.checks.negative_data_rejection(ctx, response, case)


@pytest.fixture(scope="module")
def server(tmp_path_factory, module_live_service):
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("schema") / "small.safetensors", seed=22, width=0.0625)
    flags = ("--threads", "1", "--decode-workers", "1", "--reload-interval-s", "0")
    return module_live_service(*flags, checkpoint=checkpoint)


def test_the_fuzzed_schema_is_the_served_one(server):
    assert httpx.get(server.url + "/openapi.json").json() == openapi_schema()


@API.parametrize()
@settings(
    max_examples=EXAMPLES or 8,
    derandomize=not EXAMPLES,
    deadline=None,  # shared machines: a time bound per example would be flaky
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_the_schema_says_exactly_what_is_accepted(case, server):
    excluded = [schemathesis.checks.negative_data_rejection]  # as negative_data_rejection_or_413
    if case.operation.path in UNSTATABLE or both_classes_asked(case):
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.call_and_validate(
        base_url=server.url, excluded_checks=excluded, additional_checks=[negative_data_rejection_or_413]
    )
