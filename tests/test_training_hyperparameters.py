"""The hyperparameter declarations: the flags, bounds and resume rules that come from them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from training.errors import TrainingError
from training.hyperparameters import (
    FIXED_ON_RESUME,
    Hyperparameters,
    add_flags,
    check,
    given_flags,
    markdown_table,
    resolve,
)


def test_a_resume_keeps_what_makes_the_run_and_may_change_how_long_and_when_lr_drops():
    recipe = "batch_size lr momentum weight_decay decay_biases lr_drop_factor width dropout conv1_padding"
    assert set(FIXED_ON_RESUME) == {*recipe.split(), "lighting_std", "seed", "amp", "init", "update_rule"}
    saved = {**vars(Hyperparameters()), "lr": 0.003}
    assert resolve({"epochs": 7, "patience": 2}, saved) == Hyperparameters(epochs=7, patience=2, lr=0.003)
    with pytest.raises(TrainingError, match=r"cannot change --seed 1 \(run: 0\)"):
        resolve({"seed": 1}, saved)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"min_improvement": -0.1}, "--min-improvement must be in [0, 1) (an absolute top-1 error)"),
        ({"plateau_start": -1}, "--plateau-start must be at least 0"),
        ({"init": "xavier"}, "--init must be one of width-scaled, paper, caffe"),
        ({"amp": "fp8"}, "--amp must be one of off, bf16, fp16"),
    ],
)
def test_each_bound_is_checked(values, message):
    with pytest.raises(TrainingError) as raised:
        check(Hyperparameters(**values))
    assert str(raised.value) == message
    check(Hyperparameters())  # the paper's values pass


def test_only_given_flags_reach_the_run():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    given = given_flags(parser.parse_args(["--lr", "0.02", "--decay-biases"]))
    assert given == {"lr": 0.02, "decay_biases": True}
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr-drop-factor", "0.5"])  # declared without a flag


def test_the_docs_table_is_the_declarations():
    docs = Path(__file__).resolve().parents[1] / "docs" / "training-formats.md"
    assert markdown_table() in docs.read_text()
