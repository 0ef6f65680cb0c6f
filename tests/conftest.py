"""Shared test fixtures."""

from pathlib import Path

import pytest

# Ten real ImageNet photos (copied from ../shared/data/images): named <wnid>_<name>.JPEG; one grayscale,
# one with an EXIF orientation tag, sizes from 350×156 to 1600×1200.
PHOTOS_DIR = Path(__file__).parent / "fixtures" / "images"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    paths = sorted(PHOTOS_DIR.glob("*.JPEG"))
    assert len(paths) == 10, f"expected 10 photos in {PHOTOS_DIR}"
    return paths
