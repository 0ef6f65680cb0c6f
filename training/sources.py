"""Which form a dataset source is in, and where each of its images and labels is, read as it is.

Forms (``prepare SRC`` finds out which by looking at SRC):

    folders     SRC/train/<wnid>/*.JPEG (or SRC/train/<wnid>.tar, per-class tars read in place) and
                SRC/val/<wnid>/*.JPEG, or a flat SRC/val/*.JPEG with its labels (see below)
    imagenet    image-net.org's files in SRC: ILSVRC2012_img_train.tar (a tar of per-class tars),
                ILSVRC2012_img_val.tar (flat) and ILSVRC2012_devkit_t12.tar.gz (val labels, via meta.mat)
    kaggle      Kaggle's download root: ILSVRC/Data/CLS-LOC/{train,val} + LOC_val_solution.csv
    huggingface ILSVRC/imagenet-1k's shards: train_images_N.tar.gz, val_images.tar.gz (in SRC or SRC/data);
                the wnid ends each file name
    webdataset  *.tar shards with "train" and "val" in their names (timm/imagenet-1k-wds:
                imagenet1k-train-NNNN.tar, imagenet1k-validation-NNNN.tar); each sample is KEY.jpg with its
                label in KEY.cls (a class index of ImageNet's 1,000) or KEY.json ({"label": …})

Nothing is unpacked. An uncompressed tar (including a tar inside a tar) is indexed by seeking from header to
header, and each image is later read in place at its byte offset by the decoding workers. A .tar.gz cannot
be sought in: it is read as a stream (tarfile "r|gz") once to list it and once to decode it.

Labels of a flat val split come from, in this order: --val-labels FILE, the devkit, SRC/val.txt,
SRC/LOC_val_solution.csv, or the wnid in the file names (huggingface). A label file may hold lines
"<file> <class index>" (Caffe's val.txt), "<file> <wnid>", Kaggle's CSV, or be the devkit itself. Class
indices are among ImageNet's 1,000 classes in standard order when the source has all of them; for a subset,
an index that only makes sense among the 1,000 is mapped through that list (model/imagenet_classes.txt).

Every item is labelled by its class's wnid; class index = position in the sorted wnids of the train split.
A labelling that disagrees with the data is refused (``check_val_labels``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from model import ImageClass, imagenet_classes

from .data import SPLITS
from .errors import TrainingError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WNID = re.compile(r"n\d{8}")
DEVKIT = "ILSVRC2012_devkit_t12"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")
# Below this many val images per class, an honest random selection varies too much to judge its counts:
# only a class with none is refused. From it on, a class with under half or over twice the mean is.
UNEVEN_FROM_MEAN = 10

FORMS_HELP = (
    "accepted forms: folders (SRC/train/<wnid>/*.JPEG or SRC/train/<wnid>.tar, and SRC/val/<wnid>/ or a flat "
    "SRC/val/); imagenet (a folder with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
    "ILSVRC2012_devkit_t12.tar.gz); kaggle (its root: ILSVRC/Data/CLS-LOC/{train,val} and LOC_val_solution.csv); "
    "huggingface (a folder with train_images_N.tar.gz and val_images.tar.gz); webdataset (a folder of *train*.tar "
    "and *val*.tar shards, KEY.jpg with KEY.cls or KEY.json)"
)

# A locator says where an item's bytes are: None (the file SRC/<name>), ("at", archive, offset, size) (a
# member of an uncompressed tar, read in place), or ("gz", shard, n) (the n-th image of a .tar.gz stream).


@dataclass
class SplitListing:
    names: list[str] = field(default_factory=list)  # relative to SRC, archives included ("x.tar/y.JPEG")
    wnids: list[str] = field(default_factory=list)
    locators: list = field(default_factory=list)
    layout: str = ""  # how the split was found, for the summary

    def add(self, name: str, wnid: str, locator=None) -> None:
        self.names.append(name)
        self.wnids.append(wnid)
        self.locators.append(locator)


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
        return (
            f"form: {self.form}; {len(self.classes)} classes; {counts}; val labels from {self.val_labels_from}"
        )


def class_list_sha256(wnids: list[str]) -> str:
    return hashlib.sha256("".join(w + "\n" for w in wnids).encode()).hexdigest()


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


# 1. Listing each kind of split.


def _subdirectories(folder: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def _images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))


def _tars(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(".tar"))


def _class_folders(root: Path, folder: Path) -> SplitListing:
    listing = SplitListing(layout="class folders")
    for entry in _subdirectories(folder):
        names = _images(folder / entry.name)
        if not names:
            raise TrainingError(
                f"{folder / entry.name}: class folder with no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        prefix = (folder / entry.name).relative_to(root).as_posix()
        for name in names:
            listing.add(f"{prefix}/{name}", entry.name)
    return listing


def _open_tar(path: Path, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except (tarfile.TarError, OSError) as e:
        raise TrainingError(f"{path}: not a readable uncompressed tar ({e})") from None


def _tar_images(tar: tarfile.TarFile, archive: Path, base: int, prefix: str, listing: SplitListing, wnid=None):
    """Add every image member of ``tar`` (whose bytes start at ``base`` in ``archive``) to ``listing``."""
    for member in tar:
        if member.isfile() and is_image_name(member.name):
            label = wnid if wnid is not None else _stem(member.name).split("_")[0]
            listing.add(f"{prefix}/{member.name}", label, ("at", str(archive), base + member.offset_data, member.size))


def _per_class_tars(root: Path, folder: Path) -> SplitListing:
    """train/<wnid>.tar, one tar per class (as ILSVRC2012_img_train.tar holds them), read in place."""
    listing = SplitListing(layout="per-class tars")
    for name in _tars(folder):
        path = folder / name
        with _open_tar(path) as tar:
            _tar_images(tar, path, 0, path.relative_to(root).as_posix(), listing, wnid=name[: -len(".tar")])
    return listing


def _tar_of_tars(root: Path, path: Path) -> SplitListing:
    """ILSVRC2012_img_train.tar: a tar of <wnid>.tar, each a tar of that class's images."""
    listing = SplitListing(layout=f"{path.name}: per-class tars inside a tar")
    with _open_tar(path) as outer:
        for member in sorted((m for m in outer if m.isfile() and m.name.endswith(".tar")), key=lambda m: m.name):
            wnid = member.name.rsplit("/", 1)[-1][: -len(".tar")]
            inner = _open_tar(path, fileobj=outer.extractfile(member))
            _tar_images(inner, path, member.offset_data, f"{path.name}/{member.name}", listing, wnid=wnid)
    if not listing.names:
        raise TrainingError(f"{path}: holds no per-class tars (<wnid>.tar)")
    return listing


