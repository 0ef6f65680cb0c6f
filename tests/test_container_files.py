"""Static checks that tie the container files to the code they run (no container engine needed).

The Dockerfile and docker-compose.yml themselves are linted and schema-checked by docker/lint.sh (hadolint
and Docker Compose, run by .ci/run); these tests check what those tools cannot know: that the settings,
flags and paths the files name exist in this project, and that the image's health check works.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from model.importers import PUBLISHED
from service.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = (REPO / "docker-compose.yml").read_text()


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with an empty environment: the default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value.strip().strip('"'))


def _compose_service(name: str) -> str:
    """The lines of one service's block (two-space indented key under ``services:``)."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\s*\n)+)", COMPOSE, re.MULTILINE)
    assert match, f"service {name!r} not found in docker-compose.yml"
    return match.group(1)


def _api_environment() -> dict[str, str]:
    block = _compose_service("api")
    env = re.search(r"^    environment:\n((?:      .*\n)+)", block, re.MULTILINE)
    assert env, "api has no environment block"
    pairs = re.findall(r"^      (ALEXNET_[A-Z0-9_]+): (.*)$", env.group(1), re.MULTILINE)
    return {k: _interpolate(v) for k, v in pairs}


def _dockerfile_env() -> dict[str, str]:
    api_stage = DOCKERFILE[DOCKERFILE.index("AS api\n") :]
    return dict(re.findall(r"(ALEXNET_[A-Z0-9_]+)=(\S+)", api_stage))


def test_every_alexnet_variable_is_a_service_setting_and_loads():
    for source, env in (("docker-compose.yml", _api_environment()), ("Dockerfile", _dockerfile_env())):
        assert env, f"no ALEXNET_ settings found in {source}"
        fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
        unknown = set(env) - fields
        assert not unknown, f"{source} sets variables the service does not read: {sorted(unknown)}"
        settings = Settings.load(environ=env)  # raises SettingsError naming a bad value
        assert str(settings.checkpoint) == "/checkpoints/best.safetensors"
    # The API in a container must listen on every interface, on the port the image exposes.
    image = Settings.load(environ=_dockerfile_env())
    assert image.host == "0.0.0.0" and f"EXPOSE {image.port} {image.grpc_port}\n" in DOCKERFILE
    # ... and compose publishes both (on the host ports ALEXNET_API_PORT and ALEXNET_API_GRPC_PORT)
    published = [p.rsplit(":", 1)[-1] for p in yaml.safe_load(COMPOSE)["services"]["api"]["ports"]]
    assert published == [str(image.port), str(image.grpc_port)]


def test_api_serves_what_training_writes():
    # The service reads /checkpoints/best.safetensors; the train job's --out is /checkpoints, where
    # training writes best.safetensors; both mount the same named volume there.
    assert re.search(r"--out /checkpoints\b", _compose_service("train"))
    assert "- checkpoints:/checkpoints:ro" in _compose_service("api")
    assert "- checkpoints:/checkpoints\n" in _compose_service("train")
    assert re.search(r'^\s*- "\$\{ALEXNET_DATA_DIR:-\./data\}:/data:ro"$', _compose_service("train"), re.MULTILINE)


def test_train_command_parses_with_the_training_cli():
    training_main = pytest.importorskip("training.__main__")
    block = _compose_service("train")
    command = re.search(r"^    command: (\[.*\])$", block, re.MULTILINE).group(1)
    extra = json.loads(command)  # a YAML flow sequence of quoted strings is JSON
    shell = re.search(r"exec python -m training (train .*) \"\$\$@\"", block).group(1).split()
    args = training_main._parser().parse_args(shell + extra + ["--resume"])
    assert (args.command, args.data, args.out, args.devices, args.resume) == (
        "train", "/data", "/checkpoints", "cuda:0,cuda:1", True)
    prepare = re.search(r"^    command: (\[.*\])$", _compose_service("prepare"), re.MULTILINE).group(1)
    args = training_main._parser().parse_args(json.loads(prepare))
    assert (args.command, args.src, args.dest, args.store) == ("prepare", "/imagenet", "/data", "jpeg")


def test_baked_weights_default_is_a_published_file():
    default = re.search(r"^ARG WEIGHTS_SOURCE=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    assert default in {p.url for p in PUBLISHED}


def test_build_context_holds_everything_the_dockerfile_copies():
    allowed = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    sources = [
        src
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
        if not src.startswith("--")
    ]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert (REPO / src).exists(), f"COPY {src}: no such path"
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by .dockerignore"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_follows_readyz(status, healthy):
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "ALEXNET_PORT": str(server.server_address[1])}
        result = subprocess.run([sys.executable, REPO / "docker/healthcheck.py"], env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == healthy, result.stderr
    if not healthy:
        assert b"HTTP 503" in result.stderr


def test_healthcheck_reports_a_closed_port():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        env = {**os.environ, "ALEXNET_PORT": str(port)}
        result = subprocess.run([sys.executable, REPO / "docker/healthcheck.py"], env=env, capture_output=True, timeout=30)
    assert result.returncode == 1 and b"/readyz" in result.stderr
