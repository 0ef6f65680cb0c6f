"""The paper's update rule (§5), the default: v ← 0.9·v − 0.0005·ε·w − ε·∇L, w ← w + v; torch.optim.SGD as
--update-rule pytorch; the resume state that records which; --init caffe's biases."""

from __future__ import annotations

import json

import pytest
import torch
from support.training import expect_error, make_source, prepare_quietly, train_cli

from model import AlexNet, load_checkpoint
from model.files import read_safetensors, write_safetensors
from training.hyperparameters import Hyperparameters
from training.initialise import initialise_
from training.update_rule import PaperSGD, make_optimizer

MOMENTUM, DECAY = 0.9, 0.0005
LRS = [0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001]  # a ÷10 drop after step 3


def gradients(steps: int, shape) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def run_optimizer(optimizer_class, w0: torch.Tensor, b0: torch.Tensor, grads_w, grads_b, **kwargs):
    """Weights decayed, biases not (the project's two groups); the lr of each step set in the groups, as the
    training loop does. Returns the weights after every step."""
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    optimizer = optimizer_class(
        [{"params": [w], "weight_decay": DECAY}, {"params": [b], "weight_decay": 0.0}], lr=LRS[0], momentum=MOMENTUM,
        **kwargs,
    )
    after = []
    for lr, gw, gb in zip(LRS, grads_w, grads_b):
        for group in optimizer.param_groups:
            group["lr"] = lr
        w.grad, b.grad = gw.clone(), gb.clone()
        optimizer.step()
        after.append((w.detach().clone(), b.detach().clone()))
    return after


def test_the_paper_rule_follows_its_formula_step_by_step_across_a_drop():
    w0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    b0 = torch.ones(3, dtype=torch.float64)
    grads_w, grads_b = gradients(len(LRS), (3, 4)), gradients(len(LRS), (3,))
    got = run_optimizer(PaperSGD, w0, b0, grads_w, grads_b)

    # The paper's formula, written out: v ← 0.9·v − 0.0005·ε·w − ε·∂L/∂w, then w ← w + v (biases: no decay).
    w, b = w0.clone(), b0.clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for step, (lr, gw, gb) in enumerate(zip(LRS, grads_w, grads_b)):
        vw = 0.9 * vw - 0.0005 * lr * w - lr * gw
        vb = 0.9 * vb - lr * gb
        w, b = w + vw, b + vb
        torch.testing.assert_close(got[step][0], w, rtol=0, atol=1e-15, msg=f"weights after step {step + 1}")
        torch.testing.assert_close(got[step][1], b, rtol=0, atol=1e-15, msg=f"biases after step {step + 1}")


def test_at_a_drop_the_paper_step_shrinks_gradually_and_pytorchs_at_once():
    """Zero gradients after the drop isolate the momentum: the paper's first step after it is 0.9 × the last
    one (the velocity still carries the old rate); SGD's is 0.09 × (its buffer times the new, ÷10 rate)."""
    w0, b0 = torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    grads_w = [torch.ones(4, dtype=torch.float64)] * 3 + [torch.zeros(4, dtype=torch.float64)] * 4
    grads_b = [torch.ones(2, dtype=torch.float64)] * 3 + [torch.zeros(2, dtype=torch.float64)] * 4
    steps = {}
    for name, optimizer_class in (("paper", PaperSGD), ("pytorch", torch.optim.SGD)):
        after = run_optimizer(optimizer_class, w0, b0, grads_w, grads_b)
        biases = [b0] + [b for _, b in after]
        steps[name] = [float((biases[i + 1] - biases[i])[0]) for i in range(len(LRS))]
    # Before the drop the two rules take the same steps.
    assert steps["paper"][:3] == pytest.approx(steps["pytorch"][:3], rel=1e-12)
    assert steps["paper"][3] == pytest.approx(0.9 * steps["paper"][2], rel=1e-12)
    assert steps["pytorch"][3] == pytest.approx(0.09 * steps["pytorch"][2], rel=1e-12)


def test_the_rules_agree_while_the_lr_is_constant_with_v_equal_to_minus_lr_times_b():
    w0, b0 = torch.linspace(-1, 1, 6, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    w2, b2 = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    paper = PaperSGD([{"params": [w], "weight_decay": DECAY}, {"params": [b], "weight_decay": 0}], lr=0.01)
    pytorch = torch.optim.SGD(
        [{"params": [w2], "weight_decay": DECAY}, {"params": [b2], "weight_decay": 0}], lr=0.01, momentum=0.9
    )
    for gw, gb in zip(gradients(5, (6,)), gradients(5, (2,))):
        w.grad, b.grad, w2.grad, b2.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        paper.step()
        pytorch.step()
    torch.testing.assert_close(w, w2, rtol=0, atol=1e-15)
    torch.testing.assert_close(paper.state[w]["velocity"], -0.01 * pytorch.state[w2]["momentum_buffer"])


def test_parameters_on_two_devices_are_updated_each_with_its_own_lists():
    """The towers may sit on two GPUs: the step groups its foreach lists by device. Here "meta" stands in for
    the second device (shapes only); the CPU tensors must still get the formula's values."""
    w = torch.ones(3, requires_grad=True)
    other = torch.ones(5, device="meta", requires_grad=True)
    without_grad = torch.ones(2, requires_grad=True)
    optimizer = PaperSGD([w, other, without_grad], lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(2):
        w.grad, other.grad = torch.full((3,), 2.0), torch.ones(5, device="meta")
        optimizer.step()
    # v1 = −0.5·0.1·1 − 0.1·2 = −0.25, w1 = 0.75; v2 = 0.9·v1 − 0.05·0.75 − 0.2 = −0.4625, w2 = 0.2875
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.2875))
    assert optimizer.state[other]["velocity"].device.type == "meta" and other.shape == (5,)
    assert without_grad not in optimizer.state and torch.equal(without_grad.detach(), torch.ones(2))


