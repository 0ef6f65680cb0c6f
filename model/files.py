"""Files, written so that a reader sees the old file or the new one, never half of one (even after a crash).

- ``atomic_path`` / ``atomic_write``: any file, by a temporary file beside it renamed over it;
  ``remove_stale_temporaries`` clears what a killed writer left.
- ``write_safetensors`` / ``read_safetensors``: tensors plus a header of strings (JSON where a value is
  structured), the form of every file this project writes with tensors in it (checkpoints, the training
  state, the dataset statistics, prepare's progress records). A full disk is an OSError with its errno.
- ``file_identity``: (inode, size, mtime) of a path, to notice that another process replaced a file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors
import safetensors.torch
import torch

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


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write ``tensors`` and the header ``metadata`` (strings only, as safetensors requires)."""
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata, destination=path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of a safetensors file; any problem reading it raises (OSError,
    SafetensorError): callers say what the file was for."""
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def save_safetensors(tensors: dict, path, metadata: dict[str, str], *, destination=None) -> None:
    """``safetensors.torch.save_file``, but a failed write raises OSError with its errno (ENOSPC, EDQUOT, …)
    naming ``destination`` (default ``path``), as Python's own file writes do. safetensors reports I/O
    errors as a SafetensorError whose message holds "(os error N)": a full disk would otherwise not be
    recognisable as one."""
    try:
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    except safetensors.SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(destination or path)) from e


FileIdentity = tuple[int, int, int]


def file_identity(path: str | os.PathLike) -> FileIdentity | None:
    """(inode, size, mtime in ns) of the file at ``path``, None when there is none: it changes when the
    file is replaced (a rename over it: a new inode) or rewritten in place (size or mtime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
