"""The memory bound (service/memory.py): the budgets, the decode estimate against measured peaks, the start-up
check against a real cgroup, and the hostile load of issue 13 against a server in a 3 GiB memory cgroup."""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
from PIL import Image

from model import load_image
from model.preprocessing import decode_peak_bytes, open_image
from service import memory
from service.settings import Settings, SettingsError
from support.service import REPO, ServiceProcess, metric_value

sys.path.insert(0, str(REPO / "bench"))
import memory_cgroup  # noqa: E402
import memory_load  # noqa: E402

MIB = 1024 * 1024
NO_CGROUP = memory_cgroup.available()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"needs a memory cgroup: {NO_CGROUP}")


# ---- budgets --------------------------------------------------------------------------------------------


def test_a_reservation_grows_with_its_body_waits_for_room_and_gives_everything_back():
    async def scenario():
        budget = memory.ByteBudget(100)
        first = memory.Reservation(budget, wait_s=0.05)
        second = memory.Reservation(budget, wait_s=0.05)
        assert await first.grow_to(60) and await first.grow_to(70) and budget.in_use == 70
        assert not await second.grow_to(31), "no room within the wait: refused"
        assert second.held == 0 and budget.in_use == 70 and budget.waiting == 0, "a refusal holds nothing"
        assert await second.grow_to(30) and budget.in_use == 100
        waiting = memory.Reservation(budget, wait_s=5)
        later = asyncio.create_task(waiting.grow_to(50))
        await asyncio.sleep(0.01)
        assert not later.done() and budget.waiting == 1
        first.release()  # 70 back: the waiter gets its 50
        assert await later and budget.in_use == 80
        for reservation in (second, waiting):
            reservation.release()
        assert budget.in_use == 0
        second.release()  # twice is harmless
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_decodes_wait_in_arrival_order_and_a_cancelled_waiter_lets_the_next_in():
    async def scenario():
        budget = memory.ByteBudget(100)
        order = []

        async def decode(name, n, hold):
            async with budget.hold(n):
                order.append(name)
                await hold.wait()

        gates = {name: asyncio.Event() for name in "abcd"}
        a = asyncio.create_task(decode("a", 80, gates["a"]))
        await asyncio.sleep(0)
        b = asyncio.create_task(decode("b", 60, gates["b"]))  # waits: 80 + 60 > 100
        await asyncio.sleep(0)
        c = asyncio.create_task(decode("c", 10, gates["c"]))  # would fit, but waits behind b (no starving b)
        await asyncio.sleep(0)
        assert order == ["a"] and budget.waiting == 2
        b.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["a", "c"], "b gone, c fits beside a"
        gates["a"].set()
        gates["c"].set()
        await asyncio.gather(a, c)
        with pytest.raises(asyncio.CancelledError):
            await b
        assert budget.in_use == 0 and budget.waiting == 0
        with pytest.raises(ValueError):
            async with budget.hold(101):
                pass

    asyncio.run(scenario())


def test_a_body_larger_than_the_body_budget_is_a_settings_error():
    with pytest.raises(SettingsError, match="could never be held"):
        Settings.load({"ALEXNET_MAX_BODY_BYTES": "1000", "ALEXNET_BODY_MEMORY_BYTES": "999"})