def test_make_optimizer_uses_the_paper_rule_unless_asked_for_pytorchs():
    net = AlexNet(10, width=0.0625)
    paper = make_optimizer(net, Hyperparameters())
    pytorch = make_optimizer(net, Hyperparameters(update_rule="pytorch"))
    assert type(paper) is PaperSGD and type(pytorch) is torch.optim.SGD
    for optimizer in (paper, pytorch):
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0005, 0.0]  # biases undecayed in both
        assert {g["momentum"] for g in optimizer.param_groups} == {0.9}


@pytest.mark.parametrize("init, bias", [("paper", 1.0), ("width-scaled", 1.0), ("caffe", 0.1)])
def test_init_sets_the_biases_the_paper_sets_to_one(init, bias):
    torch.manual_seed(0)
    net = AlexNet(10, width=0.25)
    initialise_(net, init)
    for tower in net.towers:
        for name, layer in tower.layers().items():
            expected = bias if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.equal(layer.bias, torch.full_like(layer.bias, expected)), (init, name)
    # caffe changes only the biases: its weights are width-scaled's.
    torch.manual_seed(0)
    scaled = AlexNet(10, width=0.25)
    initialise_(scaled, "width-scaled")
    if init == "caffe":
        for (name, p), q in zip(net.named_parameters(), scaled.parameters()):
            if name.endswith("weight"):
                assert torch.equal(p, q), name


# Through the command line.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("update-rule")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=2), root / "prepared")
    return root / "prepared"


def state_of(run):
    meta, tensors = read_safetensors(run / "state.safetensors")
    return meta, json.loads(meta["state"]), tensors


@pytest.mark.slow
def test_the_flags_choose_the_rule_and_init_and_the_checkpoint_records_them(prepared, tmp_path):
    assert train_cli(prepared, tmp_path / "default", "--epochs", "1") == 0
    assert train_cli(prepared, tmp_path / "other", "--epochs", "1", "--update-rule", "pytorch", "--init", "caffe") == 0
    for run, rule, init, key, bias in [
        ("default", "paper", "width-scaled", "velocity", "1 in"),
        ("other", "pytorch", "caffe", "momentum_buffer", "0.1 in"),
    ]:
        meta, info, tensors = state_of(tmp_path / run)
        assert meta["format_version"] == "3" and info["hyperparameters"]["update_rule"] == rule
        assert {name.split(".")[-1] for name in tensors if name.startswith("optimizer.")} == {key}
        training = load_checkpoint(tmp_path / run / "last.safetensors").training
        assert (training["update_rule"], training["init"]) == (rule, init)
        assert training["update_rule_formula"].startswith("paper §5" if rule == "paper" else "torch.optim.SGD")
        assert training["initial_biases"].startswith(bias)


@pytest.mark.slow
def test_a_resume_keeps_the_runs_rule_and_reads_a_version_2_state_as_pytorchs(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(prepared, run, "--epochs", "1", "--update-rule", "pytorch") == 0
    before = (run / "state.safetensors").read_bytes()
    expect_error(
        capsys, ["train", str(prepared), "--out", str(run), "--resume", "--update-rule", "paper", "--no-progress"],
        "cannot change --update-rule paper (run: pytorch)",
    )
    assert (run / "state.safetensors").read_bytes() == before

    # A version-2 state (before --update-rule; trained with torch.optim.SGD) continues with that rule.
    meta, info, tensors = state_of(run)
    del info["hyperparameters"]["update_rule"]
    write_safetensors(run / "state.safetensors", tensors, {**meta, "format_version": "2", "state": json.dumps(info)})
    expect_error(
        capsys, ["train", str(prepared), "--out", str(run), "--resume", "--update-rule", "paper", "--no-progress"],
        "cannot change --update-rule paper (run: pytorch)",
    )
    assert train_cli(prepared, run, "--resume", "--epochs", "2") == 0
    meta, info, tensors = state_of(run)
    assert (meta["format_version"], info["epoch"], info["hyperparameters"]["update_rule"]) == ("3", 2, "pytorch")
    assert any(name.endswith("momentum_buffer") for name in tensors)

    # Version 1 (one parameter group) is still refused.
    write_safetensors(run / "state.safetensors", tensors, {**meta, "format_version": "1"})
    expect_error(capsys, ["train", str(prepared), "--out", str(run), "--resume", "--no-progress"], "format version 1")
