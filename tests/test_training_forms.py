"""``prepare`` reads each form ImageNet comes in, as it is: small copies written here from the ten shipped
ImageNet photos (shrunk to keep the tests fast), every label and every stored image checked."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from support.training import PHOTOS, prepare_quietly

from model import imagenet_classes, load_image
from training.__main__ import main
from training.data import SPLITS, PreparedDataset
from training.errors import TrainingError
from training.sources import class_list_sha256
from training.val_labels import UNEVEN_FROM_MEAN

PHOTO_FILES = sorted(PHOTOS.glob("*.JPEG"))
WNIDS = sorted(p.name.split("_")[0] for p in PHOTO_FILES)  # ten classes, one photo each
STANDARD = [c.wnid for c in imagenet_classes()]


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


class Copy:
    """The images of a small ImageNet: per class two train images (the photo and its mirror image) and one
    val image named ILSVRC2012_val_0000000N.JPEG, N in an order that is not the classes' order."""

    def __init__(self):
        self.train: dict[str, list[tuple[str, bytes]]] = {}
        self.val: list[tuple[str, str, bytes]] = []  # (file, wnid, bytes), in ID order
        self.content: dict[str, bytes] = {}  # base name → bytes
        self.truth: dict[str, str] = {}  # base name → wnid
        order = list(WNIDS)
        random.Random(3).shuffle(order)
        for path in PHOTO_FILES:
            wnid = path.name.split("_")[0]
            photo = Image.open(path).convert("RGB")
            photo.thumbnail((72, 72))
            images = [(f"{wnid}_{i}.JPEG", jpeg(im)) for i, im in enumerate((photo, ImageOps.mirror(photo)))]
            self.train[wnid] = images
            for name, data in images:
                self.content[name], self.truth[name] = data, wnid
            val_name = f"ILSVRC2012_val_{order.index(wnid) + 1:08d}.JPEG"
            self.content[val_name], self.truth[val_name] = jpeg(photo.rotate(90, expand=True)), wnid
        for n, wnid in enumerate(order, 1):
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            self.val.append((name, wnid, self.content[name]))


@pytest.fixture(scope="module")
def copy() -> Copy:
    return Copy()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files:
            add(tar, name, data)
    return out.getvalue()


