"""Decoding images in worker processes, results in order, with a bounded number of tasks in flight.

`training prepare` and `training predict` both decode this way.
Each worker runs one torch thread and ignores Ctrl-C, which is the parent's to handle.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    torch.set_num_threads(1)  # one image per process; also keeps forked OpenMP pools out of the way
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool on Ctrl-C
    if initializer is not None:
        initializer(*initargs)


class DecodePool:
    """``workers`` forked processes (spawned where fork is not safe), or none at all for ``workers`` ≤ 0.

    Without workers, each task runs in this process when its result is asked for (debugging, small tests).
    ``initializer(*initargs)`` runs once in each worker, or once here when there are none.
    """

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        self._pool = None
        self.method = self.method_for(workers)
        if self.method == "inline":
            if initializer is not None:
                initializer(*initargs)
            return
        context = multiprocessing.get_context(self.method)
        self._pool = context.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs))

    @staticmethod
    def method_for(workers: int) -> str:
        """How the workers will start: "fork", "spawn", or "inline" (no workers)."""
        if workers <= 0:
            return "inline"
        return "fork" if sys.platform == "linux" else "spawn"

    def in_order(self, fn: Callable, tasks: Iterable, window: int) -> Iterator:
        """``fn(task)`` for each task, in order, at most ``window`` tasks in flight.

        Pool.imap would read every task up front: all of a .tar.gz's bytes, or every decoded image.
        """
        pending: deque = deque()
        for task in tasks:
            pending.append(self._submit(fn, task))
            if len(pending) >= window:
                yield pending.popleft()()
        while pending:
            yield pending.popleft()()

    def _submit(self, fn: Callable, task) -> Callable:
        if self._pool is None:
            return lambda: fn(task)
        return self._pool.apply_async(fn, (task,)).get

    def close(self) -> None:
        """Stop the workers, finished or not."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
