"""Which form a dataset source is in, and where each of its images and labels is, read as it is.

Forms: folders (train/<wnid>/, val/ with class folders or flat), image-net.org's tars + devkit, Kaggle's
root, Hugging Face's tar.gz shards and WebDataset shards (FORMS_HELP). archives.py reads the archives.
Labels of a flat val split come from --val-labels, the devkit, SRC/val.txt, Kaggle's CSV or the file names.
Every item is labelled by its wnid; class index = position in the sorted wnids of the train split.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from model import ImageClass, imagenet_classes
from model.image_files import IMAGE_EXTENSIONS

from .archives import flat_tar, gz_shards, per_class_tars, tar_of_tars, wds_shards
from .data import SPLITS
from .errors import TrainingError
from .listing import SplitListing, image_names, subdirectories, tar_names
from .val_labels import DEVKIT, check_val_labels, devkit_like, label_val, read_label_file

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"

FORMS_HELP = (
    "accepted forms: folders (SRC/train/<wnid>/*.JPEG or SRC/train/<wnid>.tar, and SRC/val/<wnid>/ or a flat "
    "SRC/val/); imagenet (a folder with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
    "ILSVRC2012_devkit_t12.tar.gz); kaggle (its root: ILSVRC/Data/CLS-LOC/{train,val} and LOC_val_solution.csv); "
    "huggingface (a folder with train_images_N.tar.gz and val_images.tar.gz); webdataset (a folder of *train*.tar "
    "and *val*.tar shards, KEY.jpg with KEY.cls or KEY.json)"
)


@dataclass(frozen=True)
class Source:
    root: Path
    classes: tuple[ImageClass, ...]
    items: dict[str, list[tuple[str, int]]]  # split → [(name relative to root, class index)]
    locators: dict[str, list] = field(default_factory=dict)  # split → where each item's bytes are
    form: str = "folders"
    layouts: dict[str, str] = field(default_factory=dict)  # split → how it is stored
    val_labels_from: str = "class folders"

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the list of images and labels: a rerun continues only on the same source."""
        digest = hashlib.sha256(json.dumps([[c.wnid for c in self.classes], self.items]).encode())
        return digest.hexdigest()

    @cached_property
    def classes_sha256(self) -> str:
        """Checksum of the class list (wnids in class-index order, one a line)."""
        return class_list_sha256([c.wnid for c in self.classes])

    def describe(self) -> str:
        counts = ", ".join(f"{len(self.items[s]):,} {s} ({self.layouts.get(s, '')})" for s in SPLITS)
        return f"form: {self.form}; {len(self.classes)} classes; {counts}; val labels from {self.val_labels_from}"


def class_list_sha256(wnids: list[str]) -> str:
    return hashlib.sha256("".join(w + "\n" for w in wnids).encode()).hexdigest()


