"""The learning-rate schedule: ÷ 10 whenever the validation error stopped improving (paper §5).

The paper says no more than that. Two guards turn it into a rule that survives real runs:
  * an improvement counts only when the centre-crop top-1 error falls by at least ``min_improvement``
    (absolute: 0.002 = 0.2 percentage points, about the epoch-to-epoch noise of ImageNet's 50,000
    validation images), so a gain inside the noise does not reset the count;
  * epochs up to ``start_epoch`` never count as epochs without improvement. With the paper's init the
    error can sit at chance for several epochs before anything is learned; counting them would divide the
    learning rate before learning starts (seen: a 10-class run dropped to 0.001 at epoch 7, still at 90 %).
"""

from __future__ import annotations

import math


class PlateauSchedule:
    """lr × ``factor`` after ``patience`` counted epochs without an improvement, at most ``max_drops`` times."""

    def __init__(
        self,
        lr: float,
        patience: int,
        max_drops: int,
        factor: float,
        min_improvement: float = 0.0,
        start_epoch: int = 0,
    ):
        self.lr, self.patience, self.max_drops, self.factor = lr, patience, max_drops, factor
        self.min_improvement, self.start_epoch = min_improvement, start_epoch
        self.best = math.inf
        self.epochs_without_improvement = 0
        self.drops = 0

    def step(self, error: float, epoch: int) -> bool:
        """Record the validation error after ``epoch`` (1-based); True when the learning rate was just lowered."""
        if error < self.best - self.min_improvement:
            self.best, self.epochs_without_improvement = error, 0
            return False
        if epoch <= self.start_epoch:
            return False
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= self.patience and self.drops < self.max_drops:
            self.lr *= self.factor
            self.drops += 1
            self.epochs_without_improvement = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "best": self.best,
            "epochs_without_improvement": self.epochs_without_improvement,
            "drops": self.drops,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.epochs_without_improvement, self.drops = int(state["epochs_without_improvement"]), int(state["drops"])
