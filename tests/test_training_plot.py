"""``python -m training plot RUN_DIR``: metrics.jsonl → a PNG of the training curves; bad metrics files are
refused with a clear message (exit 2); the training job redraws RUN_DIR/curves.png after every epoch."""

from __future__ import annotations

import json
import math
import sys

import pytest
from PIL import Image
from support.training import make_source, prepare_quietly, train_cli

from training.__main__ import main
from training.plot import CURVES_FILE, LR_DROP, TEN, VAL, draw_figure, lr_drops, write_curves

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[train]')")


def synthetic_history(epochs: int = 30, *, ten_crop: bool = True, drops=(12, 22)) -> list[dict]:
    """Metrics lines as train.py writes them: errors falling, lr ÷ 10 after the epochs in ``drops``."""
    records, lr = [], 0.01
    for epoch in range(1, epochs + 1):
        level = math.exp(-epoch / 9) - 0.02 * sum(1 for d in drops if epoch > d)  # a step down at each drop
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": 6.9 * level + 0.6,
            "train_top1_error": 0.75 * level + 0.15,
            "val_loss": 6.9 * level + 1.2,
            "val_top1_error": 0.55 * level + 0.40,
            "val_top5_error": 0.7 * level + 0.18,
            "images_per_second": 1800.0,
            "seconds": 60.0,
            "best": True,
            "lr_dropped_after": epoch in drops,
        }
        if ten_crop:
            record.update(
                val_ten_crop_loss=record["val_loss"] - 0.1,
                val_ten_crop_top1_error=record["val_top1_error"] - 0.02,
                val_ten_crop_top5_error=record["val_top5_error"] - 0.015,
            )
        records.append(record)
        if epoch in drops:
            lr /= 10
    return records


def write_run(tmp_path, records, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def colour_count(image: Image.Image, rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    """Pixels within ``tolerance`` of ``rgb`` on every channel."""
    bands = image.convert("RGB").split()
    masks = [band.point(lambda v, c=c: 255 if abs(v - c) <= tolerance else 0) for band, c in zip(bands, rgb)]
    both = masks[0]
    for mask in masks[1:]:
        both = Image.composite(both, mask.point(lambda v: 0), mask)
    return both.histogram()[255]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


@pytest.mark.slow
def test_plot_writes_a_png_of_the_curves_with_lr_drops(tmp_path, capsys):
    run = write_run(tmp_path, synthetic_history())
    assert main(["plot", str(run)]) == 0
    png = run / CURVES_FILE
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1400, 440)
        assert colour_count(image, hex_rgb(VAL)) > 2000  # the validation curves
        assert colour_count(image, hex_rgb(TEN)) > 1000  # the 10-patch curves
        assert colour_count(image, hex_rgb(LR_DROP), tolerance=40) > 200  # the lr-drop lines and their labels
        assert len(image.convert("RGB").getcolors(1 << 20)) > 100  # anti-aliased drawing, not a blank canvas
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    # --output elsewhere; a run without drops or 10-patch evaluations draws no lr line.
    plain = write_run(tmp_path, synthetic_history(5, ten_crop=False, drops=()), "plain")
    out = tmp_path / "pictures" / "plain.png"
    assert main(["plot", str(plain), "--output", str(out)]) == 0
    assert not (plain / CURVES_FILE).exists()
    with Image.open(out) as image:
        assert image.format == "PNG" and colour_count(image, hex_rgb(VAL)) > 500
        assert colour_count(image, hex_rgb(TEN)) == 0 and colour_count(image, hex_rgb(LR_DROP), tolerance=40) == 0


def test_lr_drops_come_from_the_records():
    history = synthetic_history(30, drops=(12, 22))
    assert lr_drops(history) == [(12.5, pytest.approx(0.001)), (22.5, pytest.approx(0.0001))]
    # A drop recorded after the last epoch so far: marked, its new lr not known yet.
    assert lr_drops(synthetic_history(12, drops=(12,))) == [(12.5, None)]
    # Older lines without lr_dropped_after: a lower lr from one epoch to the next is a drop.
    for r in history:
        del r["lr_dropped_after"]
    assert [position for position, _ in lr_drops(history)] == [12.5, 22.5]


def short_run(top1=(0.9375, 0.935, 0.93, 0.9275, 0.925, 0.9225), drops=(3, 4)) -> list[dict]:
    """A few epochs near chance: the errors move by fractions of a percent; lr ÷ 10 twice in a row."""
    records, lr = [], 0.001
    for epoch, error in enumerate(top1, 1):
        records.append({
            "epoch": epoch, "lr": lr, "train_loss": 6.9 - 0.1 * epoch, "train_top1_error": error + 0.01,
            "val_loss": 6.9 - 0.08 * epoch, "val_top1_error": error, "val_top5_error": error - 0.2 - 0.001 * epoch,
            "lr_dropped_after": epoch in drops,
        })
        if epoch in drops:
            lr /= 10
    return records


def visible_ticks(axis) -> list[tuple[float, str]]:
    low, high = sorted(axis.get_view_interval())
    return [(tick.get_loc(), tick.label1.get_text()) for tick in axis.get_major_ticks()
            if low - 1e-12 <= tick.get_loc() <= high + 1e-12]


@pytest.mark.slow
@pytest.mark.parametrize(
    "records, some_top1_labels",
    [(short_run(), {"92.5%", "93.5%", "94.0%"}), (synthetic_history(30), {"40%", "90%"})],
    ids=["short run", "30 epochs"],
)
def test_percent_tick_labels_read_their_ticks_value_and_differ(records, some_top1_labels):
    figure = draw_figure(records)
    figure.canvas.draw()
    for ax in figure.axes[1:]:  # top-1 and top-5 error
        ticks = visible_ticks(ax.yaxis)
        assert len(ticks) >= 3
        labels = [label for _, label in ticks]
        assert len(set(labels)) == len(labels), labels
        for value, label in ticks:
            assert label.endswith("%") and float(label[:-1]) == pytest.approx(100 * value, abs=1e-9), (value, label)
    # Half-percent steps get one decimal, whole tens none.
    assert some_top1_labels <= {label for _, label in visible_ticks(figure.axes[1].yaxis)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "records",
    [short_run(), synthetic_history(30, drops=(12, 13)), synthetic_history(30, drops=(12, 13, 14, 29))],
    ids=["short run, drops after 3 and 4", "drops after 12 and 13", "three in a row and one at the end"],
)
def test_labels_of_close_lr_drops_do_not_overlap(records):
    figure = draw_figure(records)
    figure.canvas.draw()
    loss = figure.axes[0]
    labels = [text for text in loss.texts if text.get_text().startswith("lr ")]
    assert len(labels) == len(lr_drops(records))
    renderer = figure.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    panel = loss.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert panel.x0 <= box.x0 and box.x1 <= panel.x1 + 1 and panel.y0 <= box.y0 and box.y1 <= panel.y1 + 1
        for j, other in enumerate(boxes[:i]):
            assert not box.overlaps(other), (labels[i].get_text(), labels[j].get_text(), box, other)
    assert [label.get_text() for label in labels][:2] == [f"lr → {lr:g}" for _, lr in lr_drops(records)][:2]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist: no epoch of this run has finished yet"),
        ("", "is empty: no epoch of this run has finished yet"),
        ("\n\n", "is empty"),
        ('{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2, "train_lo', "line 2: not JSON"),
        ("[1, 2]\n", "line 1: not a metrics record"),
        ('{"epoch": 1, "val_loss": "high"}\n', "line 1: val_loss is 'high', not a number"),
        (b"\xff\xfe\x00garbage", "not a text file"),
    ],
)
def test_bad_metrics_files_are_refused_clearly(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if isinstance(content, bytes):
        (run / "metrics.jsonl").write_bytes(content)
    elif content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run / "metrics.jsonl") in err and message in err, err
    assert sorted(p.name for p in run.iterdir()) == (["metrics.jsonl"] if content is not None else [])


