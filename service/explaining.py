"""Grad-CAM's own threads, beside (never in) the inference thread: autograd through the two-tower net.

At most ``ALEXNET_EXPLAIN_CONCURRENCY`` explanations are under way at once, counted from before the body is
read until the answer; one more is refused with 503 and Retry-After, never queued. There are no more
threads than places, so nothing ever waits in the pool's queue.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .admission import Admission
from .engine import Explanation, LoadedModel
from .metrics import ServiceMetrics
from .problems import ProblemError


class Explainers:
    def __init__(self, concurrency: int, metrics: ServiceMetrics):
        self.concurrency, self.metrics = concurrency, metrics
        self.places = Admission(
            concurrency,
            rejected=metrics.explain_rejected,
            refused=functools.partial(_busy, concurrency),
            seconds_per_request=1.0,
            served_at_once=concurrency,
        )
        self._threads: ThreadPoolExecutor | None = None

    def start(self, torch_threads: int) -> None:
        self._threads = ThreadPoolExecutor(
            self.concurrency, "explain", initializer=torch.set_num_threads, initargs=(torch_threads,)
        )

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    @property
    def under_way(self) -> int:
        """/explain requests between admission() and their answer."""
        return self.places.under_way

    def admission(self):
        """Hold one of the ``concurrency`` places from before the body is read until the answer; none free:
        503 with Retry-After (never a queue)."""
        return self.places.hold()

    async def explain(
        self, model: LoadedModel, image: torch.Tensor, class_index: int | None, *, as_png: bool
    ) -> tuple[Explanation, bytes | None]:
        """Grad-CAM of one decoded image in an explain thread, and the PNG of its overlay if asked for."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        explanation, png = await loop.run_in_executor(self._threads, _explain, model, image, class_index, as_png)
        seconds = time.perf_counter() - started
        self.metrics.explain_seconds.observe(seconds)
        self.places.observe(seconds)
        return explanation, png


def _explain(model: LoadedModel, image: torch.Tensor, class_index: int | None, as_png: bool):
    explanation = model.explain(image, class_index)
    return explanation, explanation.png() if as_png else None


def _busy(limit: int, retry_after: int) -> ProblemError:
    return ProblemError(
        503,
        "explain-busy",
        f"{limit} explanation(s) already under way (ALEXNET_EXPLAIN_CONCURRENCY); retry later",
        {"Retry-After": str(retry_after)},
    )
