"""training/: prepare → train → evaluate → a checkpoint the model package loads; bad input of every kind.

Helpers (``make_source``, ``prepare_quietly``, ``train_cli``) are in tests/support/training.py, shared with
the other test_training_* files. Nets are scaled down (width 1/16) and datasets hold a few tiny images per class.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch
from support.training import (
    PHOTOS,
    REPO,
    WNIDS,
    digest,
    expect_error,
    make_source,
    prepare_quietly,
    train_cli,
    tree_digest,
)

import model
from model import AlexNet, Checkpoint, Preprocessing, imagenet_classes, load_checkpoint, load_image
from training.__main__ import main
from training.data import IMAGE_BYTES, PreparedDataset
from training.errors import TrainingError
from training.prepare import prepare


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A prepared 3-class dataset (4 train + 2 val images per class, one corrupt train file), via the pool."""
    root = tmp_path_factory.mktemp("tiny")
    src = make_source(root / "src")
    (src / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    prepare(src, root / "prepared", workers=2, chunk=3, show_progress=False)
    return root / "prepared"


# prepare


def test_prepare_stores_the_shared_preprocessing_and_exact_stats(tiny):
    meta = json.loads((tiny / "dataset.json").read_text())
    assert meta["format"] == "alexnet-prepared" and meta["format_version"] == 1
    names = {c.wnid: c.name for c in imagenet_classes()}
    assert meta["classes"] == [{"wnid": w, "name": names[w]} for w in WNIDS[:3]]
    assert meta["splits"] == {"train": {"images": 12, "skipped": 1}, "val": {"images": 6, "skipped": 0}}
    skipped = (tiny / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"train\ttrain/{WNIDS[0]}/broken.JPEG\tCorruptImage")

    dataset = PreparedDataset(tiny)
    src = tiny.parent / "src"
    for split in ("train", "val"):
        s = dataset.split(split)
        assert (tiny / f"{split}.u8").stat().st_size == len(s) * IMAGE_BYTES
        for i, (file, label) in enumerate(zip(s.files, s.labels.tolist())):
            assert file.split("/")[1] == WNIDS[label]
            assert torch.equal(s.images[i], load_image((src / file).read_bytes(), size=256))  # the shared path

    images = dataset.split("train").images
    stats = dataset.stats
    torch.testing.assert_close(stats.mean_image, images.double().mean(0).float())
    pixels = images.permute(1, 0, 2, 3).reshape(3, -1).double() / 255
    torch.testing.assert_close(stats.covariance.double(), torch.cov(pixels, correction=0), rtol=1e-5, atol=1e-8)
    p, lam = stats.eigenvectors.double(), stats.eigenvalues.double()
    torch.testing.assert_close(p @ torch.diag(lam) @ p.T, stats.covariance.double(), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_prepare_flat_val_with_ground_truth_and_real_photos(tmp_path):
    """The real photos (one grayscale, one EXIF-rotated) as a flat val/ with Caffe's val.txt."""
    photos = sorted(PHOTOS.glob("*.JPEG"))
    assert len(photos) == 10
    wnids = sorted({p.name.split("_")[0] for p in photos})
    src = make_source(tmp_path / "src", classes=len(wnids), train=1, val=0, wnids=wnids)
    (src / "val").mkdir()
    lines = []
    for i, photo in enumerate(photos):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        (src / "val" / name).write_bytes(photo.read_bytes())
        lines.append(f"{name} {wnids.index(photo.name.split('_')[0])}")
    (tmp_path / "gt.txt").write_text("\n".join(reversed(lines)) + "\n")
    prepare_quietly(src, tmp_path / "prepared", val_labels=tmp_path / "gt.txt")

    val = PreparedDataset(tmp_path / "prepared").split("val")
    assert val.files == [f"val/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(10)]
    for i, photo in enumerate(photos):
        assert wnids[val.labels[i]] == photo.name.split("_")[0]
        assert torch.equal(val.images[i], load_image(photo.read_bytes()))


@pytest.mark.slow
def test_prepare_resumes_where_it_was_interrupted(tiny, tmp_path, monkeypatch):
    import training.prepare_split as prep

    decode, calls = prep._decode, []

    def interrupted(task):
        calls.append(task[0])
        if len(calls) == 8:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) would, mid-split
        return decode(task)

    src, dest = tiny.parent / "src", tmp_path / "prepared"
    monkeypatch.setattr(prep, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_quietly(src, dest, chunk=3)
    assert not (dest / "dataset.json").exists() and not (dest / "train.u8").exists()
    with pytest.raises(TrainingError, match="did not finish; rerun `prepare`"):
        PreparedDataset(dest)

    calls.clear()
    monkeypatch.setattr(prep, "_decode", lambda task: calls.append(task[0]) or decode(task))
    prepare_quietly(src, dest, chunk=3)
    assert len(calls) == 13 - 6 + 6  # train resumed after the 6 recorded images (2 chunks of 3), then val
    for name in ("train.u8", "val.u8", "train.json", "val.json", "stats.safetensors", "skipped.txt"):
        assert digest(dest / name) == digest(tiny / name), name  # identical to an uninterrupted run
    assert [p.name for p in dest.glob(".*")] == []  # no partial or progress files left, and no .lock

    calls.clear()
    before = tree_digest(dest)
    prepare_quietly(src, dest)  # already done: nothing is decoded or rewritten
    assert calls == [] and tree_digest(dest) == before


# prepare → train → evaluate → load


@pytest.mark.slow
def test_prepare_train_evaluate_and_load(tiny, tmp_path, monkeypatch):
    calls = []
    from_uint8 = model.Preprocessor.from_uint8

    def spy(self, images, crops="center"):
        calls.append(crops)
        return from_uint8(self, images, crops)

    monkeypatch.setattr(model.Preprocessor, "from_uint8", spy)  # evaluation must go through it
    run = tmp_path / "run"
    assert train_cli(tiny, run, "--ten-crop") == 0
    assert {"center", "ten"} <= set(calls)
    for name in ("state.safetensors", "last.safetensors", "best.safetensors", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["lr"] == 0.003 and m["seconds"] > 0 and m["images_per_second"] > 0
        assert all(0 <= m[k] <= 1 for k in ("val_top1_error", "val_top5_error", "train_top1_error"))
        assert m["train_loss"] > 0 and m["val_loss"] > 0 and "val_ten_crop_top1_error" in m

    best = load_checkpoint(run / "best.safetensors")
    dataset = PreparedDataset(tiny)
    assert best.classes == dataset.classes and best.classes[0].name.startswith("tench")
    assert best.trained and best.config.num_classes == 3 and best.config.width == 0.0625
    assert best.preprocessing == Preprocessing(mean="image")
    assert torch.equal(best.mean_image, dataset.stats.mean_image)
    assert best.pca["alpha_std"] == 0.1 and len(best.pca["eigenvalues"]) == 3
    p = best.provenance
    assert p["dataset"] == "src" and p["dataset_size"] == 12 and p["epoch"] in (1, 2)
    assert p["val_top1_error"] == min(m["val_top1_error"] for m in metrics)
    assert "val_ten_crop_top1_error" in p  # added by the final 10-patch evaluation
    assert best.training["lr"] == 0.003 and best.training["batch_size"] == 4 and best.training["momentum"] == 0.9
    assert load_checkpoint(run / "last.safetensors").provenance["epoch"] == 2

    # The service's path: bytes → Preprocessor.from_bytes → grouped net.
    photo = next(PHOTOS.glob("*.JPEG")).read_bytes()
    logits = best.build_grouped()(best.preprocessor().from_bytes(photo)).detach()
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()

    calls.clear()
    assert main(["evaluate", str(run / "best.safetensors"), str(tiny), "--device", "cpu", "--no-progress"]) == 0
    assert calls.count("center") >= 1 and calls.count("ten") >= 1
    report = json.loads((run / "best.eval-val.json").read_text())
    assert report["images"] == 6 and report["checkpoint_sha256"] == digest(run / "best.safetensors")
    centre, ten = report["results"]["center"], report["results"]["ten"]
    # The grouped net on the command line and the two-tower net in training give the same numbers.
    assert centre["top1_error"] == p["val_top1_error"] and abs(centre["loss"] - p["val_loss"]) < 1e-4
    assert ten["top1_error"] == p["val_ten_crop_top1_error"] and ten["images"] == 6


def test_evaluate_maps_a_subset_of_the_checkpoint_classes(tiny, tmp_path):
    """A 1000-class checkpoint evaluated on 3 of its classes: labels are matched by wnid."""
    net = AlexNet(1000, width=0.0625)
    checkpoint = Checkpoint.from_model(
        net, preprocessing=Preprocessing(mean="image"), mean_image=PreparedDataset(tiny).stats.mean_image
    )
    checkpoint.save(tmp_path / "imagenet.safetensors")
    out = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            str(tmp_path / "imagenet.safetensors"),
            str(tiny),
            "--crops",
            "center",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["checkpoint_classes"] == 1000 and result["classes"] == 3 and list(result["results"]) == ["center"]
    # The same numbers by hand, with each label looked up by wnid among the 1000 classes.
    val = PreparedDataset(tiny).split("val")
    saved = load_checkpoint(tmp_path / "imagenet.safetensors")
    with torch.no_grad():
        logits = saved.build_grouped().eval()(saved.preprocessor().from_uint8(val.images))
    index = {c.wnid: i for i, c in enumerate(imagenet_classes())}
    labels = torch.tensor([index[WNIDS[label]] for label in val.labels])
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert abs(result["results"]["center"]["loss"] - expected) < 1e-5
    assert result["results"]["center"]["top1_error"] == (logits.argmax(1) != labels).float().mean().item()


# Bad input: a clear message, exit status 2, nothing already written is damaged.


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_train", "missing the train/ folder"),
        ("no_val", "missing the val/ folder"),
        ("empty_train", "train: empty split"),
        ("empty_val", "val: empty split"),
        ("empty_class", "class folder with no images"),
        ("unknown_val_class", "'n09999999' is not one of the classes in train/"),
        ("flat_val_without_labels", "pass --val-labels"),
        ("flat_val_bad_label", "class index 7 is outside 0..2"),
        ("all_corrupt", "none of the 3 images could be decoded"),
    ],
)
def test_prepare_rejects_bad_sources(tmp_path, capsys, breakage, message):
    src = make_source(tmp_path / "src", train=1, val=1)
    import shutil

    if breakage == "no_train":
        shutil.rmtree(src / "train")
    elif breakage == "no_val":
        shutil.rmtree(src / "val")
    elif breakage == "empty_train":
        shutil.rmtree(src / "train")
        (src / "train").mkdir()
    elif breakage == "empty_val":
        shutil.rmtree(src / "val")
        (src / "val").mkdir()
    elif breakage == "empty_class":
        for f in (src / "train" / WNIDS[1]).iterdir():
            f.unlink()
        (src / "train" / WNIDS[1] / "notes.txt").write_text("not an image")
    elif breakage == "unknown_val_class":
        (src / "val" / WNIDS[0]).rename(src / "val" / "n09999999")
    elif breakage in ("flat_val_without_labels", "flat_val_bad_label"):
        for f in list((src / "val").rglob("*.JPEG")):
            f.rename(src / "val" / f.name)
        for d in [d for d in (src / "val").iterdir() if d.is_dir()]:
            d.rmdir()
        if breakage == "flat_val_bad_label":
            names = sorted(p.name for p in (src / "val").iterdir())
            (src / "val.txt").write_text("".join(f"{n} {7 if i == 1 else 0}\n" for i, n in enumerate(names)))
    elif breakage == "all_corrupt":
        for f in (src / "train").rglob("*.JPEG"):
            f.write_bytes(b"")
    dest = tmp_path / "prepared"
    expect_error(capsys, ["prepare", str(src), str(dest), "--workers", "0", "--no-progress"], message)
    assert not (dest / "dataset.json").exists()


def test_prepare_refuses_to_overwrite_or_to_start_without_disk_space(tiny, tmp_path, capsys, monkeypatch):
    other = make_source(tmp_path / "other", classes=2, train=1, val=1)
    before = tree_digest(tiny)
    expect_error(capsys, ["prepare", str(other), str(tiny), "--no-progress"], "already holds a prepared dataset")
    assert tree_digest(tiny) == before

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    expect_error(capsys, ["prepare", str(other), str(tmp_path / "busy"), "--no-progress"], "not empty")
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"

    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    dest = tmp_path / "full"
    expect_error(
        capsys, ["prepare", str(other), str(dest), "--no-progress"], "not enough disk space", "0.00 GB are free"
    )
    assert [p.name for p in dest.iterdir()] == []


def test_data_from_another_format_version_is_refused(tiny, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    meta = json.loads((old / "dataset.json").read_text())
    (old / "dataset.json").write_text(json.dumps({**meta, "format_version": 0}))
    before = tree_digest(old)
    expect_error(capsys, ["train", str(old), "--out", str(tmp_path / "run"), "--no-progress"], "format version 0")
    checkpoint = tmp_path / "c.safetensors"
    Checkpoint.from_model(
        AlexNet(3, width=0.0625),
        classes=PreparedDataset(tiny).classes,
        preprocessing=Preprocessing(mean="image"),
        mean_image=torch.zeros(3, 256, 256),
    ).save(checkpoint)
    expect_error(capsys, ["evaluate", str(checkpoint), str(old), "--no-progress"], "format version 0", "prepare")
    expect_error(capsys, ["prepare", str(tiny.parent / "src"), str(old), "--no-progress"], "format version 0")
    assert tree_digest(old) == before
    assert not (tmp_path / "run").exists()


def test_evaluate_rejects_classes_the_checkpoint_does_not_know(tiny, tmp_path, capsys):
    classes = tuple(model.ImageClass(w, w) for w in ("n00000001", WNIDS[1], "n00000003"))
    checkpoint = tmp_path / "other-classes.safetensors"
    Checkpoint.from_model(
        AlexNet(3, width=0.0625),
        classes=classes,
        preprocessing=Preprocessing(mean="image"),
        mean_image=torch.zeros(3, 256, 256),
    ).save(checkpoint)
    expect_error(
        capsys,
        ["evaluate", str(checkpoint), str(tiny), "--no-progress"],
        "not among the checkpoint's 3 classes",
        WNIDS[0],
    )
    assert not (tmp_path / "other-classes.eval-val.json").exists()
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    expect_error(capsys, ["evaluate", str(tmp_path / "broken.safetensors"), str(tiny)], "broken.safetensors")


@pytest.mark.slow
def test_train_rejects_bad_runs_without_touching_files(tiny, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    expect_error(capsys, ["train", str(tiny), "--out", str(run), "--resume"], "holds no resume state")
    expect_error(
        capsys, ["train", str(tiny), "--out", str(run), "--batch-size", "64"], "larger than the training split"
    )
    expect_error(capsys, ["train", str(tiny), "--out", str(run), "--devices", "cuda:5"], "GPU")
    expect_error(
        capsys,
        ["train", str(tiny), "--out", str(run), "--lr", "-1", "--epochs", "0"],
        "--lr must be positive",
        "--epochs",
    )
    expect_error(capsys, ["train", str(tmp_path / "nowhere"), "--out", str(run)], "no such directory")
    assert not run.exists()

    assert train_cli(tiny, run, "--epochs", "1") == 0
    before = tree_digest(run)
    expect_error(capsys, ["train", str(tiny), "--out", str(run)], "already holds a run", "--resume")
    expect_error(
        capsys,
        ["train", str(tiny), "--out", str(run), "--resume", "--lr", "0.1"],
        "cannot change --lr 0.1 (run: 0.003)",
    )
    assert tree_digest(run) == before

    # A full disk while writing epoch 2: the error says so; epoch 1's files are intact.
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    expect_error(
        capsys,
        ["train", str(tiny), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"],
        "no space left on device",
        "--resume",
    )
    assert tree_digest(run) == before  # no half-written file, no temporary left behind
    monkeypatch.undo()
    assert load_checkpoint(run / "last.safetensors").provenance["epoch"] == 1


@pytest.mark.slow
def test_command_line_exit_status_and_message():
    """The real process: exit status 2 and one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "/nonexistent/prepared", "--out", "/nonexistent/run"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: /nonexistent/prepared: no such directory (expected the output of `python -m training prepare`)"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [("--amp", "bf16", "--channels-last"), ("--amp", "fp16"), ("--conv1-padding", "none")],
    ids=["bf16-channels-last", "fp16", "caffe-227-crops"],
)
def test_precision_memory_format_and_crop_variants_train(tiny, tmp_path, flags):
    run = tmp_path / "run"
    assert train_cli(tiny, run, "--epochs", "1", *flags) == 0
    checkpoint = load_checkpoint(run / "last.safetensors")  # finite float32 weights (the loader checks)
    assert all(t.dtype == torch.float32 for t in checkpoint.state_dict.values())
    assert checkpoint.training[flags[0].lstrip("-").replace("-", "_")] == flags[1]
    assert checkpoint.training["channels_last"] == ("--channels-last" in flags)
    crop = 227 if "none" in flags else 224
    assert checkpoint.preprocessing.crop == checkpoint.config.input_size == crop


@pytest.mark.slow
def test_a_directory_in_use_by_another_job_is_refused(tiny, tmp_path, capsys):
    from training.directory_lock import DirectoryLock

    dest, run = tmp_path / "prepared", tmp_path / "run"
    held = [DirectoryLock(dest, "`prepare`"), DirectoryLock(run, "training run")]  # as another process would
    try:
        expect_error(
            capsys, ["prepare", str(tiny.parent / "src"), str(dest), "--no-progress"], "in use by another `prepare`"
        )
        expect_error(
            capsys, ["train", str(tiny), "--out", str(run), "--batch-size", "4"], "in use by another training run"
        )
    finally:
        for lock in held:
            lock.release()
    assert sorted(p.name for p in dest.iterdir()) == [] and sorted(p.name for p in run.iterdir()) == []