def write_tar(path: Path, files: list[tuple[str, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in files:
            add(tar, name, data)
    return path


# The devkit's IDs: reverse sorted-wnid order, so "ID − 1" names the wrong class for every one of them;
# internal synsets (IDs past the leaves) follow, as in the real meta.mat.
DEVKIT_ID = {w: len(WNIDS) - i for i, w in enumerate(WNIDS)}


def meta_mat() -> bytes:
    from scipy.io import savemat

    rows = sorted(DEVKIT_ID.items(), key=lambda p: p[1]) + [("n00001740", len(WNIDS) + 1)]
    synsets = np.empty((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, (wnid, number) in enumerate(rows):
        synsets[i, 0] = (number, wnid, 0 if number <= len(WNIDS) else 3)
    out = io.BytesIO()
    savemat(out, {"synsets": synsets})
    return out.getvalue()


def devkit_files(copy: Copy) -> list[tuple[str, bytes]]:
    truth = "".join(f"{DEVKIT_ID[wnid]}\n" for _, wnid, _ in copy.val).encode()
    return [
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat()),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth),
    ]


def check_every_label(dest: Path, copy: Copy, classes=WNIDS, val_names=None) -> dict:
    """Every stored image is the right picture, and carries its class: names and pixels both checked."""
    dataset = PreparedDataset(dest)
    wnids = [c.wnid for c in dataset.classes]
    assert wnids == sorted(classes)
    assert dataset.meta["classes_sha256"] == class_list_sha256(wnids)
    said = dataset.provenance()  # what `evaluate` prints
    assert f"form {dataset.meta['source_form']}" in said and class_list_sha256(wnids)[:16] in said
    for split in SPLITS:
        stored = dataset.split(split)
        expected = 2 * len(classes) if split == "train" else len(val_names or classes)
        assert len(stored) == expected, split
        for i, (file, label) in enumerate(zip(stored.files, stored.labels.tolist())):
            stem = Path(file).stem  # the written name, less a Hugging Face wnid suffix or a WebDataset .jpg
            key = f"{re.sub(r'_n[0-9]{8}$', '', stem)}.JPEG"
            assert wnids[label] == copy.truth[key], (split, file)
            assert torch.equal(stored.images[i], load_image(copy.content[key])), (split, file)
    return dataset.meta


def prepared(src: Path, tmp_path: Path, **kwargs) -> Path:
    dest = tmp_path / "prepared"
    prepare_quietly(src, dest, chunk=4, **kwargs)
    return dest


def test_image_net_org_tars_and_devkit_with_a_permuted_meta_mat(copy, tmp_path):
    src = tmp_path / "imagenet"
    inner = [(f"{w}.tar", tar_bytes(copy.train[w])) for w in reversed(WNIDS)]  # not in sorted order
    write_tar(src / "ILSVRC2012_img_train.tar", inner)
    write_tar(src / "ILSVRC2012_img_val.tar", [(n, d) for n, _, d in copy.val])
    write_tar(src / "ILSVRC2012_devkit_t12.tar.gz", devkit_files(copy), "w:gz")
    # "ID − 1" in sorted-wnid order would be wrong for every val image:
    assert all(WNIDS[DEVKIT_ID[w] - 1] != w for w in WNIDS)

    meta = check_every_label(prepared(src, tmp_path), copy)
    assert meta["source_form"] == "imagenet"
    assert "meta.mat" in meta["val_labels_from"]


@pytest.mark.slow
def test_forked_workers_read_the_tars_in_place_with_slots_reused(copy, tmp_path, monkeypatch):
    import training.prepare_split as prep

    src = tmp_path / "imagenet"
    write_tar(src / "ILSVRC2012_img_train.tar", [(f"{w}.tar", tar_bytes(copy.train[w])) for w in WNIDS])
    write_tar(src / "ILSVRC2012_img_val.tar", [(n, d) for n, _, d in copy.val])
    write_tar(src / "ILSVRC2012_devkit_t12.tar.gz", devkit_files(copy), "w:gz")
    inline = tmp_path / "inline"
    prepare_quietly(src, inline, chunk=4)
    monkeypatch.setattr(prep, "WINDOW", 1)  # two shared slots: each is reused many times
    monkeypatch.setattr(prep, "TASK_IMAGES", 2)

    class SlowWriter(prep.Appender):  # writes lag behind: a slot reused too early would be overwritten
        def append(self, pieces):
            super().append([("sleep", None)] + pieces)

        def _run(self):
            real = self.outs
            self.outs = {"sleep": type("Nap", (), {"write": lambda _, __: time.sleep(0.02)})(), **dict(enumerate(real))}
            super()._run()

    monkeypatch.setattr(prep, "Appender", SlowWriter)
    forked = tmp_path / "forked"
    prepare_quietly(src, forked, chunk=1000, workers=2)  # no progress record (it waits for the writer)
    check_every_label(forked, copy)
    for name in ("train.u8", "val.u8", "train.json", "val.json", "stats.safetensors"):
        assert (forked / name).read_bytes() == (inline / name).read_bytes(), name


def test_the_devkits_ground_truth_alone_is_refused(copy, tmp_path):
    src = flat_val_folders(copy, tmp_path / "src")
    (src / "gt.txt").write_text("".join(f"{DEVKIT_ID[w]}\n" for _, w, _ in copy.val))
    with pytest.raises(TrainingError, match="ID − 1 is not the class index"):
        prepare_quietly(src, tmp_path / "out", val_labels=src / "gt.txt")


def test_unpacked_train_of_per_class_tars_and_a_devkit_folder(copy, tmp_path, capsys):
    src = tmp_path / "unpacked"
    for wnid in WNIDS:
        write_tar(src / "train" / f"{wnid}.tar", copy.train[wnid])
    (src / "val").mkdir()
    for name, _, data in copy.val:
        (src / "val" / name).write_bytes(data)
    for name, data in devkit_files(copy):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    check_every_label(prepared(src, tmp_path), copy)
    said = capsys.readouterr().err
    assert "20 train (per-class tars)" in said and "empty split" not in said


@pytest.mark.slow
def test_kaggle_root(copy, tmp_path):
    src = tmp_path / "kaggle"
    cls_loc = src / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, images in copy.train.items():
        (cls_loc / "train" / wnid).mkdir(parents=True)
        for name, data in images:
            (cls_loc / "train" / wnid / name).write_bytes(data)
    (cls_loc / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for name, wnid, data in copy.val:
        (cls_loc / "val" / name).write_bytes(data)
        rows.append(f"{Path(name).stem},{wnid} 1 2 30 40 {wnid} 5 6 20 30")  # two boxes, one class
    (src / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} name\n" for w in STANDARD))
    meta = check_every_label(prepared(src, tmp_path), copy)
    assert meta["source_form"] == "kaggle"

    # Pointed at CLS-LOC, its CSV is accepted as --val-labels
    dest = tmp_path / "from-cls-loc"
    prepare_quietly(cls_loc, dest, val_labels=src / "LOC_val_solution.csv")
    check_every_label(dest, copy)


@pytest.mark.slow
def test_hugging_face_tar_gz_shards(copy, tmp_path):
    src = tmp_path / "hf"
    train = [(f"{Path(n).stem}_{w}.JPEG", d) for w in WNIDS for n, d in copy.train[w]]
    random.Random(1).shuffle(train)
    write_tar(src / "data" / "train_images_0.tar.gz", train[:11], "w:gz")
    write_tar(src / "data" / "train_images_1.tar.gz", train[11:], "w:gz")
    write_tar(src / "data" / "val_images.tar.gz", [(f"{Path(n).stem}_{w}.JPEG", d) for n, w, d in copy.val], "w:gz")
    dest = prepared(src, tmp_path)
    meta = check_every_label(dest, copy)
    assert meta["source_form"] == "huggingface" and meta["val_labels_from"] == "the file names"

    # A devkit beside the shards is a second source for the val labels: it must agree with the file names.
    for name, data in devkit_files(copy):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    dest2 = tmp_path / "with-devkit"
    prepare_quietly(src, dest2, val_labels=src / "ILSVRC2012_devkit_t12")
    assert "checked against the file names" in check_every_label(dest2, copy)["val_labels_from"]
    wrong = [(f"{Path(n).stem}_{w}.JPEG", d) for (n, _, d), w in zip(copy.val, WNIDS)]  # names now disagree
    write_tar(src / "data" / "val_images.tar.gz", wrong, "w:gz")
    with pytest.raises(TrainingError, match="the two sources disagree"):
        prepare_quietly(src, tmp_path / "disagree", val_labels=src / "ILSVRC2012_devkit_t12")


def test_hugging_face_resumes_mid_stream(copy, tmp_path, monkeypatch):
    import training.prepare_split as prep

    src = tmp_path / "hf"
    train = [(f"{Path(n).stem}_{w}.JPEG", d) for w in WNIDS for n, d in copy.train[w]]
    write_tar(src / "train_images_0.tar.gz", train[:9], "w:gz")
    write_tar(src / "train_images_1.tar.gz", train[9:], "w:gz")
    write_tar(src / "val_images.tar.gz", [(f"{Path(n).stem}_{w}.JPEG", d) for n, w, d in copy.val], "w:gz")
    decode, calls = prep._decode, []

    def interrupted(task):
        calls.append(task[0])
        if len(calls) == 14:
            raise KeyboardInterrupt
        return decode(task)

    monkeypatch.setattr(prep, "_decode", interrupted)
    dest = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        prepare_quietly(src, dest, chunk=4)
    monkeypatch.setattr(prep, "_decode", decode)
    prepare_quietly(src, dest, chunk=4)  # continues after 12 images, inside the second shard
    check_every_label(dest, copy)


@pytest.mark.slow
def test_webdataset_shards(copy, tmp_path):
    src = tmp_path / "wds"
    samples = [(Path(n).stem, w, d) for w in WNIDS for n, d in copy.train[w]]
    random.Random(2).shuffle(samples)

    def shard(items, path, with_cls):
        files = []
        for key, wnid, data in items:
            files.append((f"{key}.jpg", data))
            label = STANDARD.index(wnid)
            if with_cls:
                files.append((f"{key}.cls", str(label).encode()))
            else:
                files.append((f"{key}.json", json.dumps({"label": label, "filename": f"{key}.JPEG"}).encode()))
        write_tar(path, files)

    shard(samples[:10], src / "imagenet1k-train-0000.tar", True)
    shard(samples[10:], src / "imagenet1k-train-0001.tar", False)
    shard([(Path(n).stem, w, d) for n, w, d in copy.val], src / "imagenet1k-validation-0000.tar", True)
    meta = check_every_label(prepared(src, tmp_path), copy)
    assert meta["source_form"] == "webdataset"

    # A key that names one class and a .cls that says another: refused
    key, wnid, data = samples[0]
    other = STANDARD.index(WNIDS[(WNIDS.index(wnid) + 1) % len(WNIDS)])
    write_tar(src / "imagenet1k-train-0000.tar", [(f"{key}.jpg", data), (f"{key}.cls", str(other).encode())])
    with pytest.raises(TrainingError, match="the two disagree"):
        prepare_quietly(src, tmp_path / "disagree")


def flat_val_folders(copy: Copy, root: Path, classes=WNIDS) -> Path:
    for wnid in classes:
        (root / "train" / wnid).mkdir(parents=True)
        for name, data in copy.train[wnid]:
            (root / "train" / wnid / name).write_bytes(data)
    (root / "val").mkdir()
    for name, wnid, data in copy.val:
        if wnid in classes:
            (root / "val" / name).write_bytes(data)
    return root


@pytest.mark.slow
def test_val_labels_as_wnids_and_caffe_indices_of_a_subset(copy, tmp_path):
    subset = [w for w in WNIDS if STANDARD.index(w) >= 5][:6]  # indices among the 1,000 run past 6
    src = flat_val_folders(copy, tmp_path / "src", subset)
    kept = [(n, w) for n, w, _ in copy.val if w in subset]
    (src / "wnids.txt").write_text("".join(f"{n} {w}\n" for n, w in kept))
    dest = tmp_path / "a"
    prepare_quietly(src, dest, val_labels=src / "wnids.txt")
    check_every_label(dest, copy, subset, kept)

    (src / "val.txt").write_text("".join(f"{n} {STANDARD.index(w)}\n" for n, w in kept))  # Caffe, full list
    dest = tmp_path / "b"
    prepare_quietly(src, dest)
    check_every_label(dest, copy, subset, kept)

    (src / "val.txt").write_text("".join(f"{n} {sorted(subset).index(w)}\n" for n, w in kept))  # own indices
    dest = tmp_path / "c"
    prepare_quietly(src, dest)
    check_every_label(dest, copy, subset, kept)


def test_caffe_indices_beyond_a_foreign_subset_are_refused(copy, tmp_path):
    src = flat_val_folders(copy, tmp_path / "src", WNIDS[:3])
    (src / "train" / WNIDS[0]).rename(src / "train" / "cats")  # not an ImageNet class
    names = [n for n, w, _ in copy.val if w in WNIDS[:3]]
    (src / "val.txt").write_text("".join(f"{n} {500 + i}\n" for i, n in enumerate(names)))
    with pytest.raises(TrainingError, match="cannot be mapped through the full 1,000-class list"):
        prepare_quietly(src, tmp_path / "out")


def test_a_val_labelling_that_does_not_match_the_data_is_refused(copy, tmp_path):
    src = flat_val_folders(copy, tmp_path / "src")
    # every val image given the first class: nine classes have no val image
    (src / "val.txt").write_text("".join(f"{n} {WNIDS[0]}\n" for n, _, _ in copy.val))
    with pytest.raises(TrainingError, match="9 of train's 10 classes have no val image"):
        prepare_quietly(src, tmp_path / "out")


def test_uneven_val_counts_are_refused(copy, tmp_path):
    from training.listing import SplitListing
    from training.val_labels import check_val_labels

    per_class = UNEVEN_FROM_MEAN
    even = SplitListing(wnids=[w for w in WNIDS for _ in range(per_class)])
    check_val_labels(WNIDS, even, "test")  # 10 a class: accepted
    uneven = SplitListing(wnids=even.wnids[: -per_class + 2] + [WNIDS[0]] * (per_class - 2))
    with pytest.raises(TrainingError, match="very uneven"):
        check_val_labels(WNIDS, uneven, "test")
    few = SplitListing(wnids=[w for w in WNIDS for _ in range(2)][:-1] + [WNIDS[0]])  # 3 and 1: too few to judge
    check_val_labels(WNIDS, few, "test")


def test_devkit_without_scipy_says_so_in_one_line(copy, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    src = tmp_path / "imagenet"
    write_tar(src / "ILSVRC2012_img_train.tar", [(f"{w}.tar", tar_bytes(copy.train[w])) for w in WNIDS])
    write_tar(src / "ILSVRC2012_img_val.tar", [(n, d) for n, _, d in copy.val])
    write_tar(src / "ILSVRC2012_devkit_t12.tar.gz", devkit_files(copy), "w:gz")
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert main(["prepare", str(src), str(tmp_path / "out"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs scipy" in err


def test_an_unknown_folder_lists_the_forms(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    assert main(["prepare", str(tmp_path / "photos"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    for form in ("folders", "imagenet", "kaggle", "huggingface", "webdataset"):
        assert form in err


def test_a_tiny_source_image_is_counted_and_named(copy, tmp_path, capsys):
    src = flat_val_folders(copy, tmp_path / "src", WNIDS[:2])
    (src / "val").rename(src / "flat")
    for wnid in WNIDS[:2]:
        (src / "val" / wnid).mkdir(parents=True)
    for name, wnid, data in copy.val:
        if wnid in WNIDS[:2]:
            (src / "val" / wnid / name).write_bytes(data)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "train" / WNIDS[0] / "dot.JPEG")
    dest = tmp_path / "out"
    prepare_quietly(src, dest)
    tiny = json.loads((dest / "train.json").read_text())["tiny"]
    assert tiny == [{"file": f"train/{WNIDS[0]}/dot.JPEG", "size": [1, 1]}]
    assert PreparedDataset(dest).meta["tiny_images"] == {"train": 1, "val": 0}
    assert "1 tiny source images" in capsys.readouterr().err
