"""What a new user trips over: `prepare` and `train` leave no `.lock` behind, and removing it on release is
safe against jobs that opened it at the same moment (training/directory_lock.py)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from support.training import make_source, prepare_quietly, train_cli

from training import directory_lock as lock_module
from training.directory_lock import DirectoryLock
from training.errors import TrainingError

fcntl = pytest.importorskip("fcntl", reason="DirectoryLock locks only where flock exists")


@pytest.mark.slow
def test_prepare_and_train_leave_no_lock_file(tmp_path):
    prepared, run = tmp_path / "prepared", tmp_path / "run"
    prepare_quietly(make_source(tmp_path / "src", classes=2, train=3, val=1), prepared)
    assert not (prepared / ".lock").exists()
    assert train_cli(prepared, run, "--epochs", "1") == 0
    assert not (run / ".lock").exists() and (run / "best.safetensors").exists()


def test_a_held_lock_refuses_others_and_its_release_removes_the_file(tmp_path):
    held = DirectoryLock(tmp_path / "dir", "job")
    assert (tmp_path / "dir" / ".lock").exists()
    with pytest.raises(TrainingError, match="in use by another job"):
        DirectoryLock(tmp_path / "dir", "job")
    assert (tmp_path / "dir" / ".lock").exists()  # a refused job does not remove the holder's file
    held.release()
    held.release()  # twice is harmless
    assert list((tmp_path / "dir").iterdir()) == []
    again = DirectoryLock(tmp_path / "dir", "job")  # and the directory can be locked again
    again.release()


def test_a_job_that_opened_the_file_as_the_holder_removed_it_locks_the_new_one(tmp_path, monkeypatch):
    """B opens .lock; then A releases it (unlinks, unlocks) and C locks a new .lock; then B's flock succeeds,
    on the deleted file. Without the inode check B and C would both run; with it, B is refused."""
    directory = tmp_path / "dir"
    a = DirectoryLock(directory, "job")
    others = {}
    real_open = open

    def open_then_interleave(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        if not others:  # B's first open: A and C act between B's open and B's flock
            others["b opened"] = True
            a.release()
            others["c"] = DirectoryLock(directory, "job")
        return file

    monkeypatch.setattr(lock_module, "open", open_then_interleave, raising=False)
    with pytest.raises(TrainingError, match="in use by another job"):
        DirectoryLock(directory, "job")  # B
    monkeypatch.undo()
    c = others["c"]
    assert os.stat(directory / ".lock").st_ino == os.fstat(c._file.fileno()).st_ino  # C's file is in place
    c.release()
    assert list(directory.iterdir()) == []


def test_a_job_that_locked_a_removed_file_starts_over(tmp_path, monkeypatch):
    """As above without C: B's flock gets the deleted file; B notices and locks a fresh .lock."""
    directory = tmp_path / "dir"
    a = DirectoryLock(directory, "job")
    opens = []
    real_open = open

    def open_then_release(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        opens.append(os.fstat(file.fileno()).st_ino)
        if len(opens) == 1:
            a.release()
        return file

    monkeypatch.setattr(lock_module, "open", open_then_release, raising=False)
    b = DirectoryLock(directory, "job")
    monkeypatch.undo()
    assert len(opens) == 2  # it opened .lock again
    assert os.stat(directory / ".lock").st_ino == os.fstat(b._file.fileno()).st_ino
    with pytest.raises(TrainingError, match="in use"):
        DirectoryLock(directory, "job")
    b.release()
    assert list(directory.iterdir()) == []


def _contend(directory, seconds, results):
    """Take the lock over and over; while holding it, claim a marker file that only one holder may have."""
    marker, taken, clashes = directory / "holder", 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lock = DirectoryLock(directory, "job")
        except TrainingError:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            clashes += 1  # another process believes it holds the lock too
        else:
            taken += 1
            os.close(fd)
            os.unlink(marker)
        lock.release()
    results.put((taken, clashes))


@pytest.mark.slow
def test_processes_racing_for_the_lock_never_hold_it_together(tmp_path):
    directory = tmp_path / "dir"
    directory.mkdir()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_contend, args=(directory, 1.5, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert sum(clashes for _, clashes in counts) == 0, counts
    assert sum(taken for taken, _ in counts) > 100, counts
    assert list(directory.iterdir()) == []
