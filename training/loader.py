"""Batches of prepared images, loaded ahead into reusable buffer slots: ``BatchLoader``.

A slot is refilled only once its batch was released (its host→device copy, or the CPU augmentation, is done).
Raw store: an ``index_select`` out of the mapped file, in threads. JPEG store: forked worker processes
decode straight into slots of one shared buffer; Pillow's Python work would hold the GIL in threads.
A dead worker raises LoaderError instead of hanging; ``workers=0`` loads in the calling thread.
docs/training-formats.md describes the pinning, the worker protocol and the errors.
"""

from __future__ import annotations

import collections
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for

import torch

from .data import IMAGE_BYTES, IMAGE_SIZE
from .errors import TrainingError


class LoaderError(RuntimeError):
    """The loader cannot go on: a worker process died, or the batches are not being released."""


@dataclass(eq=False)
class LoadedBatch:
    """One batch in a loader slot. ``images``: uint8 [n, 3, 256, 256] and ``labels``: int64 [n], views into
    the slot's buffers (pinned when the loader pins), valid until ``release()``."""

    key: int
    images: torch.Tensor
    labels: torch.Tensor
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """The consumer is done with the buffers; the slot may be refilled. Calling it again does nothing."""
        release, self._release = self._release, None
        if release is not None:
            release()


