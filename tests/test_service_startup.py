"""Start-up that tells the truth: each failure is one line, no traceback, and its own exit status
(service/startup.py; docs/http.md): 2 settings, 3 checkpoint, 4 port, 5 device. The untrained fallback is
only for the default checkpoint path."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from support.service import ServiceProcess, metric_value, write_checkpoint

pytestmark = pytest.mark.slow


def failed_start(tmp_path, *args: str, env: dict | None = None) -> tuple[int, str]:
    """Start ``python -m service ARGS`` where it must fail: its exit status and its output."""
    service = ServiceProcess(tmp_path / "log", *args, env=env)
    try:
        code = service.process.wait(timeout=120)
    finally:
        service.stop()
    return code, service.log()


def errors(log: str) -> list[str]:
    """The output's error lines: JSON log records at level error, and any line that is not JSON."""
    lines = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        if record.get("level") in ("error", "critical"):
            lines.append(line)
    return lines


def assert_one_line(log: str, *words: str) -> None:
    assert "Traceback" not in log, log
    (line,) = errors(log)
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("given", ["flag", "variable"])
def test_a_checkpoint_path_given_where_there_is_no_file_exits_3(tmp_path, given):
    missing = tmp_path / "bset.safetensors"  # a typo of best.safetensors
    if given == "flag":
        code, log = failed_start(tmp_path, "--device", "cpu", "--checkpoint", str(missing))
    else:
        code, log = failed_start(tmp_path, "--device", "cpu", env={"ALEXNET_CHECKPOINT": str(missing)})
    assert code == 3, log
    assert_one_line(log, str(missing), "no such file")
    assert "NO CHECKPOINT" not in log  # no untrained net served in its place


def test_the_default_path_alone_falls_back_to_an_untrained_net(tmp_path, live_service):
    """Nothing given and nothing at checkpoints/best.safetensors: the untrained net, with its warning."""
    service = live_service("--reload-interval-s", "0", cwd=tmp_path)
    assert "NO CHECKPOINT" in service.log()


def test_a_corrupt_checkpoint_exits_3_in_one_line(tmp_path):
    good = write_checkpoint(tmp_path / "good.safetensors", seed=3, width=0.0625)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-1000])
    code, log = failed_start(tmp_path, "--checkpoint", str(corrupt), "--device", "cpu")
    assert code == 3, log
    assert_one_line(log, "cannot start the service", str(corrupt), "truncated")


def test_a_port_in_use_exits_4_before_the_model_is_loaded(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "good.safetensors", seed=3, width=0.0625)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, log = failed_start(tmp_path, "--checkpoint", str(checkpoint), "--port", str(port))
    assert code == 4, log
    assert_one_line(log, f"127.0.0.1:{port}", "in use")
    assert "serving" not in log and "Started server process" not in log  # nothing loaded, nothing started


def test_a_device_that_is_not_there_exits_5(tmp_path):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU on a CPU-only machine
    code, log = failed_start(tmp_path, "--device", device)
    assert code == 5, log
    assert_one_line(log, "cannot start the service", "cuda")


def test_invalid_settings_exit_2_in_one_line(tmp_path):
    code, log = failed_start(tmp_path, "--max-files", "none")
    assert code == 2, log
    assert_one_line(log, "--max-files")


def test_connections_on_the_bound_port_send_without_delay():
    """The port bound before the model loads (startup.listen_socket) gives uvicorn's connections
    TCP_NODELAY, as a port uvicorn binds itself does: without it an answer written in two parts waits
    for the client's delayed ACK, ~40 ms a request."""
    import asyncio

    from service.startup import listen_socket

    async def accepted_nodelay() -> int:
        accepted = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        with listen_socket("127.0.0.1", 0) as sock:
            server = await asyncio.get_running_loop().create_server(Record, sock=sock)
            port = sock.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                return await asyncio.wait_for(accepted, 10)
            finally:
                writer.close()
                server.close()

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_a_startup_error(tmp_path):
    """Never a half-working server: a clear error naming the file and a non-zero exit."""
    good = write_checkpoint(tmp_path / "good.safetensors", seed=3, width=0.0625)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-1000])  # truncated: a crash mid-copy
    service = ServiceProcess(tmp_path / "log", "--checkpoint", str(corrupt), "--device", "cpu")
    try:
        code = service.process.wait(timeout=120)
    finally:
        service.stop()
    log = service.log()
    assert code == 3, log  # an unusable checkpoint (service/startup.py)
    assert "cannot start the service" in log and str(corrupt) in log and "truncated" in log


@pytest.mark.slow
def test_sigterm_lets_requests_in_flight_finish(tmp_path, photos):
    """Graceful shutdown: admitted requests are answered, then the process exits 0."""
    service = ServiceProcess(
        tmp_path / "log", "--threads", "1", "--device", "cpu", cwd=tmp_path
    )  # no checkpoint at the default path: the full-size untrained net, slow enough on CPU to be caught mid-work
    try:
        service.wait_ready()
        data, statuses = photos[0].read_bytes(), []

        def post():
            try:
                response = httpx.post(
                    service.url + "/classify", params={"crops": "ten"}, files={"file": ("a.jpg", data)}, timeout=120
                )
                statuses.append(response.status_code)
            except httpx.HTTPError as e:
                statuses.append(repr(e))

        clients = [threading.Thread(target=post) for _ in range(4)]
        for client in clients:
            client.start()
        deadline, admitted = time.monotonic() + 30, 0
        while admitted < 4 and time.monotonic() < deadline:  # all four admitted (their forward passes take s)
            admitted = metric_value(httpx.get(service.url + "/metrics").text, "alexnet_queue_depth", kind="admitted")
            time.sleep(0.02)
        service.process.send_signal(signal.SIGTERM)
        code = service.process.wait(60)
        for client in clients:
            client.join()
    finally:
        service.stop()
    assert admitted == 4, "the requests should have been in flight when SIGTERM arrived"
    assert statuses == [200] * 4, service.log()
    assert code == 0, service.log()
