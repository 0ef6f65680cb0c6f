"""The learning-rate schedule: ÷ 10 whenever the validation error stopped improving (paper §5).

Two guards make that a rule that survives real runs.
An improvement counts only when the top-1 error falls by at least ``min_improvement`` (about ImageNet's noise).
Epochs up to ``start_epoch``, and every epoch before the training loss first leaves chance, never count.
With the paper's init the loss can sit at chance for a while: counting those epochs would drop the rate early.
The flat start lasts a number of steps, not epochs: on a small dataset it outlasts any ``start_epoch``.
"""

from __future__ import annotations

import math

# The loss has left chance once it is below (1 − CHANCE_MARGIN)·ln(classes): 2.26 for 10 classes, 6.77
# for 1000. A flat start wanders within a few thousandths of ln(classes).
CHANCE_MARGIN = 0.02


def at_chance(loss: float, classes: int) -> bool:
    """Whether a training loss is still where an untrained net's is: about ln(classes), or above (the paper's
    init gives each class a constant logit offset, so the very first loss is often above ln(classes))."""
    return loss > (1 - CHANCE_MARGIN) * math.log(classes)


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
        classes: int | None = None,
    ):
        self.lr, self.patience, self.max_drops, self.factor = lr, patience, max_drops, factor
        self.min_improvement, self.start_epoch, self.classes = min_improvement, start_epoch, classes
        self.best = math.inf
        self.epochs_without_improvement = 0
        self.drops = 0
        self.left_chance = classes is None  # without a class count there is no chance level to wait for

    def step(self, error: float, epoch: int, train_loss: float | None = None) -> bool:
        """Record the validation error and the mean training loss after ``epoch`` (1-based); True when the
        learning rate was just lowered."""
        if not self.left_chance and train_loss is not None and not at_chance(train_loss, self.classes):
            self.left_chance = True  # for good: a later rise back to chance is a plateau like any other
        if error < self.best - self.min_improvement:
            self.best, self.epochs_without_improvement = error, 0
            return False
        if epoch <= self.start_epoch or not self.left_chance:
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
            "left_chance": self.left_chance,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best = float(state["lr"]), float(state["best"])
        self.epochs_without_improvement, self.drops = int(state["epochs_without_improvement"]), int(state["drops"])
        # (a state from before this guard: the next epoch's loss decides, as it would have here)
        self.left_chance = bool(state.get("left_chance", self.classes is None))
