"""Dynamic batching: concurrent requests share one forward pass.

A request takes a place (``admission``: 503 + Retry-After when ``queue_size`` are in), then ``infer`` puts
its decoded images on one asyncio queue. A worker task gathers up to ``max_batch`` rows and hands them to
the one inference thread, so the event loop and the decode threads keep going while the network runs.
A batch smaller than the last cycle's peak waits up to ``max_wait_ms`` for the rest, since N clients in a
closed loop otherwise settle into two groups taking turns; a lone client never waits. Requests of every
kind (``engine.Task``) share the queue in arrival order, so none starves another (docs/serving.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .admission import Admission
from .engine import LoadedModel, Task
from .metrics import ServiceMetrics

log = logging.getLogger("service")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class InferenceFailed(RuntimeError):
    pass


@dataclass(eq=False)
class _Job:
    model: LoadedModel
    images: list[torch.Tensor]  # n uint8 [3, S, S] (a preprocessed task: n float32 [3, crop, crop])
    task: Task
    future: asyncio.Future
    rows: int
    enqueued: float = field(default_factory=time.perf_counter)


def _report_exit(worker: asyncio.Task) -> None:
    if not worker.cancelled() and worker.exception() is not None:
        log.critical("the batching worker stopped; requests can no longer be served", exc_info=worker.exception())


class Batcher:
    def __init__(self, *, max_batch: int, max_wait_ms: float, queue_size: int, threads: int, metrics: ServiceMetrics):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.metrics = metrics
        self.places = Admission(queue_size, rejected=metrics.rejected, refused=QueueFull, seconds_per_request=0.0)
        self._recent_peak = 0  # most requests admitted at once since the last batch was gathered
        self.waiting_rows = 0  # network inputs in the queue
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One thread owns every forward pass: torch's intra-op pool is sized once, and passes never overlap.
        self._thread = ThreadPoolExecutor(1, "inference", initializer=torch.set_num_threads, initargs=(threads,))
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")
        self._worker.add_done_callback(_report_exit)

    @property
    def running(self) -> bool:
        """False if the worker died (a bug): /readyz then says so, instead of queueing requests forever."""
        return self._worker is not None and not self._worker.done()

    @property
    def admitted(self) -> int:
        """Requests between admission() and their answer."""
        return self.places.under_way

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(InferenceFailed("the service is shutting down"))
        self._thread.shutdown(wait=True)

    @contextlib.contextmanager
    def admission(self):
        """Hold a place for one request from before its body is read until it is answered, so that at most
        ``queue_size`` requests (and their bodies) are in at once; none free: QueueFull."""
        with self.places.hold():
            self._recent_peak = max(self._recent_peak, self.admitted)
            yield

    async def infer(self, model: LoadedModel, images: list[torch.Tensor], task: Task) -> torch.Tensor:
        """What ``task`` asks for n uint8 images [3, S, S] (softmax probabilities [n, classes], or features
        [n, units]), computed in some batch."""
        future = asyncio.get_running_loop().create_future()
        job = _Job(model, images, task, future, rows=len(images) * task.rows_per_image)
        self.waiting_rows += job.rows
        self._queue.put_nowait(job)  # bounded by admission()
        return await future

    async def _run(self) -> None:
        carried: _Job | None = None  # a job that did not fit the previous batch
        while True:
            first = carried or await self._queue.get()
            carried = None
            jobs, rows = [first], first.rows
            # As many requests as were in the service at once during the last cycle are likely on their way
            # (clients whose answers just went out send their next request): worth a short wait.
            expected, self._recent_peak = self._recent_peak, self.admitted
            deadline = time.perf_counter() + self.max_wait
            while rows < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or len(jobs) >= expected:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if job.model is not first.model or rows + job.rows > self.max_batch:
                    carried = job  # another model (a reload happened) or too big: starts the next batch
                    break
                jobs.append(job)
                rows += job.rows
            for job in jobs:
                self.waiting_rows -= job.rows
            if log.isEnabledFor(logging.DEBUG):
                waited = 1000 * (time.perf_counter() - deadline + self.max_wait)
                log.debug(
                    "batch: %d requests (%d inputs), %d expected, gathered in %.1f ms",
                    len(jobs),
                    rows,
                    expected,
                    waited,
                )
            await self._forward([job for job in jobs if not job.future.done()])

    async def _forward(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.enqueued)
        model = jobs[0].model
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._thread,
                model.run,
                [job.images for job in jobs],
                [job.task for job in jobs],
                self.max_batch,
            )
        except Exception as e:
            log.exception("forward pass failed for %d request(s)", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(InferenceFailed(f"forward pass failed: {type(e).__name__}: {e}"))
            return
        seconds = time.perf_counter() - started
        self.metrics.forward_seconds.observe(seconds)
        self.metrics.batch_rows.observe(sum(job.rows for job in jobs))
        self.metrics.batch_requests.observe(len(jobs))
        self.places.observe(seconds / len(jobs))
        for job, output in zip(jobs, outputs):
            if not job.future.done():
                job.future.set_result(output)