def _flat_tar(root: Path, path: Path) -> SplitListing:
    listing = SplitListing(layout=f"{path.name}: flat tar")
    with _open_tar(path) as tar:
        _tar_images(tar, path, 0, path.name, listing, wnid="")
    return listing


def _flat_folder(root: Path, folder: Path) -> SplitListing:
    listing = SplitListing(layout="flat folder")
    prefix = folder.relative_to(root).as_posix()
    for name in _images(folder):
        listing.add(f"{prefix}/{name}", "")
    return listing


def _gz_shards(root: Path, shards: list[Path], layout: str) -> SplitListing:
    """Hugging Face's tar.gz shards, streamed: the wnid ends each file name (x_n01440764.JPEG)."""
    from concurrent.futures import ThreadPoolExecutor

    def members(shard: Path) -> list[str]:
        try:
            with tarfile.open(shard, mode="r|gz") as tar:
                return [m.name for m in tar if m.isfile() and is_image_name(m.name)]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise TrainingError(f"{shard}: not a readable .tar.gz ({e})") from None

    listing = SplitListing(layout=layout)
    with ThreadPoolExecutor(min(4, len(shards))) as threads:  # zlib lets go of the GIL: shards in parallel
        for shard, names in zip(shards, threads.map(members, shards)):
            for n, name in enumerate(names):
                wnid = _stem(name).rsplit("_", 1)[-1]
                if not WNID.fullmatch(wnid):
                    raise TrainingError(f"{shard}: {name} does not end in a wnid (expected e.g. x_n01440764.JPEG)")
                first = _stem(name).split("_")[0]
                if WNID.fullmatch(first) and first != wnid:  # train names repeat the wnid: both must agree
                    raise TrainingError(
                        f"{shard}: {name} names two classes, {first} (its original name) and {wnid} (its label)"
                    )
                listing.add(f"{shard.relative_to(root).as_posix()}/{name}", wnid, ("gz", str(shard), n))
    return listing


def _wds_shards(root: Path, shards: list[Path], layout: str) -> SplitListing:
    """WebDataset shards: samples KEY.<image ext> + KEY.cls or KEY.json, in uncompressed tars."""
    standard = [c.wnid for c in imagenet_classes()]
    listing = SplitListing(layout=layout)
    for shard in shards:
        with _open_tar(shard) as tar:
            samples: dict[str, dict] = {}
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                sample = samples.setdefault(f"{directory}/{key}" if directory else key, {})
                if is_image_name(member.name):
                    sample["image"] = member
                elif ext in ("cls", "json"):
                    sample[ext] = tar.extractfile(member).read().decode("utf-8", "replace")
            for key, sample in samples.items():
                if "image" not in sample:
                    continue
                where = f"{shard}: sample {key}"
                index = _wds_label(sample, where)
                if not 0 <= index < len(standard):
                    raise TrainingError(f"{where}: class index {index} is not one of ImageNet's 0..999")
                wnid = standard[index]
                named = [w for w in (key.rsplit("/", 1)[-1].split("_")[0], _json_field(sample, "filename")[:9])
                         if WNID.fullmatch(w or "")]  # fmt: skip
                if named and named[0] != wnid:
                    raise TrainingError(
                        f"{where}: its name says {named[0]} but its label {index} is {wnid} (ImageNet's standard "
                        "order); the two disagree"
                    )
                member = sample["image"]
                listing.add(f"{shard.name}/{member.name}", wnid, ("at", str(shard), member.offset_data, member.size))
    return listing