def test_the_cgroup_limit_is_read_for_v1_and_v2_and_the_smallest_ancestor_wins(tmp_path):
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "kube" / "pod").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "kube" / "memory.max").write_text("2147483648\n")
    (v2 / "kube" / "pod" / "memory.max").write_text("max\n")
    proc.write_text("0::/kube/pod\n")
    assert memory.cgroup_memory_limit(proc, v2) == (2147483648, str(v2 / "kube" / "memory.max"))

    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("3221225472\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    proc.write_text("12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n")
    assert memory.cgroup_memory_limit(proc, v1)[0] == 3221225472

    # inside a container: /proc/self/cgroup names the host's path, the group itself is mounted as the root
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    proc.write_text("12:memory:/not/visible/here\n")
    assert memory.cgroup_memory_limit(proc, v1)[0] == 1073741824

    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    limit, reason = memory.cgroup_memory_limit(proc, v1)
    assert limit is None and "no memory limit" in reason


def test_the_worst_case_adds_every_part():
    settings = Settings.load({})
    cost = memory.ModelLoadCost(peak=500 * MIB, resident=300 * MIB)
    worst = memory.worst_case(settings, ready_bytes=600 * MIB, model_load=cost, decoded_image_bytes=3 * 256 * 256)
    counted = 600 * MIB + 500 * MIB + 300 * MIB + settings.explain_concurrency * memory.EXPLANATION_BYTES
    counted += settings.body_memory_bytes + settings.max_body_bytes + settings.decode_memory_bytes
    counted += settings.queue_size * settings.max_files * 3 * 256 * 256
    assert worst.total == counted + worst.slack
    assert worst.slack == int(counted * memory.ALLOCATOR_SLACK_FRACTION) + memory.ALLOCATOR_SLACK_BYTES
    quiet = memory.worst_case(
        Settings.load({"ALEXNET_RELOAD_INTERVAL_S": "0"}), ready_bytes=600 * MIB, model_load=cost, decoded_image_bytes=1
    )
    assert quiet.reload == 0, "no hot reload, no second model"
    assert "reload 500" in worst.describe() and "decodes 640" in worst.describe()


# ---- bodies in pieces -----------------------------------------------------------------------------------


def test_an_image_in_pieces_decodes_exactly_as_the_joined_bytes(photos):
    rng = random.Random(0)
    for path in photos[:4]:
        data = path.read_bytes()
        cuts = sorted(rng.sample(range(1, len(data)), 40))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert load_image(pieces).equal(load_image(data)), path.name
        assert load_image([b"", *pieces, b""]).equal(load_image(data)), "empty chunks are harmless"


def test_the_scan_count_sees_a_marker_split_between_two_pieces():
    from model.preprocessing import _count

    assert _count((b"ab\xff", b"\xdacd\xff\xda", b"\xff"), b"\xff\xda") == 2
    assert _count((b"\xff", b"", b"\xda"), b"\xff\xda") == 1
    assert _count((b"\xff\xda\xff\xda",), b"\xff\xda") == 2


# ---- the decode estimate against what decoding takes --------------------------------------------------


def _hostile(side: int) -> dict[str, bytes]:
    """Images whose decode takes many times their file: every conversion path of decode_image."""
    out = {}

    def save(name, image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        out[name] = buffer.getvalue()

    save("rgba.png", Image.new("RGBA", (side, side), (200, 30, 30, 128)), "PNG")
    save("la.png", Image.new("LA", (side, side), (90, 128)), "PNG")
    palette = Image.new("P", (side, side), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    save("palette-transparent.gif", palette, "GIF", transparency=0)
    save("rgb-deflate.tiff", Image.new("RGB", (side, side), (30, 200, 30)), "TIFF", compression="tiff_adobe_deflate")
    save("cmyk.tiff", Image.new("CMYK", (side, side), (1, 2, 3, 4)), "TIFF", compression="tiff_adobe_deflate")
    save("gray16.png", Image.new("I;16", (side, side), 40000), "PNG")
    save("rgb.webp", Image.new("RGB", (side, side), (5, 6, 7)), "WEBP", lossless=True)
    noise = Image.frombytes("RGB", (side, side), random.Random(1).randbytes(side * side * 3))
    save("progressive.jpg", noise, "JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate: decode_image makes an upright copy
    save("rotated.jpg", noise, "JPEG", quality=90, exif=exif)
    return out


MEASURE = textwrap.dedent(
    """
    import sys
    from model import load_image
    from model.preprocessing import open_image
    data = open(sys.argv[1], "rb").read()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    open_image(data)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    load_image(data, size=256)
    print(status("VmHWM") - before)
    """
)


@pytest.mark.slow
def test_the_decode_estimate_bounds_what_decoding_takes(tmp_path):
    """Each image decoded in a fresh process: the growth of its peak resident memory (VmHWM, reset just
    before) is at most the estimate, and the estimate is not wildly above it (it must stay useful)."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    report = []
    for name, data in _hostile(2400).items():  # 5.8 Mpx: large against the process's own noise
        path = tmp_path / name
        path.write_bytes(data)
        estimate = decode_peak_bytes(open_image(data), draft_shorter_side=256)
        result = subprocess.run(
            [sys.executable, str(script), str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        measured = int(result.stdout.strip())
        report.append(f"{name}: measured {measured / MIB:.1f} MiB, estimate {estimate / MIB:.1f} MiB")
        assert measured <= estimate, "\n".join(report)
        assert estimate <= 4 * max(measured, 8 * MIB), "\n".join(report)
    print("\n".join(report))


# ---- a live server --------------------------------------------------------------------------------------


def _png(mode: str, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_that_can_never_fit_the_decode_budget_is_413(tmp_path, photos, live_service):
    flags = ["--device", "cpu", "--reload-interval-s", "0"]  # no checkpoint in cwd: the untrained net
    flags += ["--decode-memory-bytes", str(64 * MIB)]
    service = live_service(*flags, device=None, cwd=tmp_path)
    big = _png("RGBA", 3000)  # 9 Mpx RGBA: ~110 MiB to decode
    response = httpx.post(service.url + "/classify", files={"file": ("big.png", big, "image/png")}, timeout=60)
    assert response.status_code == 413, response.text
    assert "ALEXNET_DECODE_MEMORY_BYTES" in response.json()["detail"]
    photo = photos[0].read_bytes()
    assert httpx.post(service.url + "/classify", content=photo, headers={"Content-Type": "image/jpeg"}).is_success


def test_a_body_with_no_room_is_503_on_a_connection_that_stays_usable(tmp_path, photos, live_service):
    """One client sends a large body slowly (its Content-Length held against the budget); a second body that
    does not fit beside it is refused with 503 memory-busy + Retry-After, and the same connection then
    classifies a photo once the first request is done."""
    flags = ["--device", "cpu", "--reload-interval-s", "0"]  # no checkpoint in cwd: the untrained net
    flags += ["--body-memory-bytes", str(8 * MIB), "--max-body-bytes", str(6 * MIB)]
    service = live_service(*flags, device=None, cwd=tmp_path)
    slow_size = 5 * MIB
    release = threading.Event()

    def slow_body():
        yield b"\0" * 1024
        release.wait(30)
        yield b"\0" * (slow_size - 1024)

    def send_slow():
        try:
            httpx.post(
                service.url + "/classify",
                content=slow_body(),
                headers={"Content-Type": "image/png", "Content-Length": str(slow_size)},
                timeout=60,
            )
        except httpx.HTTPError:
            pass

    sender = threading.Thread(target=send_slow)
    sender.start()
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            deadline = time.monotonic() + 30
            while True:  # until the slow request holds its reservation
                response = client.post(
                    "/classify", content=b"\0" * (4 * MIB), headers={"Content-Type": "image/png"}
                )
                if response.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert response.status_code == 503, response.text
            assert response.json()["type"].endswith("memory-busy")
            assert response.headers["retry-after"] == "1"
            release.set()
            sender.join(60)
            photo = photos[0].read_bytes()
            again = client.post("/classify", content=photo, headers={"Content-Type": "image/jpeg"})
            assert again.status_code == 200, again.text
            metrics = client.get("/metrics").text
            assert metric_value(metrics, "alexnet_memory_busy_total") >= 1
            assert metric_value(metrics, "alexnet_memory_bytes", budget="bodies", of="capacity") == 8 * MIB
            assert metric_value(metrics, "alexnet_memory_bytes", budget="bodies", of="in_use") == 0, "all given back"
            assert metric_value(metrics, "alexnet_memory_bytes", budget="process", of="worst_case") > 0
    finally:
        release.set()
        sender.join(60)


@pytest.mark.slow
@needs_cgroup
def test_settings_that_cannot_fit_the_cgroup_refuse_to_start_with_exit_2(tmp_path):
    with memory_cgroup.MemoryCgroup(1024 * MIB) as group:
        service = ServiceProcess(
            tmp_path / "log", "--device", "cpu", preexec_fn=group.enter, cwd=tmp_path  # the untrained net
        )
        assert service.process.wait(180) == 2, service.log()
        service.stop()
        log = service.log()
        assert "more than the memory limit of 1,024 MiB" in log
        for setting in ("ALEXNET_BODY_MEMORY_BYTES", "ALEXNET_DECODE_MEMORY_BYTES", "ALEXNET_QUEUE_SIZE"):
            assert setting in log
        assert group.oom_kills == 0


def _kubernetes_api_container() -> dict:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "kubernetes" / "base")], capture_output=True, text=True
    )
    if rendered.returncode != 0:
        pytest.skip(f"kubectl kustomize: {rendered.stderr.strip()[:200]}")
    import yaml

    for document in yaml.safe_load_all(rendered.stdout):
        if document and document.get("kind") == "Deployment":
            return document["spec"]["template"]["spec"]["containers"][0]
    raise AssertionError("no Deployment in the base")


def _bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "k": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.slow
@needs_cgroup
def test_the_kubernetes_pod_starts_within_its_memory_limit(tmp_path):
    """The Deployment's memory limit and ALEXNET_* environment, as a cgroup and environment here: the start-up
    check passes (the compose default is the load test's, below)."""
    container = _kubernetes_api_container()
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("ALEXNET_") and "value" in e}
    env = {k: v for k, v in env.items() if k not in ("ALEXNET_HOST", "ALEXNET_PORT", "ALEXNET_CHECKPOINT")}
    env.setdefault("ALEXNET_DEVICE", "cpu")
    with memory_cgroup.MemoryCgroup(limit) as group:
        # No checkpoint in cwd: the untrained net (an explicitly given path with no file is exit 3)
        with ServiceProcess(tmp_path / "log", env=env, preexec_fn=group.enter, cwd=tmp_path) as service:
            assert httpx.get(service.url + "/readyz").status_code == 200
        assert '"event": "memory_bound"' in service.log() and "fits the limit" in service.log()


@pytest.mark.slow
@needs_cgroup
def test_the_hostile_load_stays_inside_composes_memory_limit(tmp_path):
    """Issue 13's load at compose's default limit (ALEXNET_API_MEMORY=4g) and every setting at its default: 64
    clients, 48 posting a 28 MiB noise JPEG, 16 posting 7900×7900 PNG/GIF/TIFF images. No OOM kill, no 5xx
    but 503 (each with Retry-After), no dropped connection, still ready, the cgroup's peak below its limit."""
    compose = (REPO / "docker-compose.yml").read_text()
    assert "${ALEXNET_API_MEMORY:-4g}" in compose, "the test's limit is compose's default"
    args = memory_load.parse_args(["--memory-limit", "4g", "--duration", "20", "--json", str(tmp_path / "r.json")])
    report = memory_load.run(args)
    summary = json.dumps({k: v for k, v in report.items() if k != "log_tail"}, indent=1)
    assert report["server_alive"] and report["oom_kills"] == 0, summary + report["log_tail"]
    assert not report["connection_errors"], summary
    assert report["ready_after"], summary
    assert set(report["statuses"]) <= {"200", "413", "503"}, summary
    for refusal in report["refusals"]:
        status, kind, retry = refusal.split()
        assert status == "413" or retry == "retry-after=True", summary
        if status == "413":
            assert kind == "image-too-large", summary  # only the images whose decode can never fit
    assert report["statuses"].get("200", 0) > 0, summary
    assert report["cgroup_peak_bytes"] < report["memory_limit"], summary
    print(summary)


def test_an_inference_protocol_json_body_too_large_to_parse_within_the_budget_is_413(tmp_path, live_service):
    """FP32 data as JSON numbers take up to 10× their text once parsed: counted before parsing, so a JSON body
    whose parse could never fit the body budget is refused (and the binary extension suggested)."""
    flags = ["--device", "cpu", "--reload-interval-s", "0"]  # no checkpoint in cwd: the untrained net
    flags += ["--body-memory-bytes", str(16 * MIB), "--max-body-bytes", str(8 * MIB)]
    service = live_service(*flags, device=None, cwd=tmp_path)
    numbers = ",".join(["1.5"] * (3 * 224 * 224 * 4))  # 4 images: 2.4 MB of JSON, ~20 MB parsed
    body = '{"inputs":[{"name":"input","datatype":"FP32","shape":[4,3,224,224],"data":[%s]}]}' % numbers
    response = httpx.post(
        service.url + "/v2/models/alexnet/infer", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert "binary extension" in response.json()["error"]
    one = ",".join(["0.5"] * (3 * 224 * 224))  # one image: 0.6 MB of JSON fits
    body = '{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,224,224],"data":[%s]}]}' % one
    response = httpx.post(
        service.url + "/v2/models/alexnet/infer", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200, response.text


def test_waits_that_end_together_leave_the_budget_consistent():
    """Many waiters timing out at the same moment as room comes back: no waiter is granted twice or after its
    wait ended, nothing leaks, and later requests still get in (a granted-after-cancel once answered 500)."""

    async def scenario():
        budget = memory.ByteBudget(100)
        await budget.acquire(100)

        async def waiter():
            return await budget.acquire(60, timeout=0.02)

        for _ in range(20):
            tasks = [asyncio.create_task(waiter()) for _ in range(8)]
            await asyncio.sleep(0.02)  # the timeouts fire about now
            budget.release(100)
            results = await asyncio.gather(*tasks)
            granted = sum(results)
            assert budget.in_use == 60 * granted and granted <= 1
            budget.release(60 * granted)
            assert budget.in_use == 0 and budget.waiting == 0
            await budget.acquire(100)
        budget.release(100)
        assert await budget.acquire(100, timeout=0.01) and budget.in_use == 100

    asyncio.run(scenario())


def test_the_cuda_runtime_is_started_before_the_models_load_is_measured(tmp_path, monkeypatch):
    """On a GPU, CUDA's and cuDNN's start-up (hundreds of MiB) must not be counted as the model's load: a
    reload and /explain's net are counted as costing that load again. Recorded on the CPU."""
    from service import engine
    from service.service_state import ServiceState

    calls = []

    class Stop(Exception):
        pass

    class Measured:
        def __enter__(self):
            calls.append("measure")
            return self

        def __exit__(self, *exc):
            return False

    def untrained(devices):
        calls.append("load")
        raise Stop

    monkeypatch.setattr(engine, "start_runtime", lambda devices: calls.append(("runtime", devices)))
    monkeypatch.setattr(memory, "MeasureLoad", Measured)
    monkeypatch.setattr(engine, "untrained", untrained)
    monkeypatch.chdir(tmp_path)  # no checkpoints/best.safetensors: the default path's untrained fallback
    state = ServiceState(Settings(device="cpu"))
    with pytest.raises(Stop):
        asyncio.run(state.start())
    assert calls == [("runtime", (engine.torch.device("cpu"),)), "measure", "load"]


def test_starting_the_runtime_on_the_cpu_does_nothing(monkeypatch):
    import torch

    from service import engine

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("no CUDA on the CPU"))
    engine.start_runtime((torch.device("cpu"),))
