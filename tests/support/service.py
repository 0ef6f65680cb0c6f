"""Helpers for the service tests: a real server process, small checkpoints, direct answers, problem checks.

The server runs as ``python -m service`` in a subprocess on a free loopback port, exactly as users start
it, and the tests talk HTTP to it with httpx. Tests start one through the ``live_service`` (per test) or
``module_live_service`` (per module) fixture of tests/conftest.py, a ``LiveServices``; ``ServiceProcess``
itself is for the tests that watch a server fail to start or stop it themselves.
"""

from __future__ import annotations

import io
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import torch
from PIL import Image

from model import AlexNet, Checkpoint, Preprocessing, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
PROBLEM_FIELDS = {"type", "title", "status", "detail"}
# Small limits for the endpoint tests, given to the server through the environment (settings from there too).
SMALL_LIMITS = {"max_body_bytes": 1_000_000, "max_files": 4, "max_pixels": 2_000_000}
SMALL_LIMITS_ENV = {f"ALEXNET_{k.upper()}": str(v) for k, v in SMALL_LIMITS.items()}
# A server whose concurrent requests reliably share a forward pass: a 20 ms wait is long enough for them.
BATCHING_FLAGS = ("--max-batch", "32", "--max-wait-ms", "20", "--threads", "1", "--decode-workers", "2")
BATCHING_FLAGS += ("--reload-interval-s", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``python -m service --host 127.0.0.1 --port P …`` with its stderr (the JSON log) in a file."""

    def __init__(
        self, log_path: Path, *args: str, env: dict[str, str] | None = None, preexec_fn=None, cwd: Path | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # gRPC on a free port too (the default, 8001, would be shared by every server the tests start)
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--grpc-port", str(self.grpc_port), *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
        # PYTHONPATH: this tree's packages, whatever the working directory (``cwd``: where the default
        # checkpoint path, checkpoints/best.safetensors, is looked for).
        environment.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **(env or {})})
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=cwd or REPO, env=environment, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )

    def __enter__(self) -> "ServiceProcess":
        """``with ServiceProcess(...) as service``: ready on entry; stopped on exit, which must be clean (0)."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        assert self.stop() == 0, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class LiveServices:
    """The live-server fixture factory: ``start(*flags, checkpoint=…, env=…)`` returns a ready server;
    every server it started is stopped (SIGTERM) at teardown, and must exit cleanly (0)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[ServiceProcess] = []
        self.count = 0

    def __call__(
        self,
        *flags: str,
        checkpoint: Path | None = None,
        device: str | None = "cpu",
        env: dict[str, str] | None = None,
        preexec_fn=None,
        cwd: Path | None = None,
    ) -> ServiceProcess:
        """``python -m service [--checkpoint C] [--device D] FLAGS…``, ready (GET /readyz 200) on return; its
        log in this fixture's directory."""
        args = [*(("--checkpoint", str(checkpoint)) if checkpoint is not None else ())]
        args += [*(("--device", device) if device is not None else ()), *flags]
        log = self.directory / f"service-{self.count}.log"
        self.count += 1
        service = ServiceProcess(log, *args, env=env, preexec_fn=preexec_fn, cwd=cwd)
        service.__enter__()  # stops it again if it never becomes ready
        self.started.append(service)
        return service

    def close(self) -> None:
        """Stop every server started here (those a test stopped itself included): each must have exited 0."""
        codes = [(service, service.stop()) for service in self.started]
        for service, code in codes:
            assert code == 0, service.log()


def run_service_command(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m service ARGS`` to its end (for the ways it refuses to start), its output as text."""
    command = [sys.executable, "-m", "service", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def write_checkpoint(path: Path, *, seed: int, width: float = 0.125, mean_image: bool = False, **provenance):
    """A small 1000-class net with He-initialised weights, so that its outputs depend clearly on the image
    (the paper's N(0, 0.01²) init gives a nearly flat softmax whose top-k order is fragile)."""
    generator = torch.Generator().manual_seed(seed)
    net = AlexNet(num_classes=1000, width=width)
    checkpoint = Checkpoint.from_model(net, provenance={"trained": True, **provenance})
    for name, tensor in checkpoint.state_dict.items():
        if name.endswith(".weight"):
            fan_in = tensor[0].numel()
            tensor.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
        else:
            tensor.normal_(0.0, 0.1, generator=generator)
    if mean_image:
        checkpoint.preprocessing = Preprocessing(mean="image")
        checkpoint.mean_image = torch.rand(3, 256, 256, generator=generator) * 255
    checkpoint.save(path)
    return path


class Direct:
    """What the model package answers for image bytes, computed without the service."""

    def __init__(self, path: Path):
        self.checkpoint = load_checkpoint(path)
        self.net = self.checkpoint.build_grouped("cpu").eval()
        self.preprocessor = self.checkpoint.preprocessor()

    @torch.inference_mode()
    def probabilities(self, data: bytes, crops: str = "center") -> torch.Tensor:
        x = self.preprocessor.from_bytes(data, crops)
        if crops == "ten":
            return self.net(x.flatten(0, 1)).softmax(dim=1).mean(dim=0)
        return self.net(x).softmax(dim=1)[0]


def assert_same_predictions(result: dict, expected: torch.Tensor, top_k: int = 5) -> None:
    """The service's top-k for one image equals the direct probabilities (ranks, classes and scores)."""
    predictions = result["predictions"]
    assert [p["rank"] for p in predictions] == list(range(1, top_k + 1))
    scores, indices = expected.topk(top_k)
    assert [p["index"] for p in predictions] == indices.tolist()
    # These nets' logits reach ~100; float32 sums taken in another order (another batch, the service's
    # CPUInferenceNet layout) move them by ~1e-4, and so the scores by ~1e-4 relative. A mix-up moves
    # them by orders of magnitude more.
    for p, score in zip(predictions, scores.tolist()):
        assert math.isclose(p["score"], score, rel_tol=5e-4, abs_tol=1e-6), (p, score)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict:
    """An RFC 9457 problem+json answer with this status (and type, when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body = response.json()
    assert PROBLEM_FIELDS <= set(body), body
    assert body["status"] == status and body["title"] and body["detail"]
    if slug is not None:
        assert body["type"] == f"urn:alexnet:problem:{slug}", body
    return body


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    sample = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width × height pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def hostile_requests(photo: bytes, *, max_body_bytes: int, max_files: int) -> dict[str, dict]:
    """Requests every image endpoint must refuse as /classify does, as httpx keyword arguments by name: not
    images, broken images, bombs, bodies over the limit (declared and chunked), request shapes we refuse.
    ``photo``: a valid JPEG; the limits: the server's."""
    png = encode(Image.open(io.BytesIO(photo)).convert("RGB").resize((64, 48)), "PNG")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + photo
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}

    def chunks(total: int):
        for _ in range(total // 50_000 + 1):
            yield b"\xff" * 50_000

    def file(name: str, data: bytes) -> dict:
        return {"files": {"file": (name, data)}}

    return {
        "text": file("notes.txt", b"this is not an image, it is text\n"),
        "html": file("page.html", b"<!doctype html><html><body>hi</body></html>"),
        "ppm": file("image.ppm", encode(Image.new("RGB", (40, 30)), "PPM")),
        "empty-file": file("empty.jpg", b""),
        "truncated-jpeg": file("cut.jpg", photo[: len(photo) // 3]),
        "truncated-png": file("cut.png", png[: len(png) // 2]),
        "bomb-header": file("bomb.png", png_header_only(50_000, 50_000)),
        "declared-too-large": {"content": b"\xff" * (max_body_bytes + 1), "headers": {"Content-Type": "image/jpeg"}},
        "chunked-too-large": {"content": chunks(max_body_bytes + 1), "headers": {"Content-Type": "image/jpeg"}},
        "too-many-files": {"files": [("file", (f"{i}.jpg", photo)) for i in range(max_files + 1)]},
        "empty-raw-body": {"content": b"", "headers": {"Content-Type": "image/png"}},
        "json-body": {"json": {"image": "x"}},
        "no-content-type": {"content": photo},
        "other-field": {"files": {"image": ("a.jpg", photo)}},
        "form-field": {"data": {"note": "hi"}, "files": {"x": ("", b"")}},
        "no-parts": {"content": b"--b--\r\n", "headers": multipart},
        "no-boundary": {"content": b"x", "headers": {"Content-Type": "multipart/form-data"}},
        "broken-multipart": {"content": b"--b\r\nno header end", "headers": multipart},
        "truncated-multipart": {"content": part[: len(part) // 2], "headers": multipart},  # cut in its one part
    }


def same_refusal(expected: httpx.Response, response: httpx.Response, *, detail: bool = True) -> None:
    """``response`` refuses the request as ``expected`` (a /classify answer) did: status, type (and detail)."""
    want = assert_problem(expected, expected.status_code)
    assert 400 <= expected.status_code < 500, expected.text
    got = assert_problem(response, expected.status_code)
    assert got["type"] == want["type"], (got, want)
    if detail:
        assert got["detail"] == want["detail"], (got, want)
