"""A split as found in a source: its files, their wnids and where each one's bytes are."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from model.image_files import is_image_name

WNID = re.compile(r"n\d{8}")


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


def file_stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def subdirectories(folder: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)


def image_names(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))


def tar_names(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(".tar"))
