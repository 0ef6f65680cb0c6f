"""The recipe's details that only show at scale: which parameters decay, when the lr may drop, dropout's
seeds on two GPUs, devices under torchrun, a diverging replica, the numeric settings of a run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support.training import REPO, make_source, prepare_quietly, train_cli

from model import AlexNet, load_checkpoint
from training.devices import Distributed, backend_settings, dropout_seeds, resolve_devices, seed_dropout
from training.errors import TrainingError
from training.hyperparameters import Hyperparameters
from training.schedule import PlateauSchedule
from training.update_rule import make_optimizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=2), root / "prepared")
    return root / "prepared"  # 12 train images: 3 steps of 4 per epoch


@pytest.mark.parametrize("decay_biases", [False, True])
def test_weight_decay_applies_to_weights_and_not_to_biases(decay_biases):
    """With zero gradients an SGD step is pure decay: w ← w − lr·wd·w; biases keep their value (cuda-convnet's
    ``wc`` on weights only, Caffe's ``decay_mult: 0``) unless asked."""
    net = AlexNet(10, width=0.0625)
    hp = Hyperparameters(lr=0.1, weight_decay=0.5, momentum=0.0, decay_biases=decay_biases)
    optimizer = make_optimizer(net, hp)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(before)
    for name, p in net.named_parameters():
        decayed = name.endswith("weight") or decay_biases
        expected = before[name] * (1 - 0.1 * 0.5) if decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)
    assert any(b.abs().max() > 0 for n, b in before.items() if n.endswith("bias"))  # (biases of 1: a real check)


@pytest.mark.slow
def test_the_choice_is_recorded_in_the_checkpoint(prepared, tmp_path):
    assert train_cli(prepared, tmp_path / "run", "--epochs", "1") == 0
    training = load_checkpoint(tmp_path / "run" / "last.safetensors").training
    assert training["decay_biases"] is False and "biases undecayed" in training["weight_decay_on"]
    assert (training["min_improvement"], training["plateau_start"]) == (0.002, 10)


def test_the_lr_does_not_drop_while_the_error_sits_at_chance():
    """The seen failure: 10 classes, error at chance (90 %) for the first epochs; patience 5 dropped the lr at
    epoch 7. Epochs up to plateau_start do not count."""
    schedule = PlateauSchedule(0.01, patience=5, max_drops=3, factor=0.1, min_improvement=0.002, start_epoch=10)
    drops = [epoch for epoch in range(1, 11) if schedule.step(0.90 - 0.0001 * (epoch % 2), epoch)]
    assert drops == [] and schedule.lr == 0.01
    # Learning starts at epoch 11; a plateau after it is what the rule is for.
    errors = {11: 0.80, 12: 0.70, 13: 0.65, 14: 0.65, 15: 0.65, 16: 0.65, 17: 0.65, 18: 0.65}
    drops = [epoch for epoch, error in errors.items() if schedule.step(error, epoch)]
    assert drops == [18] and schedule.lr == pytest.approx(0.001)
    # Without the start epoch, the same chance-level epochs drop the lr at epoch 6: the old behaviour.
    eager = PlateauSchedule(0.01, patience=5, max_drops=3, factor=0.1, min_improvement=0.002, start_epoch=0)
    assert [e for e in range(1, 11) if eager.step(0.90 - 0.0001 * (e % 2), e)] == [6]


def test_improvements_inside_the_noise_do_not_reset_the_count():
    schedule = PlateauSchedule(0.01, patience=3, max_drops=3, factor=0.1, min_improvement=0.002)
    errors = [0.50, 0.499, 0.4985, 0.498]  # each "better", by less than 0.2 points in all
    assert [schedule.step(e, epoch) for epoch, e in enumerate(errors, 1)] == [False, False, False, True]
    strict = PlateauSchedule(0.01, patience=3, max_drops=3, factor=0.1, min_improvement=0.0)
    assert not any(strict.step(e, epoch) for epoch, e in enumerate(errors, 1))  # strict < : reset every epoch
    assert schedule.best == 0.50  # the noise did not move the reference either


def test_each_gpu_draws_dropout_from_its_own_seed(monkeypatch):
    """torch.manual_seed gives every CUDA generator the same seed, and each tower's first dropout draw has the
    same shape on its own GPU: the towers would drop the same units. Seeds now depend on the device."""
    devices = (torch.device("cuda:0"), torch.device("cuda:1"))
    seeds = dropout_seeds(0, 0, 3, 7, devices)
    assert len(set(seeds.values())) == 3  # cpu, cuda:0, cuda:1
    assert seeds == dropout_seeds(0, 0, 3, 7, devices)  # a function of the position: resumable
    assert seeds["cuda:0"] != dropout_seeds(0, 1, 3, 7, devices)["cuda:0"]  # and of the rank
    # Applied to the generators dropout uses (stand-ins for two GPUs' generators):
    generators = [torch.Generator(), torch.Generator()]
    monkeypatch.setattr(torch.cuda, "default_generators", generators, raising=False)
    seed_dropout(0, 0, 3, 7, devices)
    masks = [torch.rand(4096, generator=g) < 0.5 for g in generators]
    assert [g.initial_seed() for g in generators] == [seeds["cuda:0"], seeds["cuda:1"]]
    assert (masks[0] != masks[1]).float().mean() > 0.4  # independent masks differ in about half the units


def test_devices_under_torchrun_are_shifted_by_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    ranks = [Distributed(rank=r, world=2, local_rank=r, local_world=2) for r in range(2)]
    assert [resolve_devices("cuda:0,cuda:1", d) for d in ranks] == [
        (torch.device("cuda:0"), torch.device("cuda:1")),
        (torch.device("cuda:2"), torch.device("cuda:3")),
    ]
    assert resolve_devices("cuda:1", ranks[1]) == (torch.device("cuda:2"),) * 2
    assert resolve_devices("cpu", ranks[1]) == (torch.device("cpu"),) * 2
    three = Distributed(rank=2, world=3, local_rank=2, local_world=3)
    with pytest.raises(TrainingError, match="local rank 2 of 3 uses cuda:4, cuda:5"):
        resolve_devices("cuda:0,cuda:1", three)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_one_message(prepared, tmp_path):
    """Rank 1's loss is NaN at step 1; rank 0's is finite. Both stop at the next check (one all-reduced
    flag, --log-every 1 here) rather than rank 0 waiting in an all-reduce until the timeout."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "tests" / "support" / "train_with_hooks.py"), "--nan-on-rank", "1", "--nan-at-step", "1", "--",
        str(prepared), "--out", str(tmp_path / "run"), "--width", "0.0625", "--batch-size", "4", "--epochs", "2",
        "--workers", "0", "--no-progress", "--devices", "cpu", "--log-every", "1", "--dist-timeout", "60",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "epoch 1" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "run" / "last.safetensors").exists()  # nothing written from the diverged epoch


@pytest.mark.slow
def test_deterministic_runs_and_the_settings_are_restored(prepared, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    assert train_cli(prepared, tmp_path / "run", "--epochs", "1", "--deterministic") == 0
    assert load_checkpoint(tmp_path / "run" / "last.safetensors").training["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled()  # process-wide settings are the run's only
    with backend_settings(tf32=False, cudnn_benchmark=False, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_compile_without_a_working_compiler_is_a_clear_error(prepared, tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++")}  # inductor's CPU backend needs a C++ compiler
    command = [sys.executable, "-m", "training", "train", str(prepared), "--out", str(tmp_path / "run"), "--compile"]
    command += ["--batch-size", "4", "--width", "0.0625"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --compile: torch.compile does not work on cpu")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
