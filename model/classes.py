"""ImageNet-1k classes. Class index = position of the wnid in sorted order (the ILSVRC convention)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class ImageClass:
    wnid: str  # WordNet id, e.g. "n01440764"
    name: str  # all synonyms, e.g. "tench, Tinca tinca"

    @property
    def label(self) -> str:
        """The first synonym, e.g. "tench". Not unique: two classes are "crane", two are "maillot"."""
        return self.name.split(",")[0].strip()


def parse_synset_words(text: str) -> tuple[ImageClass, ...]:
    """Parse ``wnid names`` lines (the format of ILSVRC's synset_words.txt)."""
    classes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name:
            raise ValueError(f"line {number}: expected 'wnid names', got {line!r}")
        classes.append(ImageClass(wnid, name.strip()))
    return tuple(classes)


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageClass, ...]:
    """The 1000 ILSVRC-2012 classes in index order, shipped with the package."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    classes = parse_synset_words(text)
    wnids = [c.wnid for c in classes]
    assert len(classes) == 1000 and wnids == sorted(wnids), "imagenet_classes.txt must hold 1000 sorted wnids"
    return classes
