"""--resume continues exactly: 2 epochs == 1 epoch (and a bit), SIGKILL, resume — weights equal to 1e-6."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from support.training import REPO, TINY_RUN, make_source, one_thread, prepare_quietly, train_cli

# Dropout stays on (0.5): its masks must also come out the same after a resume.
ARGS = ("--seed", "3", "--lr", "0.005")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=2), root / "prepared")
    return root / "prepared"  # 12 train images: 3 steps of 4 per epoch


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    with one_thread():  # as the killed subprocess (OMP_NUM_THREADS=1): the same float reductions
        assert train_cli(prepared, run, *ARGS) == 0
    return run


def killed_run(prepared, run, kill_at_step: int, *extra) -> None:
    """``python -m training train`` in a subprocess that SIGKILLs itself after ``kill_at_step`` steps."""
    command = [
        sys.executable,
        str(REPO / "tests" / "support" / "train_with_hooks.py"),
        "--kill-after-steps",
        str(kill_at_step),
        "--",
        str(prepared),
        "--out",
        str(run),
        *TINY_RUN,
        *ARGS,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr


def state_of(run):
    tensors = safetensors.torch.load_file(str(run / "state.safetensors"))
    with safetensors.safe_open(str(run / "state.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["state"])
    return info, tensors


def metrics_without_timing(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("seconds", "wall_seconds", "images_per_second")} for m in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, saved_at",
    [
        ((), (1, 0)),  # killed in epoch 2, after its 2nd step: resumes from the end of epoch 1
        (("--save-every", "1"), (1, 1)),  # state saved after every step: resumes inside epoch 2
    ],
    ids=["from-epoch-end", "from-mid-epoch"],
)
def test_resume_after_sigkill_equals_uninterrupted_training(prepared, uninterrupted, tmp_path, extra, saved_at):
    run = tmp_path / "run"
    killed_run(prepared, run, 5, *extra)  # steps 1–3 are epoch 1, steps 4–5 epoch 2
    info, _ = state_of(run)
    assert (info["epoch"], info["step"]) == saved_at
    assert [m["epoch"] for m in metrics_without_timing(run)] == [1]

    with one_thread():
        assert train_cli(prepared, run, *ARGS, "--resume") == 0

    expected, resumed = state_of(uninterrupted)[1], state_of(run)[1]
    assert expected.keys() == resumed.keys() and any(k.startswith("optimizer.") for k in expected)
    for name in expected:  # weights and momentum buffers
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)
    last_expected = safetensors.torch.load_file(str(uninterrupted / "last.safetensors"))
    last_resumed = safetensors.torch.load_file(str(run / "last.safetensors"))
    for name in last_expected:
        torch.testing.assert_close(last_resumed[name], last_expected[name], rtol=0, atol=1e-6, msg=name)

    a, b = metrics_without_timing(uninterrupted), metrics_without_timing(run)
    assert [m["epoch"] for m in b] == [1, 2]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_can_be_extended(prepared, uninterrupted, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = (run / "best.safetensors").read_bytes()
    assert train_cli(prepared, run, *ARGS, "--resume") == 0  # --epochs 2 again: only the summary
    assert (run / "best.safetensors").read_bytes() == before
    assert "best epoch" in capsys.readouterr().err
    assert train_cli(prepared, run, *ARGS, "--resume", "--epochs", "3") == 0
    assert [m["epoch"] for m in metrics_without_timing(run)] == [1, 2, 3]
    info, _ = state_of(run)
    assert info["epoch"] == 3 and info["hyperparameters"]["epochs"] == 3
