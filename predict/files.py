"""Which files to classify, and their ground truth when it is known."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from model.image_files import IMAGE_EXTENSIONS, LabelFileError, is_image_name, label_lines

from .errors import PredictError


@dataclass
class Item:
    path: str  # as written to OUT: the SOURCE folder joined with the path inside it, or the file as given
    inside: str | None = None  # the path inside its SOURCE folder (for ground-truth matching)
    label: int | None = None  # the checkpoint's class index, when the ground truth is known


def _walk(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order, as paths relative to it."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_name(name):
                found.append(os.path.relpath(os.path.join(top, name), folder))
    return found


def find_files(sources: list[str], files_from: str | None = None) -> tuple[list[Item], dict[str, list[Item]]]:
    """Every file to classify, each once (first occurrence wins), and the items found in each folder.

    A SOURCE that does not exist, a folder without images and an empty list are PredictErrors; a line of
    --files-from that names a missing file becomes that file's error record (a list is data)."""
    items: list[Item] = []
    folders: dict[str, list[Item]] = {}
    seen: set[str] = set()

    def add(item: Item) -> None:
        if item.path not in seen:
            seen.add(item.path)
            items.append(item)

    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = [Item(os.path.join(source, inside), inside) for inside in _walk(path)]
            if not found:
                raise PredictError(f"{source}: no images in this folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
            folders[source] = found
            for item in found:
                add(item)
        elif path.is_file():
            add(Item(source))
        elif path.exists():
            raise PredictError(f"{source}: not a file or a folder")
        else:
            raise PredictError(f"{source}: no such file or folder")
    if files_from is not None:
        try:
            text = sys.stdin.read() if files_from == "-" else Path(files_from).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise PredictError(f"--files-from {files_from}: cannot read: {why}") from None
        listed = [line.strip() for line in text.splitlines() if line.strip()]
        if not listed:
            raise PredictError(f"--files-from {files_from}: no paths in it (one path a line)")
        for line in listed:
            add(Item(line))
    if not items:
        raise PredictError("nothing to classify: give a folder, image files or --files-from LIST")
    return items, folders


def label_folders(folders: dict[str, list[Item]], wnids: dict[str, int]) -> bool:
    """Label the items of every ImageNet-layout folder (all its images under <wnid>/… with a wnid of the
    checkpoint); True when any was."""
    any_labelled = False
    for found in folders.values():
        tops = [Path(item.inside).parts[0] if len(Path(item.inside).parts) > 1 else None for item in found]
        if all(top in wnids for top in tops):
            for item, top in zip(found, tops):
                item.label = wnids[top]
            any_labelled = True
    return any_labelled


def read_ground_truth(path: str, wnids: dict[str, int], num_classes: int) -> dict[str, int]:
    """Lines "<file> <class index>" or "<file> <wnid>" → {normalised file: the checkpoint's class index}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PredictError(f"--ground-truth {path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        lines = label_lines(text, lambda number: f"--ground-truth {path}, line {number}")
    except LabelFileError as e:
        raise PredictError(str(e)) from None
    truth = {}
    for number, name, value in lines:
        if value in wnids:
            label = wnids[value]
        elif value.isdigit() and int(value) < num_classes:
            label = int(value)
        else:
            raise PredictError(
                f"--ground-truth {path}, line {number}: {value!r} is neither a class index 0…{num_classes - 1} "
                "nor a wnid of the checkpoint's classes"
            )
        truth[os.path.normpath(name)] = label
    if not truth:
        raise PredictError(f"--ground-truth {path}: no lines '<file> <class index or wnid>' in it")
    return truth


def apply_ground_truth(items: list[Item], truth: dict[str, int], path: str) -> None:
    labelled = 0
    for item in items:
        for key in (item.path, item.inside, os.path.basename(item.path)):
            if key is not None and (label := truth.get(os.path.normpath(key))) is not None:
                item.label = label
                labelled += 1
                break
    if not labelled:
        raise PredictError(f"--ground-truth {path}: none of the {len(items):,} files is in it")
