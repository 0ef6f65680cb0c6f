"""Image files by name, and label files that list them: what `training prepare` and `predict` share."""

from __future__ import annotations

from collections.abc import Callable

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a path names an image file: an image extension, and not hidden."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


class LabelFileError(ValueError):
    """A line of a label file that is not '<file> <label>'; the message names the line."""


def label_lines(text: str, where: Callable[[int], str]) -> list[tuple[int, str, str]]:
    """(line number, file, label) for each line '<file> <label>' of a label file.

    The label is a class index or a wnid; the caller reads it. A file name may hold spaces.
    Blank lines and '#' comments are skipped. ``where(number)`` names a bad line in the error.
    """
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise LabelFileError(f"{where(number)}: expected '<file> <class index>' or '<file> <wnid>', got {line!r}")
        lines.append((number, parts[0], parts[1]))
    return lines