def _json_field(sample: dict, name: str) -> str:
    try:
        value = json.loads(sample["json"]).get(name, "") if "json" in sample else ""
    except (ValueError, AttributeError):
        value = ""
    return str(value)


def _wds_label(sample: dict, where: str) -> int:
    text = sample.get("cls") or _json_field(sample, "label")
    if not text.strip().lstrip("-").isdigit():
        raise TrainingError(f"{where}: no class index (expected KEY.cls, or KEY.json with \"label\")")
    return int(text.strip())


# 2. Val labels.


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
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[1].isdigit() or WNID.fullmatch(parts[1])):
            raise TrainingError(
                f"{path}:{number}: expected '<file> <class index>' or '<file> <wnid>', got {line.strip()!r}"
            )
        pairs.append((number, _stem(parts[0]), parts[1]))
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
        labels[_stem(row[0])] = boxes[0]
    return labels


def _val_key(name: str) -> str:
    """What a label file calls a val image: its stem, without a Hugging Face wnid suffix."""
    stem = _stem(name)
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


# 3. Finding the form.


def _hf_shards(root: Path) -> tuple[list[Path], list[Path]] | None:
    for folder in (root, root / "data"):
        if folder.is_dir():
            train = sorted(folder.glob("train_images_*.tar.gz"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
            val = sorted(folder.glob("val_images*.tar.gz"))
            if train or val:
                return train, val
    return None


def _wds_shard_lists(root: Path) -> tuple[list[Path], list[Path]] | None:
    tars = [root / n for n in _tars(root)] if root.is_dir() else []
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
    classes, loose, tars = _subdirectories(folder), _images(folder), _tars(folder)
    if classes and loose:
        raise TrainingError(f"{folder}: holds both class folders and loose images (e.g. {loose[0]}); use one")
    if classes:
        return _class_folders(root, folder)
    if tars and split == "train":
        return _per_class_tars(root, folder)
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
    known_labels = [label_file] if label_file else []  # label sources, in the order they are tried
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    hf, wds = _hf_shards(root), _wds_shard_lists(root)
    if kaggle.is_dir():
        form = "kaggle"
        train, val = _folder_split(root, kaggle / "train", "train"), _folder_split(root, kaggle / "val", "val")
        known_labels.append(root / "LOC_val_solution.csv")
    elif (root / TRAIN_TAR).exists() or (root / VAL_TAR).exists():
        form = "imagenet"
        train = _tar_of_tars(root, _need(root / TRAIN_TAR, "image-net.org's training archive"))
        val = _flat_tar(root, _need(root / VAL_TAR, "image-net.org's validation archive"))
        known_labels += [root / f"{DEVKIT}.tar.gz", root / DEVKIT]
    elif hf is not None:
        form = "huggingface"
        train_shards, val_shards = hf
        if not train_shards or not val_shards:
            raise TrainingError(f"{root}: Hugging Face shards need both train_images_N.tar.gz and val_images.tar.gz")
        train = _gz_shards(root, train_shards, f"{len(train_shards)} tar.gz shards")
        val = _gz_shards(root, val_shards, f"{len(val_shards)} tar.gz shard(s)")
    elif wds is not None:
        form = "webdataset"
        train = _wds_shards(root, wds[0], f"{len(wds[0])} WebDataset shards")
        val = _wds_shards(root, wds[1], f"{len(wds[1])} WebDataset shards")
    elif (root / "train").is_dir() or (root / "val").is_dir():
        form = "folders"
        train, val = _folder_split(root, root / "train", "train"), _folder_split(root, root / "val", "val")
        known_labels += [root / f"{DEVKIT}.tar.gz", root / DEVKIT, root / "val.txt", root / "LOC_val_solution.csv"]
    else:
        raise TrainingError(f"{root}: not a dataset source this command knows; {FORMS_HELP}")

    wnids = sorted(set(train.wnids))
    if not wnids:
        raise TrainingError(f"{root}: the train split holds no images")
    if len(wnids) < 2:
        raise TrainingError(f"{root}: the train split has one class ({wnids[0]}); a classifier needs two or more")
    if not val.names:
        raise TrainingError(f"{root}: the val split holds no images")

    where = "the file names" if form in ("huggingface", "webdataset") else "class folders"
    label_path = next((p for p in known_labels if p.exists()), None)
    if label_path is not None and (label_file is not None or not all(val.wnids)):
        labels = read_label_file(label_path, wnids)
        where = f"{label_path}" + (" (ILSVRC2012_ID → WNID via meta.mat)" if _devkit_like(label_path) else "")
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


def _devkit_like(path: Path) -> bool:
    return path.is_dir() or path.name.endswith((".tar.gz", ".tgz"))
