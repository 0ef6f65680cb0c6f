"""Start `python -m service` on a free loopback port for a benchmark, and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_checkpoint(path: Path) -> Path:
    """The paper's full-size net, freshly initialised, written to ``path``: what a benchmark serves when it is
    given no checkpoint (speed and memory do not depend on the weights; a file is loaded as users' are)."""
    from model import AlexNetConfig, Checkpoint, GroupedAlexNet

    Checkpoint.from_model(GroupedAlexNet(AlexNetConfig()), provenance={"trained": False}).save(path)
    return path


def start_service(checkpoint: Path, flags: list[str], log_path: Path, preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """The service on the CPU with ``checkpoint``, no hot-reload polling, warning-level logs (an access-log
    line per request would cost CPU the benchmarks measure), and any extra ``flags``. ALEXNET_* variables
    of the caller's environment are dropped, so only the flags decide. ``preexec_fn`` runs in the child
    before exec (e.g. joining a memory cgroup)."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--grpc-port", str(free_port())]  # not the default 8001, which another server may hold
    command += ["--checkpoint", str(checkpoint), "--device", "cpu", "--reload-interval-s", "0"]
    command += ["--log-level", "warning", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), preexec_fn=preexec_fn
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the service exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    sys.exit("the service did not become ready")
