"""A checkpoint with fewer classes than the default top_k (5): /classify answers with all of them,
instead of refusing every request that leaves top_k out."""

from pathlib import Path

import httpx
import pytest
from support.service import assert_problem

from model import AlexNet, Checkpoint, ImageClass

PHOTO = Path(__file__).parent / "fixtures" / "images" / "n02123045_tabby.JPEG"


@pytest.fixture(scope="module")
def client(tmp_path_factory, module_live_service):
    directory = tmp_path_factory.mktemp("few-classes")
    classes = [ImageClass("n01440764", "tench"), ImageClass("n01443537", "goldfish"), ImageClass("n02123045", "tabby")]
    path = directory / "three.safetensors"
    Checkpoint.from_model(AlexNet(3, width=0.0625), classes=classes, provenance={"trained": True}).save(path)
    service = module_live_service("--threads", "1", "--decode-workers", "1", "--reload-interval-s", "0", checkpoint=path)
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


def test_the_default_top_k_is_every_class_of_a_small_checkpoint(client):
    answer = client.post("/classify", files={"file": (PHOTO.name, PHOTO.read_bytes())})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["top_k"] == 3 and len(body["results"][0]["predictions"]) == 3
    assert {p["wnid"] for p in body["results"][0]["predictions"]} == {"n01440764", "n01443537", "n02123045"}
    assert len(client.post("/classify?top_k=2", files={"file": (PHOTO.name, PHOTO.read_bytes())}).json()[
        "results"][0]["predictions"]) == 2  # fmt: skip
    refused = client.post("/classify?top_k=4", files={"file": (PHOTO.name, PHOTO.read_bytes())})
    assert "at most 3" in assert_problem(refused, 422, "invalid-parameter")["detail"]