def test_a_missing_run_folder_is_refused(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_without_matplotlib_plot_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path, synthetic_history(3))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure → ImportError
    assert main(["plot", str(run)]) == 2
    assert "needs matplotlib: pip install" in capsys.readouterr().err
    # For the training loop the same problem is a one-line note, never an exception.
    note = write_curves(run, synthetic_history(3))
    assert note.startswith("note: no curves.png: ") and "pip install" in note
    assert not (run / CURVES_FILE).exists()


def test_a_plotting_failure_is_a_note_for_training(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run folder should be")
    note = write_curves(blocker, synthetic_history(3))
    assert note.startswith("note: could not draw curves.png: ")


@pytest.mark.slow
def test_training_draws_the_curves_after_each_epoch(tmp_path, capsys, monkeypatch):
    data = tmp_path / "prepared"
    prepare_quietly(make_source(tmp_path / "src", classes=2, train=3, val=1), data)
    run = tmp_path / "run"
    assert train_cli(data, run, "--epochs", "1") == 0
    first = (run / CURVES_FILE).read_bytes()
    assert main(["plot", str(run), "--output", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == first  # the same picture as `plot` draws from metrics.jsonl

    # Without matplotlib, training goes on and says once why there is no picture.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    capsys.readouterr()
    assert train_cli(data, run, "--resume", "--epochs", "3") == 0
    err = capsys.readouterr().err
    assert err.count("note: no curves.png: drawing the curves needs matplotlib") == 1, err
    assert "epoch 3/3" in err
    assert (run / CURVES_FILE).read_bytes() == first  # the last picture drawn stays


@pytest.mark.slow
def test_training_draws_the_kernels_after_each_epoch_and_plot_draws_any_checkpoints(tmp_path, capsys):
    """filters.png: the paper's Fig. 3 for the epoch's weights; `plot CHECKPOINT` for any checkpoint."""
    from model import load_checkpoint
    from model.visualize import filters_image

    data = tmp_path / "prepared"
    prepare_quietly(make_source(tmp_path / "src", classes=2, train=3, val=1), data)
    run = tmp_path / "run"
    assert train_cli(data, run, "--epochs", "1") == 0
    checkpoint = load_checkpoint(run / "last.safetensors")
    expected = filters_image(checkpoint.state_dict["conv1.weight"])
    with Image.open(run / "filters.png") as image:
        assert image.size == expected.size and image.convert("RGB").tobytes() == expected.tobytes()
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / CURVES_FILE), str(run / "filters.png")]
    assert main(["plot", str(run / "last.safetensors")]) == 0
    beside = run / "last.filters.png"
    assert capsys.readouterr().out.strip() == str(beside) and beside.read_bytes() == (run / "filters.png").read_bytes()
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    assert main(["plot", str(tmp_path / "broken.safetensors")]) == 1  # a bad checkpoint, as predict and export
    assert "broken.safetensors" in capsys.readouterr().err
