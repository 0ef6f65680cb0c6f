"""Write files so that a reader sees the old file or the new one, never half of one (even after a crash)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))  # .NAME.<mkstemp's 8 characters>.tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is untouched. The temporary file lives in the
    same directory so that the rename is atomic (same filesystem) and a full disk fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
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


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that ``atomic_path`` leaves in ``directory`` when its process is killed
    mid-write (a checkpoint's can be hundreds of MB; repeated crashes would fill the disk). Call only while
    no other process writes there (training and prepare hold the directory's lock). Returns what it removed."""
    removed = []
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and _TEMPORARY.fullmatch(entry.name):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    return removed


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
