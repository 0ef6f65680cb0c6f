"""Shared test fixtures: the photos, and live servers (``live_service``: stopped after the test;
``module_live_service``: after the module). Helpers live in tests/support/ (``from support.service import …``).

Tests that start servers, processes or browsers, train for many steps or take more than about a second are
marked ``slow``: ``pytest -m "not slow"`` (``make test-fast``) leaves them out; ``make test`` runs everything.
"""

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # pytest's default (prepend) import mode puts it there; other modes may not
    sys.path.insert(0, str(TESTS))

from support.service import LiveServices  # noqa: E402

# Ten real ImageNet photos (copied from ../shared/data/images): named <wnid>_<name>.JPEG; one grayscale,
# one with an EXIF orientation tag, sizes from 350×156 to 1600×1200.
PHOTOS_DIR = TESTS / "fixtures" / "images"


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    paths = sorted(PHOTOS_DIR.glob("*.JPEG"))
    assert len(paths) == 10, f"expected 10 photos in {PHOTOS_DIR}"
    return paths


def _live_services(tmp_path_factory):
    services = LiveServices(tmp_path_factory.mktemp("live-service"))
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def live_service(tmp_path_factory):
    """``live_service(*flags, checkpoint=path, env={...})``: ``python -m service`` on a free port, ready;
    stopped (SIGTERM) after the test, which fails unless it exits 0 (a graceful shutdown)."""
    yield from _live_services(tmp_path_factory)


@pytest.fixture(scope="module")
def module_live_service(tmp_path_factory):
    """``live_service`` for module-scoped servers: those it starts are stopped after the module's last test."""
    yield from _live_services(tmp_path_factory)


SLOW_FIXTURES = {"live_service", "module_live_service"}  # a real server: slow, whichever test asks for it


def pytest_collection_modifyitems(config, items):
    """Every test that starts a live server (through the fixtures above, directly or through other fixtures)
    is marked slow; the others that are slow carry the marker themselves."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