def _class_folders(root: Path, folder: Path) -> SplitListing:
    listing = SplitListing(layout="class folders")
    for entry in subdirectories(folder):
        names = image_names(folder / entry.name)
        if not names:
            raise TrainingError(
                f"{folder / entry.name}: class folder with no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        prefix = (folder / entry.name).relative_to(root).as_posix()
        for name in names:
            listing.add(f"{prefix}/{name}", entry.name)
    return listing


def _flat_folder(root: Path, folder: Path) -> SplitListing:
    listing = SplitListing(layout="flat folder")
    prefix = folder.relative_to(root).as_posix()
    for name in image_names(folder):
        listing.add(f"{prefix}/{name}", "")
    return listing


def _hf_shards(root: Path) -> tuple[list[Path], list[Path]] | None:
    for folder in (root, root / "data"):
        if folder.is_dir():
            train = sorted(folder.glob("train_images_*.tar.gz"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
            val = sorted(folder.glob("val_images*.tar.gz"))
            if train or val:
                return train, val
    return None


def _wds_shard_lists(root: Path) -> tuple[list[Path], list[Path]] | None:
    tars = [root / n for n in tar_names(root)] if root.is_dir() else []
    train = [p for p in tars if "train" in p.name]
    val = [p for p in tars if "val" in p.name]
    return (train, val) if train and val else None


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise TrainingError(f"{path}: missing ({what})")
    return path


def _folder_split(root: Path, folder: Path, split: str) -> SplitListing:
    if not folder.is_dir():
        raise TrainingError(f"{root}: missing the {split}/ folder (expected {split}/<wnid>/*.JPEG)")
    classes, loose, tars = subdirectories(folder), image_names(folder), tar_names(folder)
    if classes and loose:
        raise TrainingError(f"{folder}: holds both class folders and loose images (e.g. {loose[0]}); use one")
    if classes:
        return _class_folders(root, folder)
    if tars and split == "train":
        return per_class_tars(root, folder)
    if loose and split == "val":
        return _flat_folder(root, folder)
    expected = "train/<wnid>/*.JPEG or train/<wnid>.tar" if split == "train" else "val/<wnid>/*.JPEG or val/*.JPEG"
    raise TrainingError(f"{folder}: empty split (expected {expected})")


def scan_source(root: str | Path, val_labels: str | Path | None = None) -> Source:
    """Find SRC's form and list both splits with their labels, or raise TrainingError saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise TrainingError(f"{root}: no such directory")
    label_file = Path(val_labels) if val_labels else None
    if label_file is not None and not label_file.exists():
        raise TrainingError(f"--val-labels {label_file}: no such file")
    form, train, val, label_places = _list_form(root)
    known_labels = ([label_file] if label_file else []) + label_places  # label sources, in the order tried
    wnids = sorted(set(train.wnids))
    if not wnids:
        raise TrainingError(f"{root}: the train split holds no images")
    if len(wnids) < 2:
        raise TrainingError(f"{root}: the train split has one class ({wnids[0]}); a classifier needs two or more")
    if not val.names:
        raise TrainingError(f"{root}: the val split holds no images")
    where = _label_val(root, form, val, wnids, known_labels, given=label_file is not None)
    check_val_labels(wnids, val, where)

    index = {w: i for i, w in enumerate(wnids)}
    known = {c.wnid: c for c in imagenet_classes()}
    classes = tuple(known.get(w, ImageClass(w, w)) for w in wnids)  # ImageNet's wnids get their names
    listings = {"train": train, "val": val}
    return Source(
        root,
        classes,
        {s: [(n, index[w]) for n, w in zip(listings[s].names, listings[s].wnids)] for s in SPLITS},
        {s: listings[s].locators for s in SPLITS},
        form,
        {s: listings[s].layout for s in SPLITS},
        where,
    )


def _list_form(root: Path) -> tuple[str, SplitListing, SplitListing, list[Path]]:
    """SRC's form, its two splits, and where that form keeps its val labels."""
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    hf, wds = _hf_shards(root), _wds_shard_lists(root)
    if kaggle.is_dir():
        train, val = _folder_split(root, kaggle / "train", "train"), _folder_split(root, kaggle / "val", "val")
        return "kaggle", train, val, [root / "LOC_val_solution.csv"]
    if (root / TRAIN_TAR).exists() or (root / VAL_TAR).exists():
        train = tar_of_tars(root, _need(root / TRAIN_TAR, "image-net.org's training archive"))
        val = flat_tar(root, _need(root / VAL_TAR, "image-net.org's validation archive"))
        return "imagenet", train, val, [root / f"{DEVKIT}.tar.gz", root / DEVKIT]
    if hf is not None:
        train_shards, val_shards = hf
        if not train_shards or not val_shards:
            raise TrainingError(f"{root}: Hugging Face shards need both train_images_N.tar.gz and val_images.tar.gz")
        train = gz_shards(root, train_shards, f"{len(train_shards)} tar.gz shards")
        val = gz_shards(root, val_shards, f"{len(val_shards)} tar.gz shard(s)")
        return "huggingface", train, val, []
    if wds is not None:
        train = wds_shards(root, wds[0], f"{len(wds[0])} WebDataset shards")
        val = wds_shards(root, wds[1], f"{len(wds[1])} WebDataset shards")
        return "webdataset", train, val, []
    if (root / "train").is_dir() or (root / "val").is_dir():
        train, val = _folder_split(root, root / "train", "train"), _folder_split(root, root / "val", "val")
        places = [root / f"{DEVKIT}.tar.gz", root / DEVKIT, root / "val.txt", root / "LOC_val_solution.csv"]
        return "folders", train, val, places
    raise TrainingError(f"{root}: not a dataset source this command knows; {FORMS_HELP}")


def _label_val(root: Path, form: str, val: SplitListing, wnids: list[str], known_labels: list[Path], given: bool):
    """Label the val split from the first label source that exists, when needed; say where labels came from."""
    where = "the file names" if form in ("huggingface", "webdataset") else "class folders"
    label_path = next((p for p in known_labels if p.exists()), None)
    if label_path is not None and (given or not all(val.wnids)):
        labels = read_label_file(label_path, wnids)
        where = f"{label_path}" + (" (ILSVRC2012_ID → WNID via meta.mat)" if devkit_like(label_path) else "")
        had_names = all(val.wnids)
        label_val(val, labels, str(label_path))
        if had_names:
            where += f", checked against {'the file names' if form == 'huggingface' else 'the class folders'}"
    elif not all(val.wnids):
        tried = ", ".join(str(p) for p in known_labels) or "none"
        raise TrainingError(
            f"the val images of {root} carry no labels and no label file was found (looked for: {tried}); pass "
            "--val-labels FILE (lines '<file> <class index>' or '<file> <wnid>', Kaggle's LOC_val_solution.csv, "
            "or the devkit)"
        )
    return where
