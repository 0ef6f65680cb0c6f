"""The whole recipe learns: 4 classes of synthetic images (colour + shape), a 1/8-width net, clearly
better than chance (75 % top-1 error) on held-out images.

The recipe is the paper's (SGD, momentum 0.9, weight decay 5e-4, augmentation, dropout, plateau drops)
except the learning rate: with 4 classes and batches of 16, the paper's 0.01 swings the class priors
too hard. Over seeds 0–3 this configuration reached a best validation error of 0–31 % in 12 epochs.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image, ImageDraw
from support.training import COLOURS, SHAPES, make_source, prepare_quietly

from model import load_checkpoint
from training.__main__ import main


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The run folder of the recipe trained on the synthetic task (shared by the tests below)."""
    tmp_path = tmp_path_factory.mktemp("learning")
    prepared = tmp_path / "prepared"
    prepare_quietly(make_source(tmp_path / "src", classes=4, train=16, val=4), prepared)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(prepared),
            "--out",
            str(run),
            "--width",
            "0.125",
            "--batch-size",
            "16",
            "--epochs",
            "14",
            "--lr",
            "0.006",
            "--workers",
            "1",
            "--seed",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    return run


@pytest.mark.slow
def test_a_scaled_down_net_learns_a_synthetic_task(learned):
    run = learned
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(m["val_top1_error"] for m in metrics)
    assert best <= 0.4, [m["val_top1_error"] for m in metrics]  # chance: 0.75
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]

    checkpoint = load_checkpoint(run / "best.safetensors")
    assert checkpoint.provenance["val_top1_error"] == best
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["center"]["top1_error"] == best
    assert summary["val"]["ten"]["top1_error"] <= 0.5  # the paper's 10-patch average agrees


def planted(kind: int, left: int, size: int = 80) -> Image.Image:
    """One object of class ``kind`` (test_training's colours and shapes) at a known place on plain grey."""
    image = Image.new("RGB", (256, 256), (128, 128, 128))
    draw, top, colour = ImageDraw.Draw(image), 88, COLOURS[kind]
    box = (left, top, left + size, top + size)
    if SHAPES[kind] == "ellipse":
        draw.ellipse(box, fill=colour)
    elif SHAPES[kind] == "rectangle":
        draw.rectangle(box, fill=colour)
    elif SHAPES[kind] == "triangle":
        draw.polygon([(left, top + size), (left + size, top + size), (left + size // 2, top)], fill=colour)
    else:
        draw.rectangle((left, top, left + size, top + size // 3), fill=colour)
    return image


@pytest.mark.slow
def test_grad_cam_finds_the_planted_object(learned, tmp_path):
    """Grad-CAM (model.visualize) of the trained net for each class, its object drawn on the left or on the
    right: the heat map's centre of mass and its hottest column lie on the object's side."""
    from model.visualize import grad_cam, overlay

    checkpoint = load_checkpoint(learned / "best.safetensors")
    net, preprocessor = checkpoint.build(), checkpoint.preprocessor()
    crop_offset = (256 - 224) // 2
    for kind in range(4):
        for left in (30, 146):
            image = planted(kind, left)
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            heat, explained, probability = grad_cam(net, preprocessor.from_bytes(buffer.getvalue()), kind)
            assert explained == kind and 0 < probability <= 1 and heat.shape == (224, 224)
            centre = left + 40 - crop_offset  # the object's centre column in the 224 crop
            columns = heat.sum(0)
            mass_centre = float((columns * torch.arange(224)).sum() / columns.sum())
            hottest = int(columns.argmax())
            on_its_side = (lambda c: c < 112) if centre < 112 else (lambda c: c >= 112)
            assert on_its_side(mass_centre) and on_its_side(hottest), (kind, left, mass_centre, hottest)
    overlay(image.crop((16, 16, 240, 240)), heat).save(tmp_path / "grad-cam.png")  # to look at
