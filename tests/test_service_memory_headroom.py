"""Memory headroom: the shipped memory limits (compose's default, the Kubernetes Deployment's, the KServe
InferenceService's) leave at least 10 % over the worst case the default settings allow, as the service
measures it at start-up; and a start with less to spare says so in a warning (docs/serving.md, "Memory")."""

from __future__ import annotations

import json
import logging
import re

import pytest
import yaml
from support.service import REPO, ServiceProcess, write_checkpoint

from service import memory

MIB = memory.MIB


def _bytes(quantity: str) -> int:
    """Docker's (3584m, 3g) and Kubernetes' (3584Mi, 3Gi) spellings → bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", quantity.strip()).groups()
    factor = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}[unit]
    return int(float(number) * factor)


def _compose_api() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]


def _default(value: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def shipped_limits() -> dict[str, int]:
    kubernetes = REPO / "deploy" / "kubernetes"
    deployment = yaml.safe_load((kubernetes / "base" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    kserve = yaml.safe_load((kubernetes / "kserve" / "inferenceservice.yaml").read_text())
    (predictor,) = kserve["spec"]["predictor"]["containers"]
    return {
        "docker-compose.yml": _bytes(_default(_compose_api()["deploy"]["resources"]["limits"]["memory"])),
        "base/deployment.yaml": _bytes(container["resources"]["limits"]["memory"]),
        "kserve/inferenceservice.yaml": _bytes(predictor["resources"]["limits"]["memory"]),
    }


def _worst(total_mib: int) -> memory.WorstCase:
    return memory.WorstCase(
        ready=total_mib * MIB, reload=0, explain=0, bodies=0, joining=0, decodes=0, decoded_images=0, slack=0
    )


def test_a_start_with_less_than_10_percent_to_spare_warns():
    level, message = memory.fit_report(_worst(2_901), 3_072 * MIB, "memory.max")
    assert level == logging.WARNING
    assert "fits the limit of 3,072 MiB (memory.max), 6% to spare: less than 10%" in message
    assert "raise the memory limit" in message and "ALEXNET_DECODE_MEMORY_BYTES" in message
    level, message = memory.fit_report(_worst(2_901), 3_584 * MIB, "memory.max")
    assert level == logging.INFO and message.endswith("fits the limit of 3,584 MiB (memory.max), 19% to spare")


@pytest.mark.slow
def test_the_shipped_limits_leave_10_percent_over_the_measured_worst_case(tmp_path):
    """The service started as compose starts it (its ALEXNET_* environment; a full-size net: the same tensors
    as the imported weights), its logged worst case against each shipped limit."""
    env = {k: _default(v) for k, v in _compose_api()["environment"].items() if k != "ALEXNET_CHECKPOINT"}
    flags = [
        "--checkpoint",
        str(write_checkpoint(tmp_path / "full.safetensors", seed=0, width=1.0)),
        "--reload-interval-s",
        env["ALEXNET_RELOAD_INTERVAL_S"],
    ]
    with ServiceProcess(tmp_path / "log", *flags, env=env) as service:
        pass
    (bound,) = [
        entry
        for entry in map(json.loads, filter(None, service.log().splitlines()))
        if entry.get("event") == "memory_bound"
    ]
    worst = bound["worst_case_bytes"]
    limits = shipped_limits()
    print(bound["message"])
    print(f"worst case {worst / MIB:,.0f} MiB; limits (MiB): { ({k: v // MIB for k, v in limits.items()}) }")
    for source, limit in limits.items():
        assert worst <= (1 - memory.MIN_HEADROOM) * limit, (source, worst / MIB, limit / MIB)
