"""KServe's own Python SDK (kserve.InferenceRESTClient, v2 protocol) against a live server: readiness, the
metadata bodies read with KServe's models of them, and BYTES inference of real photos, with the answer checked
against the model package's. The SDK runs in a child process (tests/support/kserve_client.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.service import REPO, Direct, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("kserve") / "small.safetensors", seed=5, width=0.125)


@pytest.fixture(scope="module")
def answers(checkpoint, module_live_service, photos) -> dict:
    server = module_live_service("--threads", "1", "--reload-interval-s", "0", checkpoint=checkpoint)
    script = REPO / "tests" / "support" / "kserve_client.py"
    done = subprocess.run(
        [sys.executable, str(script), server.url, *map(str, photos[:3])],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,  # the assertion below shows stderr
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_readiness_through_the_kserve_client(answers):
    assert (answers["live"], answers["ready"]) == (True, True)
    assert (answers["model_ready"], answers["other_model_ready"]) == (True, False)


def test_metadata_and_health_bodies_are_kserves(answers):
    bodies = answers["bodies"]
    assert bodies["server_live"] == {"live": True} and bodies["server_ready"] == {"ready": True}
    assert bodies["model_ready"] == {"name": "alexnet", "ready": True}
    assert bodies["server_metadata"]["name"] == "alexnet-api"
    metadata = bodies["model_metadata"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("alexnet", ["1"], "pytorch_safetensors")
    assert [t["name"] for t in metadata["inputs"]] == ["image", "input"]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]


def test_bytes_inference_through_the_kserve_client(answers, checkpoint, photos):
    """Three JPEGs as one BYTES input (binary tensor data), the top 3 classes of each as Triton's
    classification strings, equal to the model package's own top 3."""
    infer = answers["infer"]
    assert (infer["model_name"], infer["id"], infer["name"]) == ("alexnet", "kserve-1", "probabilities")
    assert (infer["datatype"], infer["shape"]) == ("BYTES", [3, 3])
    direct = Direct(checkpoint)
    for row, photo in zip(infer["data"], photos[:3]):
        expected = direct.probabilities(photo.read_bytes()).topk(3)
        assert [int(element.split(":")[1]) for element in row] == expected.indices.tolist()
        for element, score in zip(row, expected.values.tolist()):
            assert float(element.split(":")[0]) == pytest.approx(score, rel=5e-4, abs=2e-6)


def test_an_unknown_model_is_refused_with_the_servers_message(answers):
    refused = answers["unknown_model"]
    assert refused["status"] == 404 and "unknown model 'resnet'" in refused["message"]
