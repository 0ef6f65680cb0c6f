"""The paper's SGD update (§5), with the learning rate inside the velocity:

    v ← momentum·v − weight_decay·lr·w − lr·∂L/∂w
    w ← w + v

torch.optim.SGD keeps the learning rate outside (b ← momentum·b + weight_decay·w + ∂L/∂w, w ← w − lr·b).
The two agree while the learning rate is constant (then v = −lr·b). They differ at a drop: SGD's next
step is at once 10× shorter, while the paper's velocity still carries the old rate and shrinks with it
over ~1/(1 − momentum) steps (about 20–40 steps to settle at momentum 0.9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .hyperparameters import Hyperparameters

# The two rules ``--update-rule`` chooses between, and the name of each one's per-parameter state.
UPDATE_RULES = ("paper", "pytorch")
STATE_KEYS = {"paper": "velocity", "pytorch": "momentum_buffer"}


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum as the paper writes it; per-group ``lr``, ``momentum`` and ``weight_decay``.

    A parameter's velocity starts at zero, so the first step is −lr·(∂L/∂w + weight_decay·w), as SGD's.
    Parameters without a gradient are left alone (their velocity too), as SGD does.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"PaperSGD: lr {lr} must be positive, momentum {momentum} in [0, 1), weight decay ≥ 0")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            # Foreach kernels want their lists on one device; the towers may sit on two.
            by_device: dict[torch.device, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                weights, grads, velocities = by_device.setdefault(p.device, ([], [], []))
                weights.append(p)
                grads.append(p.grad)
                velocities.append(state["velocity"])
            for weights, grads, velocities in by_device.values():
                torch._foreach_mul_(velocities, momentum)
                if weight_decay:
                    torch._foreach_add_(velocities, weights, alpha=-weight_decay * lr)
                torch._foreach_add_(velocities, grads, alpha=-lr)
                torch._foreach_add_(weights, velocities)
        return loss


def make_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    """SGD by ``hp.update_rule`` (update_rule.py: the paper's, or torch.optim.SGD) with two parameter
    groups: weights decayed by ``weight_decay``; biases too only with ``decay_biases`` (the paper's update
    rule decays w; cuda-convnet's ``wc`` and Caffe's ``decay_mult: 0`` leave biases undecayed, and so do
    we by default)."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": hp.weight_decay},
        {"params": biases, "weight_decay": hp.weight_decay if hp.decay_biases else 0.0},
    ]
    if hp.update_rule == "pytorch":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
    return PaperSGD(groups, lr=hp.lr, momentum=hp.momentum)