class BatchLoader:
    """Loads batches of a prepared split (raw or JPEG store) ahead of the consumer; see the module docstring.

    split: a ``PreparedDataset.split(...)``; workers: threads (raw) or processes (jpeg), 0 = inline;
    batch_size: the largest batch; pin_memory: page-locked buffers for fast, asynchronous copies to a GPU
    (ignored without CUDA); slots: buffers, i.e. batches loaded ahead plus those the consumer holds
    (default max(2, 2·workers)); release_timeout: seconds to wait for a release when every slot is held.
    """

    def __init__(
        self,
        split,
        workers: int,
        batch_size: int,
        pin_memory: bool = False,
        slots: int | None = None,
        *,
        release_timeout: float = 30.0,
    ):
        if workers < 0 or batch_size < 1 or (slots is not None and slots < 1):
            raise ValueError("workers must be ≥ 0, batch_size and slots ≥ 1")
        self.split, self.workers, self.batch_size = split, workers, batch_size
        self.slots = slots if slots is not None else max(2, 2 * workers)
        self.release_timeout = release_timeout
        self.uses_processes = workers > 0 and not getattr(split, "threads_suffice", True)
        self.pinned = bool(pin_memory) and torch.cuda.is_available()
        shape = (self.slots, batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)

        self._free = collections.deque(range(self.slots))
        self._condition = threading.Condition()
        self._iterating = self._closed = False
        self._futures: dict[int, object] = {}
        self._pool = None
        self._workers: list[multiprocessing.Process] = []
        self._conns: list = []
        self._idle: collections.deque[int] = collections.deque()
        self._queue: collections.deque[tuple[int, list[int]]] = collections.deque()
        self._in_flight: dict[int, int] = {}  # slot → worker
        self._done: set[int] = set()
        self._registered = None  # pointer registered with cudaHostRegister
        self._pinned_copy: torch.Tensor | None = None

        self.host_path: str | None = None  # how batches reach the GPU; None when not pinning (see _pin_shared_buffer)
        if self.uses_processes:
            # MAP_SHARED | MAP_ANONYMOUS: the forked workers write into the very pages this process reads.
            self._shared = mmap.mmap(-1, self.slots * batch_size * IMAGE_BYTES)
            self._images = torch.frombuffer(self._shared, dtype=torch.uint8).view(shape)
            # Forked before anything here touches CUDA: pinning creates the CUDA context (on the current
            # device), which the workers have no use for.
            self._start_workers()
        self._labels = torch.empty(self.slots, batch_size, dtype=torch.int64, pin_memory=self.pinned)
        if self.uses_processes:
            if self.pinned:
                self._pin_shared_buffer()
        else:
            self._shared = None
            self._images = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pinned)
            if workers > 0:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loader")
        self._finalizer = weakref.finalize(self, _shut_down, self._workers, self._conns, self._pool)

    # Public interface.

    def batches(self, items: Iterable[tuple[int, torch.Tensor]]) -> Iterator[LoadedBatch]:
        """items: (key, indices int64 tensor) pairs, e.g. (step, this rank's indices of that step), in order.
        Yields LoadedBatch in the same order, loading up to ``slots`` batches ahead."""
        if self._closed:
            raise LoaderError("the loader is closed")
        if self._iterating:
            raise LoaderError("one batches() iteration at a time per loader")
        self._iterating = True
        items = iter(items)
        pending: collections.deque[tuple[int, int, int]] = collections.deque()  # (key, slot, n), in order
        exhausted, clean = False, False
        try:
            while True:
                while not exhausted and self._free:
                    try:
                        key, indices = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    with self._condition:
                        slot = self._free.popleft()
                    pending.append((key, slot, self._start(slot, indices)))
                if not pending:
                    if exhausted:
                        break
                    self._wait_for_release()
                    continue
                key, slot, n = pending[0]
                self._wait_done(slot)
                pending.popleft()
                yield self._loaded(key, slot, n)
            clean = True
        except GeneratorExit:  # the consumer stopped early: let the work in flight finish, keep the workers
            clean = True
            raise
        finally:
            self._iterating = False
            if clean:
                try:
                    for _, slot, _ in pending:
                        self._wait_done(slot)
                        self._give_back(slot)
                except BaseException:
                    self.close()
                    raise
            else:  # an error or Ctrl-C: the workers' state is unknown; end them
                self.close()

    def close(self) -> None:
        """End the worker processes or threads and free the buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        if self._registered is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self._registered)
            except Exception:
                pass
            self._registered = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Filling slots.

    def _start(self, slot: int, indices) -> int:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        n = len(indices)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch of {n} images; the loader holds 1..{self.batch_size}")
        torch.index_select(self.split.labels, 0, indices, out=self._labels[slot, :n])
        if self.uses_processes:
            self._queue.append((slot, indices.tolist()))
            self._dispatch()
        elif self._pool is not None:
            self._futures[slot] = self._pool.submit(self.split.read_into, indices, self._images[slot])
        else:
            self.split.read_into(indices, self._images[slot])
            self._done.add(slot)
        return n

    def _wait_done(self, slot: int) -> None:
        """Return once the slot is filled (raising what filling it raised)."""
        if self.uses_processes:
            while slot not in self._done:
                self._pump()
        elif slot in self._futures:
            self._futures.pop(slot).result()  # re-raises the thread's exception
        self._done.discard(slot)

    def _loaded(self, key: int, slot: int, n: int) -> LoadedBatch:
        images = self._images[slot, :n]
        if self._pinned_copy is not None:  # registering the shared buffer failed: one copy into pinned memory
            images = self._pinned_copy[slot, :n]
            images.copy_(self._images[slot, :n])
        return LoadedBatch(key, images, self._labels[slot, :n], lambda: self._give_back(slot))

    def _give_back(self, slot: int) -> None:
        with self._condition:
            self._free.append(slot)
            self._condition.notify_all()

    def _wait_for_release(self) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: bool(self._free), timeout=self.release_timeout):
                raise LoaderError(
                    f"all {self.slots} loader slots are held by batches that were not released for "
                    f"{self.release_timeout:g} s: call batch.release() when done with a batch, or use more slots"
                )

    # Worker processes (jpeg store).

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("fork")  # the split's mappings and the buffer are inherited
        parent = os.getpid()
        for number in range(self.workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(self.split, self._shared, self.batch_size, theirs, parent, tuple(self._conns) + (ours,)),
                name=f"loader-{number}",
                daemon=True,
            )
            process.start()
            theirs.close()  # only the worker holds its end: a dead worker reads as EOF here
            self._workers.append(process)
            self._conns.append(ours)
            self._idle.append(number)

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            worker = self._idle.popleft()
            slot, indices = self._queue.popleft()
            try:
                self._conns[worker].send((slot, indices))
            except OSError:
                self._raise_dead(worker)
            self._in_flight[slot] = worker

    def _pump(self) -> None:
        """Wait for completion messages (or a worker's death), then hand out queued work."""
        busy = set(self._in_flight.values())
        conns = {self._conns[w]: w for w in busy}
        sentinels = {self._workers[w].sentinel: w for w in range(len(self._workers))}
        for ready in wait_for([*conns, *sentinels], timeout=5.0):
            if ready in conns:
                worker = conns[ready]
                try:
                    slot, error = ready.recv()
                except (EOFError, OSError):
                    self._raise_dead(worker)
                del self._in_flight[slot]
                self._idle.append(worker)
                if error is not None:
                    kind, message = error
                    if kind == "TrainingError":
                        raise TrainingError(message)
                    raise LoaderError(f"loader worker {worker} failed:\n{message}")
                self._done.add(slot)
        for worker, process in enumerate(self._workers):
            if not process.is_alive():
                self._raise_dead(worker)
        self._dispatch()

    def _raise_dead(self, worker: int):
        process = self._workers[worker]
        process.join(0.1)
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        raise LoaderError(
            f"loader worker process {process.pid} {how} (out of memory? killed?); rerun, with --resume for train"
        )

    def _pin_shared_buffer(self) -> None:
        """Page-lock the shared buffer in place, so batches go to the GPU with no second copy."""
        pointer, nbytes = self._images.data_ptr(), self._images.numel()
        try:
            cudart = torch.cuda.cudart()
            error = int(cudart.cudaHostRegister(pointer, nbytes, 0))  # cudaHostRegisterDefault; 0 = success
            ok, why = error == 0, f"CUDA error {error}"
        except Exception as e:
            ok, why = False, f"{type(e).__name__}: {e}"[:200]
        if ok:
            self._registered = pointer
            self.host_path = "registered"
            _say_once("the JPEG workers' shared buffer is page-locked in place (cudaHostRegister): no extra copy")
        else:
            self._pinned_copy = torch.empty(self._images.shape, dtype=torch.uint8, pin_memory=True)
            self.host_path = f"copied ({why})"
            _say_once(
                f"cudaHostRegister of the JPEG workers' shared buffer failed ({why}): each batch is copied "
                "into pinned memory first, on the training thread"
            )


# Which way batches reach the GPU, said once per process (each epoch's evaluation makes a loader too).
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(f"loader: {message}", file=sys.stderr, flush=True)


def _shut_down(workers, conns, pool) -> None:
    """End the workers (asked, then terminated, then killed) and the threads; called once by close/GC/exit."""
    for conn in conns:
        try:
            conn.send(None)
        except OSError:
            pass
    for process in workers:
        process.join(1.0)
        if process.is_alive():
            process.terminate()
            process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join()
    for conn in conns:
        conn.close()
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_main(split, shared: mmap.mmap, batch_size: int, conn, parent: int, parent_ends) -> None:
    """A forked decoding worker: receive (slot, indices), decode into the slot, answer (slot, error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the consumer's; it ends us through close()
    for end in parent_ends:  # the loader's ends of every pipe so far: ours must read EOF when it is gone
        end.close()
    view = memoryview(shared)
    slot_bytes = batch_size * IMAGE_BYTES
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent:  # orphaned (the consumer was killed): stop
                return
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        slot, indices = message
        try:
            split.decode_into(indices, view, slot * slot_bytes)
            error = None
        except TrainingError as e:
            error = ("TrainingError", str(e))
        except BaseException as e:  # noqa: BLE001 - reported to the consumer, which raises it
            error = (type(e).__name__, traceback.format_exc())
        try:
            conn.send((slot, error))
        except OSError:
            return
