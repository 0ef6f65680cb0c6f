"""The service's settings: defaults, environment and flags, the GPU defaults, device specifications, and
settings that cannot work (exit 2)."""

from __future__ import annotations

import pytest
import torch
from support.service import run_service_command

from model.devices import DeviceError, parse_devices, resolve_devices
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
