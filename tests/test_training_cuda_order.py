"""The CUDA paths' order of calls, checked on the CPU by recording the calls: the evaluation's copy event
goes on the evaluation device's stream; a run selects its GPU before anything touches CUDA; the loader
forks its JPEG workers before it pins; a failed cudaHostRegister is said, once."""

from __future__ import annotations

import pytest
import torch
from support.training import make_source, prepare_quietly

import training.loader as loader_module
import training.run as run_module
from training.data import PreparedDataset
from training.evaluate import HandBack
from training.loader import BatchLoader
from training.train import Options, train


class FakeEvent:
    def __init__(self, calls):
        self.calls = calls

    def record(self, stream=None):
        self.calls.append(("record", stream))

    def synchronize(self):
        self.calls.append(("synchronize",))


class FakeBatch:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def release(self):
        self.calls.append(("release", self.name))


def test_the_evaluation_copy_event_is_recorded_on_the_evaluation_devices_stream(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(calls))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    hand_back = HandBack(torch.device("cuda:1"))
    hand_back.copy_queued(FakeBatch("a", calls))
    hand_back.copy_queued(FakeBatch("b", calls))
    hand_back.finish()
    cuda1 = ("stream of", torch.device("cuda:1"))
    assert calls == [
        ("record", cuda1),
        ("synchronize",), ("release", "a"), ("record", cuda1),
        ("synchronize",), ("release", "b"),
    ]  # fmt: skip


def test_on_the_cpu_nothing_is_recorded_and_the_caller_releases(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", lambda: pytest.fail("no event on the CPU"))
    calls = []
    hand_back = HandBack(torch.device("cpu"))
    hand_back.copy_queued(FakeBatch("a", calls))
    hand_back.finish()
    assert calls == []


class Stop(Exception):
    pass


def test_a_single_process_run_on_cuda_n_selects_its_gpu_before_the_loader(tmp_path, monkeypatch):
    prepare_quietly(make_source(tmp_path / "src", classes=2, train=2, val=1), tmp_path / "prepared")
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))

    def loader(*args, pin_memory=False, **kwargs):
        calls.append(("loader", pin_memory))
        raise Stop  # the rest of the set-up needs a real GPU

    monkeypatch.setattr(run_module, "BatchLoader", loader)
    with pytest.raises(Stop):
        train(
            {"width": 0.0625, "batch_size": 2},
            Options(str(tmp_path / "prepared"), str(tmp_path / "run"), devices="cuda:1"),
        )
    assert calls == [("set_device", "cuda:1"), ("loader", True)]


@pytest.fixture(scope="module")
def jpeg_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg")
    prepare_quietly(make_source(root / "src", classes=2, train=4, val=1), root / "prepared", store="jpeg")
    return PreparedDataset(root / "prepared").split("train")


def pretend_cuda(monkeypatch, calls, register_error: int):
    """CUDA present: pinned allocations and cudaHostRegister are recorded (and done as plain memory)."""
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            calls.append("pin")
        return real_empty(*args, **kwargs)

    class Cudart:
        @staticmethod
        def cudaHostRegister(pointer, nbytes, flags):
            calls.append("register")
            return register_error

        @staticmethod
        def cudaHostUnregister(pointer):
            calls.append("unregister")

    real_start = BatchLoader._start_workers

    def start_workers(self):
        calls.append("fork")
        real_start(self)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart)
    monkeypatch.setattr(BatchLoader, "_start_workers", start_workers)
    monkeypatch.setattr(loader_module, "_SAID", set())


@pytest.mark.slow
def test_the_loader_forks_its_workers_before_it_pins(jpeg_split, monkeypatch):
    calls = []
    pretend_cuda(monkeypatch, calls, register_error=0)
    with BatchLoader(jpeg_split, 1, 4, pin_memory=True) as loader:
        assert loader.host_path == "registered"
        batch = next(loader.batches([(0, torch.arange(4))]))
        assert batch.images.shape == (4, 3, 256, 256) and batch.images.any()
        batch.release()
    assert calls == ["fork", "pin", "register", "unregister"]


@pytest.mark.slow
def test_a_failed_registration_is_said_once_and_batches_still_come(jpeg_split, monkeypatch, capsys):
    calls = []
    pretend_cuda(monkeypatch, calls, register_error=1)
    for _ in range(2):  # (training's loader, then each evaluation's: said once)
        with BatchLoader(jpeg_split, 1, 4, pin_memory=True) as loader:
            assert loader.host_path == "copied (CUDA error 1)"
            batch = next(loader.batches([(0, torch.arange(4))]))
            assert batch.images.any()
            batch.release()
    said = [line for line in capsys.readouterr().err.splitlines() if "cudaHostRegister" in line]
    assert len(said) == 1 and "failed (CUDA error 1)" in said[0] and "copied into pinned memory" in said[0]
    assert calls == ["fork", "pin", "register", "pin"] * 2  # labels pinned, registration, the fallback buffer
