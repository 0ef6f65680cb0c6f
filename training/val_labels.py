"""The labels of a flat val split: a label file, Kaggle's CSV or the devkit, checked against the data.

A label file holds lines '<file> <class index>' (Caffe's val.txt) or '<file> <wnid>'.
A class index is read among train's classes or, for a subset of ImageNet, among its 1,000.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from collections import Counter
from pathlib import Path

from model import imagenet_classes
from model.image_files import LabelFileError, label_lines

from .errors import TrainingError
from .listing import WNID, SplitListing, file_stem

DEVKIT = "ILSVRC2012_devkit_t12"

VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")

# Below this many val images per class, an honest random selection varies too much to judge its counts:
# only a class with none is refused. From it on, a class with under half or over twice the mean is.
UNEVEN_FROM_MEAN = 10


def _devkit_files(place: Path) -> tuple[bytes, bytes] | None:
    """(meta.mat, validation ground truth) from the devkit's .tar.gz or its unpacked folder, or None."""
    names = (f"{DEVKIT}/data/meta.mat", f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt")
    if place.is_file():
        try:
            with tarfile.open(place, "r:*") as tar:
                found = {m.name.lstrip("./"): m for m in tar if m.isfile()}
                if all(n in found for n in names):
                    return tuple(tar.extractfile(found[n]).read() for n in names)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise TrainingError(f"{place}: cannot read the devkit ({e})") from None
        raise TrainingError(f"{place}: not ImageNet's devkit (no {names[0]} and {names[1]} in it)")
    folder = place if place.name == DEVKIT else place / DEVKIT
    paths = [folder.parent / n for n in names]
    if all(p.is_file() for p in paths):
        return tuple(p.read_bytes() for p in paths)
    return None


def devkit_labels(meta_mat: bytes, ground_truth: bytes, where: str) -> dict[str, str]:
    """{val stem: wnid}: the ground truth's ILSVRC2012_IDs mapped to wnids through meta.mat's synsets.
    An ID is a row of meta.mat, not a position in sorted-wnid order: "ID − 1" would be wrong everywhere."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise TrainingError(
            "reading the devkit's meta.mat needs scipy: pip install 'alexnet-reference[imagenet]' (or scipy)"
        ) from None
    try:
        synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel()}
    except Exception as e:
        raise TrainingError(f"{where}: meta.mat has no readable synsets ({type(e).__name__}: {e})") from None
    labels = {}
    for number, line in enumerate(ground_truth.decode().split(), 1):
        if not line.isdigit() or int(line) not in wnid_of:
            raise TrainingError(f"{where}: ground truth line {number} ({line!r}) is not an ILSVRC2012_ID of meta.mat")
        labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of[int(line)]
    return labels


def read_label_file(path: Path, train_wnids: list[str]) -> dict[str, str]:
    """{file stem: wnid} from lines "<file> <class index>" or "<file> <wnid>", Kaggle's CSV, or the devkit."""
    devkit = _devkit_files(path) if path.suffix in (".gz", ".tgz") or path.is_dir() else None
    if devkit is not None:
        return devkit_labels(*devkit, str(path))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: cannot read the val labels ({getattr(e, 'strerror', None) or e})") from None
    if text.startswith("ImageId,PredictionString"):
        return _kaggle_csv(path, text)
    first = text.split("\n", 1)[0].strip()
    if first.isdigit():
        raise TrainingError(
            f"{path}: one number a line, as the devkit's ground truth: those are ILSVRC2012_IDs, which only its "
            "meta.mat turns into classes (ID − 1 is not the class index); pass the devkit (.tar.gz or folder)"
        )
    try:
        lines = label_lines(text, lambda number: f"{path}:{number}")
    except LabelFileError as e:
        raise TrainingError(str(e)) from None
    pairs = []
    for number, name, value in lines:
        if not (value.isdigit() or WNID.fullmatch(value)):
            raise TrainingError(f"{path}:{number}: expected '<file> <class index>' or '<file> <wnid>', got {value!r}")
        pairs.append((number, file_stem(name), value))
    labels: dict[str, str] = {}
    for (number, stem, _), wnid in zip(pairs, _indices_to_wnids(path, pairs, train_wnids)):
        if stem in labels:
            raise TrainingError(f"{path}:{number}: {stem} is listed twice")
        labels[stem] = wnid
    return labels


def _indices_to_wnids(path: Path, pairs: list[tuple[int, str, str]], train_wnids: list[str]) -> list[str]:
    """The wnid of each line. A class index is read among train's classes and, when train is a subset of
    ImageNet's 1,000, also among the 1,000; the reading whose classes are all in train is used, and when both
    fit but disagree the file is refused as ambiguous."""
    indices = [int(v) for _, _, v in pairs if v.isdigit()]
    if not indices:
        return [v for _, _, v in pairs]
    standard = [c.wnid for c in imagenet_classes()]
    known = set(train_wnids)
    own = [train_wnids[i] if i < len(train_wnids) else None for i in indices]
    full = [standard[i] if i < len(standard) else None for i in indices] if known <= set(standard) else None
    own_fits = all(w is not None for w in own)
    full_fits = full is not None and all(w in known for w in full)
    if own_fits and full_fits and own != full:
        raise TrainingError(
            f"{path}: its class indices fit both train's {len(train_wnids)} classes and ImageNet's 1,000 with "
            "different meanings; write '<file> <wnid>' lines instead"
        )
    if not (own_fits or full_fits):
        worst = max(indices)
        if full is None:
            raise TrainingError(
                f"{path}: class index {worst} is outside train's {len(train_wnids)} classes, and train's classes "
                "are not all among ImageNet's 1,000, so it cannot be mapped through the full 1,000-class list; "
                "write '<file> <wnid>' lines instead"
            )
        raise TrainingError(
            f"{path}: class index {worst} is outside 0..{len(train_wnids) - 1} (train's classes), and read among "
            "ImageNet's 1,000 classes its indices name classes that train does not have; write '<file> <wnid>' lines "
            "instead"
        )
    chosen = iter(own if own_fits else full)
    return [next(chosen) if v.isdigit() else v for _, _, v in pairs]


def _kaggle_csv(path: Path, text: str) -> dict[str, str]:
    labels = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if number == 1:
            continue
        if len(row) != 2:
            raise TrainingError(f"{path}:{number}: expected 'ImageId,PredictionString'")
        boxes = row[1].split()[::5]  # "wnid x_min y_min x_max y_max" per box
        if not boxes or not all(WNID.fullmatch(w) for w in boxes):
            raise TrainingError(f"{path}:{number}: no wnid in {row[1][:40]!r}")
        if len(set(boxes)) > 1:
            raise TrainingError(f"{path}:{number}: {row[0]} has boxes of different classes ({sorted(set(boxes))})")
        labels[file_stem(row[0])] = boxes[0]
    return labels


def _val_key(name: str) -> str:
    """What a label file calls a val image: its stem, without a Hugging Face wnid suffix."""
    stem = file_stem(name)
    head, _, tail = stem.rpartition("_")
    return head if head and WNID.fullmatch(tail) else stem


def label_val(val: SplitListing, labels: dict[str, str], where: str) -> None:
    """Give each val item its wnid from ``labels``; a wnid the item already has (from its folder or file
    name) must agree."""
    keys = [_val_key(n) for n in val.names]
    missing = [n for n, k in zip(val.names, keys) if k not in labels]
    if missing:
        raise TrainingError(f"{len(missing):,} val images have no label in {where}, e.g. {missing[:3]}")
    extra = sorted(set(labels) - set(keys))
    if extra:
        raise TrainingError(f"{where} lists {len(extra):,} images that are not in the val split, e.g. {extra[:3]}")
    for i, key in enumerate(keys):
        if val.wnids[i] and val.wnids[i] != labels[key]:
            raise TrainingError(
                f"{val.names[i]}: its name or folder says {val.wnids[i]}, {where} says {labels[key]}; the two "
                "sources disagree, so one of them is wrong"
            )
        val.wnids[i] = labels[key]


def check_val_labels(train_wnids: list[str], val: SplitListing, where: str) -> None:
    """Refuse a val labelling that cannot be right for this data (see UNEVEN_FROM_MEAN)."""
    counts = Counter(val.wnids)
    foreign = sorted(set(counts) - set(train_wnids))
    if foreign:
        raise TrainingError(
            f"val labels from {where}: {foreign[0]!r} is not one of the classes in train/ ({len(foreign)} such "
            "classes); the labels do not match the data"
        )
    absent = [w for w in train_wnids if w not in counts]
    if absent:
        raise TrainingError(
            f"{len(absent)} of train's {len(train_wnids)} classes have no val image with labels from {where} "
            f"(e.g. {absent[:3]}): the labels do not match the data"
        )
    mean = len(val.wnids) / len(train_wnids)
    if mean >= UNEVEN_FROM_MEAN:
        low = [(w, n) for w, n in counts.items() if n < mean / 2]
        high = [(w, n) for w, n in counts.items() if n > mean * 2]
        if low or high:
            shown = ", ".join(f"{w}: {n}" for w, n in sorted(low + high, key=lambda p: p[1])[:4])
            raise TrainingError(
                f"val labels from {where} are very uneven ({shown}; mean {mean:.1f} a class, ImageNet has 50): "
                "the labels do not match the data"
            )


def devkit_like(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".tar.gz", ".tgz"))
