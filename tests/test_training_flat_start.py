"""The paper's flat start, and what a run says while it lasts: the lr never drops while the training loss sits
at ln(classes); the per-epoch line says the run is still at chance; the summary gives true durations; the
curve picture is redrawn at most every few seconds."""

from __future__ import annotations

import json
import math
import re

import pytest
from support.training import make_source, prepare_quietly, train_cli

import training.epoch_end
import training.run
from model.progress import AtMostEvery, format_duration
from training.epoch_end import flat_start_note, summary_line
from training.schedule import PlateauSchedule, at_chance

LN10 = math.log(10)


def test_at_chance_means_within_two_percent_of_ln_classes_or_above():
    assert at_chance(LN10, 10) and at_chance(LN10 + 0.004, 10) and at_chance(LN10 - 0.004, 10) and at_chance(3.0, 10)
    assert not at_chance(2.2, 10) and not at_chance(0.5, 10)
    assert at_chance(6.90, 1000) and not at_chance(6.7, 1000)


def test_the_lr_does_not_drop_while_the_training_loss_sits_at_chance():
    """A flat start longer than --plateau-start (a small dataset: few steps an epoch): 20 epochs at ln 10 with
    the error at chance. Without the loss, patience 5 would divide the lr at epoch 6, 11, 16."""
    flat = [(0.90 - 0.0001 * (epoch % 2), LN10 + 0.001 * (-1) ** epoch) for epoch in range(1, 21)]
    guarded = PlateauSchedule(0.01, patience=5, max_drops=3, factor=0.1, min_improvement=0.002, classes=10)
    assert [e for e, (error, loss) in enumerate(flat, 1) if guarded.step(error, e, loss)] == []
    assert guarded.lr == 0.01 and not guarded.left_chance
    unguarded = PlateauSchedule(0.01, patience=5, max_drops=3, factor=0.1, min_improvement=0.002)
    assert [e for e, (error, loss) in enumerate(flat, 1) if unguarded.step(error, e, loss)] == [6, 11, 16]

    # Learning starts at epoch 21; a plateau after it is what the rule is for, and it counts again.
    learning = {21: (0.80, 2.0), 22: (0.70, 1.8), **{e: (0.70, 1.7) for e in range(23, 29)}}
    drops = [e for e, (error, loss) in learning.items() if guarded.step(error, e, loss)]
    assert drops == [27] and guarded.lr == pytest.approx(0.001) and guarded.left_chance


def test_leaving_chance_is_remembered_in_the_resume_state():
    schedule = PlateauSchedule(0.01, patience=2, max_drops=3, factor=0.1, classes=10)
    schedule.step(0.9, 1, LN10)
    assert schedule.state_dict()["left_chance"] is False
    schedule.step(0.5, 2, 1.5)
    restored = PlateauSchedule(0.01, patience=2, max_drops=3, factor=0.1, classes=10)
    restored.load_state_dict(schedule.state_dict())
    assert restored.left_chance
    # Even if the loss later rises back to chance, the plateau counts: this is no longer the start.
    assert [restored.step(0.5, e, LN10) for e in (3, 4)] == [False, True]


@pytest.mark.parametrize(
    "seconds, text",
    [(0.04, "0.0 s"), (0.8, "0.8 s"), (16.24, "16.2 s"), (59.9, "59.9 s"), (59.97, "1 min 00 s"),
     (185.4, "3 min 05 s"), (3599.6, "1 h 00 min"), (7620, "2 h 07 min")],
)  # fmt: skip
def test_durations_are_true_with_a_decimal_under_a_minute(seconds, text):
    assert format_duration(seconds) == text


def test_the_summary_line_gives_the_whole_run_and_the_training_share():
    summary = {"epochs": 3, "train_seconds": 0.8, "wall_seconds": 16.2, "lr_drops": 0}
    assert summary_line(summary) == (
        "trained 3 epochs in 16.2 s (training steps 0.8 s; the rest evaluation, checkpoints and pictures), 0 lr drops"
    )
    old = {"epochs": 1, "train_seconds": 75.0, "lr_drops": 1}  # a summary.json from before wall_seconds
    assert summary_line(old).startswith("trained 1 epoch in 1 min 15 s (training steps 1 min 15 s;")
    assert summary_line(old).endswith(", 1 lr drop")


def test_at_most_every_lets_through_one_call_per_interval_and_every_forced_one():
    now = [100.0]
    throttle = AtMostEvery(10, clock=lambda: now[0])
    calls = []
    for t, force in [(101, False), (105, False), (110, False), (112, False), (115, True), (119, False), (125, False)]:
        now[0] = t
        calls.append(throttle.due(force=force))
    assert calls == [False, False, True, False, True, False, True]


def test_the_flat_start_note_says_it_in_plain_words():
    note = flat_start_note(10, "width-scaled", 2.3031)
    assert "loss still at chance (ln 10 = 2.30)" in note and "the paper's init (biases 1) starts flat" in note
    assert "let the run go on" in note
    assert "loss not yet below chance (ln 10 = 2.30)" in flat_start_note(10, "width-scaled", 2.9)
    caffe = flat_start_note(1000, "caffe", 6.9)
    assert "Caffe's init (biases 0.1)" in caffe and "still at chance (ln 1000 = 6.91)" in caffe


# Through the command line: a tiny run sits at chance (ln 3) for its few steps.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat-start")
    prepare_quietly(make_source(root / "src", classes=3, train=4, val=2), root / "prepared")
    return root / "prepared"


@pytest.mark.slow
@pytest.mark.parametrize("interval, drawn_after", [(3600.0, [3]), (0.0, [1, 2, 3])])
def test_a_runs_lines_and_pictures(prepared, tmp_path, capsys, monkeypatch, interval, drawn_after):
    """curves.png: only after the last epoch when the run is shorter than the interval; after every epoch at 0.
    Each epoch line carries the chance note exactly while no epoch's loss has left ln 3; the summary is true."""
    monkeypatch.setattr(training.run, "PICTURES_EVERY_SECONDS", interval)
    drawn = []
    real_write_curves = training.epoch_end.write_curves

    def counted_write_curves(out, history):
        drawn.append(len(history))
        return real_write_curves(out, history)

    monkeypatch.setattr(training.epoch_end, "write_curves", counted_write_curves)
    run = tmp_path / "run"
    assert train_cli(prepared, run, "--epochs", "3") == 0
    assert drawn == drawn_after and (run / "curves.png").exists() and (run / "filters.png").exists()

    err = capsys.readouterr().err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in err.splitlines() if re.match(r"epoch \d/3: train loss", line)]
    assert len(lines) == 3
    still_flat = True
    for m, line in zip(metrics, lines):
        still_flat = still_flat and at_chance(m["train_loss"], 3)
        assert ("chance (ln 3 = 1.10): the paper's init" in line) == still_flat, (m["train_loss"], line)
        assert m["wall_seconds"] > m["seconds"] > 0
    assert any("chance (ln 3 = 1.10)" in line for line in lines)  # (a tiny run's few steps: a real check)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_seconds"] == pytest.approx(sum(m["wall_seconds"] for m in metrics))
    expected = summary_line(summary)
    assert re.fullmatch(r"trained 3 epochs in \d+\.\d s \(training steps \d+\.\d s; .*\), 0 lr drops", expected)
    assert err.strip().splitlines()[-1] == expected
