"""Settings, start-up failures, the engine's device layouts and the metrics format."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import torch
from support.service import ServiceProcess, metric_value, run_service_command, write_checkpoint

from model import load_checkpoint
from model.devices import DeviceError, parse_devices, resolve_devices
from service import engine
from service.metrics import Counter, Histogram, Registry
from service.problems import image_problem
from service.settings import Settings, SettingsError


def test_settings_defaults_environment_and_flags():
    defaults = Settings.load({})
    assert (defaults.host, defaults.port, str(defaults.checkpoint)) == (
        "127.0.0.1",
        8000,
        "checkpoints/best.safetensors",
    )
    environ = {"ALEXNET_PORT": "9000", "ALEXNET_MAX_BATCH": "8", "ALEXNET_LOG_LEVEL": "DEBUG", "OTHER": "x"}
    from_env = Settings.load(environ)
    assert (from_env.port, from_env.max_batch, from_env.log_level) == (9000, 8, "debug")
    flags_win = Settings.load(environ, port="9100", max_batch=None)  # None: the flag was not given
    assert (flags_win.port, flags_win.max_batch) == (9100, 8)


def test_batching_defaults_are_the_gpus_when_serving_on_a_gpu_and_given_values_win(monkeypatch):
    cpu = Settings.load({"ALEXNET_DEVICE": "cpu"})
    assert (cpu.max_batch, cpu.max_wait_ms) == (16, 100.0)
    gpu = Settings.load({"ALEXNET_DEVICE": "cuda:0"})
    assert (gpu.max_batch, gpu.max_wait_ms) == (128, 10.0)
    given = Settings.load({"ALEXNET_DEVICE": "cuda", "ALEXNET_MAX_WAIT_MS": "50"}, max_batch="32")
    assert (given.max_batch, given.max_wait_ms) == (32, 50.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # "auto" on a machine with a GPU
    assert Settings.load({}).max_batch == 128
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings.load({}).max_batch == 16


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"ALEXNET_PORT": "http"}, "ALEXNET_PORT"),
        ({"ALEXNET_MAX_BATCH": "0"}, "ALEXNET_MAX_BATCH"),
        ({"ALEXNET_DEVICE": "gpu"}, "ALEXNET_DEVICE"),
        ({"ALEXNET_LOG_LEVEL": "loud"}, "ALEXNET_LOG_LEVEL"),
    ],
)
def test_bad_settings_name_their_variable(environ, named):
    with pytest.raises(SettingsError, match=named):
        Settings.load(environ)


def test_device_specifications():
    assert parse_devices("cpu") == ("cpu",)
    assert parse_devices("cuda:0,cuda:1") == ("cuda:0", "cuda:1")
    assert parse_devices("auto") == ("auto",)
    for bad in ("", "cuda:x", "cpu:1", "a,b,c", "tpu"):
        with pytest.raises(ValueError):
            parse_devices(bad)
    assert resolve_devices("cpu") == (torch.device("cpu"),)
    assert resolve_devices("cpu,cpu") == (torch.device("cpu"), torch.device("cpu"))  # two towers, one device
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == (torch.device("cpu"),)
        with pytest.raises(DeviceError, match="no CUDA"):
            resolve_devices("cuda:0,cuda:1")


@pytest.mark.slow
def test_bad_settings_exit_2_before_serving():
    result = run_service_command("--max-files", "none")
    assert result.returncode == 2 and "--max-files" in result.stderr


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


def test_each_kind_of_bad_image_has_its_status():
    """The model says what is wrong with an image (its error's class); the service says what HTTP answers it."""
    from model import CorruptImage, ImageError, ImageTooLarge, UnsupportedImage

    for error, status, slug in (
        (ImageTooLarge("too many pixels"), 413, "image-too-large"),
        (UnsupportedImage("not an image"), 415, "unsupported-image"),
        (CorruptImage("truncated"), 422, "invalid-image"),
        (ImageError("something else"), 422, "invalid-image"),
    ):
        problem = image_problem(error, "file 2 ('a.png')")
        assert (problem.status, problem.slug) == (status, slug)
        assert problem.detail == f"file 2 ('a.png'): {error}"
    assert not hasattr(ImageError, "status"), "model knows nothing of HTTP"


def test_prometheus_text_format():
    registry = Registry()
    counter = registry.add(Counter("things_total", "things", ("kind",)))
    histogram = registry.add(Histogram("size", "sizes", (1, 4)))
    counter.inc('a "quoted"\nname')
    counter.inc("b", amount=2)
    for value in (0.5, 1, 3, 9):
        histogram.observe(value)
    assert registry.render().splitlines() == [
        "# HELP things_total things",
        "# TYPE things_total counter",
        'things_total{kind="a \\"quoted\\"\\nname"} 1',
        'things_total{kind="b"} 2',
        "# HELP size sizes",
        "# TYPE size histogram",
        'size_bucket{le="1"} 2',
        'size_bucket{le="4"} 3',
        'size_bucket{le="+Inf"} 4',
        "size_sum 13.5",
        "size_count 4",
    ]


@pytest.mark.slow
def test_two_towers_answer_like_the_grouped_net(tmp_path, photos):
    """ALEXNET_DEVICE=cuda:0,cuda:1 runs the paper's two towers; on CPU ("cpu,cpu") the same code path.
    A single CPU device runs CPUInferenceNet (the net laid out for oneDNN); a single GPU runs the grouped
    net. Whatever the form, the answers are the grouped net's."""
    path = write_checkpoint(tmp_path / "c.safetensors", seed=5, width=0.0625)
    cpu = torch.device("cpu")
    single, towers = engine.load(path, (cpu,)), engine.load(path, (cpu, cpu))
    assert type(single.net).__name__ == "CPUInferenceNet" and type(towers.net).__name__ == "AlexNet"
    assert not single.net.training and not towers.net.training
    checkpoint = load_checkpoint(path)
    grouped, preprocessor = checkpoint.build_grouped().eval(), checkpoint.preprocessor()
    images = [single.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    for crops in ("center", "ten"):
        with torch.no_grad():
            x = preprocessor.from_uint8(torch.stack(images), crops)
            a = grouped(x.flatten(0, 1)).softmax(1).view(3, 10, -1).mean(1) if crops == "ten" else grouped(x).softmax(1)
        (b,), (c,) = towers.predict([images], [crops], 4), single.predict([images], [crops], 4)
        assert a.shape == (3, 1000) and torch.allclose(a.sum(1), torch.ones(3))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert single.identity.sha256 == towers.identity.sha256 and single.identity.trained


@pytest.mark.slow
def test_predict_splits_batches_larger_than_max_batch(tmp_path, photos):
    """One request may hold more network inputs than max_batch (16 ten-crop images): run in chunks."""
    model = engine.load(write_checkpoint(tmp_path / "c.safetensors", seed=6, width=0.0625), (torch.device("cpu"),))
    images = [model.preprocessor.load(p.read_bytes()) for p in photos[:3]]
    (chunked,), (whole,) = model.predict([images], ["ten"], 7), model.predict([images], ["ten"], 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)
    # Requests of both kinds in one batch: each gets what it would get alone.
    mixed = model.predict([images[:1], images[1:], images[:2]], ["center", "ten", "center"], 16)
    alone = [
        model.predict([r], [c], 16)[0] for r, c in ((images[:1], "center"), (images[1:], "ten"), (images[:2], "center"))
    ]
    for a, b in zip(mixed, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_untrained_net_is_the_same_on_every_start(monkeypatch, photos):
    """Without a checkpoint the net is initialised from engine.UNTRAINED_SEED: two builds have the same
    weights and answer a photo alike, and building one leaves the process's random state alone."""
    built = []
    real = engine.from_checkpoint
    monkeypatch.setattr(engine, "from_checkpoint", lambda ck, *a, **k: built.append(ck) or real(ck, *a, **k))
    cpu = (torch.device("cpu"),)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = engine.untrained(cpu)
    assert torch.equal(torch.random.get_rng_state(), state)  # not reseeded, nothing drawn from it
    second = engine.untrained(cpu)
    a, b = (ck.state_dict for ck in built)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.metadata["provenance"]["init_seed"] == engine.UNTRAINED_SEED and not first.identity.trained
    tabby = next(p for p in photos if "tabby" in p.name)
    image = first.preprocessor.load(tabby.read_bytes())
    (p1,), (p2,) = first.predict([[image]], ["center"], 1), second.predict([[image]], ["center"], 1)
    assert torch.equal(p1, p2)
    assert torch.equal(p1.topk(5).indices, p2.topk(5).indices)
    # Another seed would give other weights: the seed, not a coincidence, makes the builds agree.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(engine.UNTRAINED_SEED + 1)
        other = engine.GroupedAlexNet(engine.AlexNetConfig()).state_dict()
    assert not torch.equal(other["conv1.weight"], a["conv1.weight"])


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
