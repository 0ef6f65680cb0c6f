"""An exclusive lock on a directory, so that two jobs never write the same files."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import TrainingError


class DirectoryLock:
    """An exclusive lock on a directory for as long as this object lives (flock on DIR/.lock): two jobs
    writing the same files would ruin each other's work. Released by ``release()``, which also removes
    DIR/.lock, or when the process exits (a killed job leaves the empty file behind; the next job takes it
    over). Where flock does not exist (Windows), nothing is locked.

    Removing the file is safe against a job that opened it just before: the holder unlinks it *before*
    unlocking, and a job that then gets its flock checks that DIR/.lock is still the file it locked (same
    inode); if not (it locked a deleted file, and a third job may hold the new one), it starts over.
    """

    def __init__(self, directory: Path, what: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = path = directory / ".lock"
        try:
            import fcntl
        except ImportError:
            self._file, self._locked = open(path, "a"), False
            return
        while True:
            file = open(path, "a")
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise TrainingError(f"{directory} is in use by another {what} (it holds a lock on {path})") from None
            if self._names(path, file):
                self._file, self._locked = file, True
                return
            file.close()  # the holder removed it between our open and our flock: lock the current one

    def release(self) -> None:
        """Unlock and remove DIR/.lock (removed first, while still locked: see the class's comment)."""
        file, self._file = self._file, None
        if file is None:
            return  # released already
        try:
            if self._locked and self._names(self.path, file):
                os.unlink(self.path)
        except OSError:
            pass  # the lock matters, not the empty file: a read-only or vanished directory keeps it
        finally:
            file.close()  # closing the descriptor releases the flock
        if not self._locked:
            try:  # no flock (Windows): the file can only be removed once closed
                os.unlink(self.path)
            except OSError:
                pass

    @staticmethod
    def _names(path: Path, file) -> bool:
        """Whether ``path`` still names the file open as ``file`` (same device and inode)."""
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        held = os.fstat(file.fileno())
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
