"""Write files so that a reader sees the old file or the new one, never half of one (even after a crash)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is untouched. The temporary file lives in the
    same directory so that the rename is atomic (same filesystem) and a full disk fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None] | bytes) -> None:
    """Atomically create ``path`` from bytes, or by calling ``write(temporary_path)``."""
    with atomic_path(path) as tmp:
        if isinstance(write, (bytes, bytearray)):
            tmp.write_bytes(write)
        else:
            write(tmp)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable. Not possible on every platform; harmless to skip there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
