"""The FastAPI application: its state (model, batcher, decode threads, reload watcher) and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI

import model as model_package
from model import ImageError

from . import engine, memory, problems, reload
from .batcher import Batcher
from .engine import Explanation, LoadedModel
from .memory import ByteBudget, Reservation
from .logs import ObserveRequests
from .metrics import ServiceMetrics
from .problems import ProblemError
from .routes import ROUTERS
from .settings import Settings
from .uploads import Upload

log = logging.getLogger("service")

UNTRAINED_WARNING = (
    "NO CHECKPOINT at %s: serving a freshly initialised AlexNet whose predictions are NOISE "
    '("trained": false in every response). Train one (python -m training train … --out checkpoints), import '
    "the published weights (python -m model.import_weights … --out %s; see the README), or point "
    "ALEXNET_CHECKPOINT at a checkpoint file. A checkpoint appearing there is picked up without a restart."
)


class ServiceState:
    """Everything a request needs, created in the lifespan and reached through ``app.state.service``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model: LoadedModel | None = None
        self.ready = False
        self.metrics = ServiceMetrics(queue_depth=self._queue_depth, model_info=self._model_info)
        self.batcher: Batcher | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self._watcher: asyncio.Task | None = None
        self._explainers: ThreadPoolExecutor | None = None
        self.explaining = 0  # /explain requests between explain_admission() and their answer
        self._seconds_per_explanation = 1.0  # running estimate, for Retry-After
        self.bodies = ByteBudget(settings.body_memory_bytes)
        self.decodes = ByteBudget(settings.decode_memory_bytes)
        self.worst_case: memory.WorstCase | None = None

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        devices = engine.resolve_devices(s.device)
        if engine.runs_cpu_inference_net(devices):
            # Set once for the process, before the model is loaded: loading, warming up and every forward
            # pass then run with the allocator that CPUInferenceNet's throughput assumes (model/malloc.py).
            model_package.keep_freed_memory()
        path = s.checkpoint
        with memory.MeasureLoad() as load_cost:
            if _missing(path):
                log.warning(UNTRAINED_WARNING, path, path)
                self.model = await loop.run_in_executor(None, engine.untrained, devices)
                loaded = None
            else:
                loaded = reload.fingerprint(path)
                self.model = await loop.run_in_executor(None, engine.load, path, devices)
        identity = self.model.identity
        log.info(
            "serving %s on %s (trained=%s, epoch %s, val top-1 error %s, top-5 %s)",
            path if loaded else "an untrained net",
            ",".join(map(str, devices)),
            identity.trained,
            identity.epoch,
            identity.val_top1_error,
            identity.val_top5_error,
            extra={
                "fields": {
                    "sha256": identity.sha256,
                    "devices": [str(d) for d in devices],
                    "trained": identity.trained,
                    "val_top1_error": identity.val_top1_error,
                    "val_top5_error": identity.val_top5_error,
                }
            },
        )
        self.batcher = Batcher(
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            threads=s.thread_count,
            metrics=self.metrics,
        )
        self.batcher.start()
        self.worst_case = await loop.run_in_executor(None, self._check_memory, self.model, load_cost.result)
        self._decoder = ThreadPoolExecutor(s.decode_worker_count, "decode")
        # Grad-CAM's own threads: autograd through the two-tower net, beside (never in) the inference thread.
        # No more of them than explanations admitted at once, so nothing ever waits in this pool's queue.
        self._explainers = ThreadPoolExecutor(
            s.explain_concurrency, "explain", initializer=torch.set_num_threads, initargs=(s.thread_count,)
        )
        if s.reload_interval_s > 0:
            self._watcher = loop.create_task(
                reload.watch_checkpoint(
                    path,
                    s.reload_interval_s,
                    loaded,
                    load=functools.partial(engine.load, devices=devices),
                    switch=self._switch,
                    on_result=lambda result: self.metrics.reloads.inc(result),
                ),
                name="checkpoint-watcher",
            )
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.batcher is not None:
            await self.batcher.close()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
        if self._explainers is not None:
            self._explainers.shutdown(wait=True)

    def _check_memory(self, model: LoadedModel, load_cost: memory.ModelLoadCost) -> memory.WorstCase:
        """Run one full batch (so what it needs is resident), then compare the worst case the settings allow
        with the cgroup's memory limit: MemoryDoesNotFit when it cannot fit."""
        s = self.settings
        image = model.preprocessor.load(engine._WARM_UP_PNG)
        model.predict([[image] * s.max_batch], ["center"], max_batch=s.max_batch)
        gc.collect()
        worst = memory.worst_case(
            s,
            ready_bytes=memory.resident_bytes(),
            model_load=load_cost,
            decoded_image_bytes=image.numel() * image.element_size(),
        )
        limit, source = memory.cgroup_memory_limit()
        fields = {"event": "memory_bound", "worst_case_bytes": worst.total, "limit_bytes": limit}
        if limit is None:
            log.info("memory: worst case %s; %s", worst.describe(), source, extra={"fields": fields})
        elif worst.total > limit:
            raise memory.MemoryDoesNotFit(worst, limit, source)
        else:
            log.info(
                "memory: worst case %s fits the limit of %s MiB (%s)",
                worst.describe(),
                f"{limit / memory.MIB:,.0f}",
                source,
                extra={"fields": fields},
            )
        return worst

    @contextlib.contextmanager
    def body_reservation(self):
        """A request's share of the body budget, released when the request ends (if not before)."""
        reservation = Reservation(self.bodies)
        try:
            yield reservation
        finally:
            reservation.release()

    def _switch(self, new: LoadedModel) -> None:
        self.model = new  # requests already under way keep the model they started with

    async def decode(self, model: LoadedModel, uploads: list[Upload]) -> list[torch.Tensor]:
        """Decode every upload in the decode threads → uint8 [3, S, S] each, for this model's preprocessing.
        Each upload's body is dropped once decoded.

        Each decode first bounds its memory from the image's header and waits for that much of the decode
        budget. No tensor work happens on the event loop: a torch op here would wake OpenMP threads and
        stall every connection while they come."""
        results = await asyncio.gather(*(self._decode_one(model, upload) for upload in uploads), return_exceptions=True)
        for position, (upload, result) in enumerate(zip(uploads, results), 1):
            upload.data = []
            if isinstance(result, ImageError):
                name = upload.describe(position) if len(uploads) > 1 or upload.filename else "image"
                raise problems.image_problem(result, name)
            if isinstance(result, BaseException):
                raise result
        return results

    async def _decode_one(self, model: LoadedModel, upload: Upload) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        max_pixels = self.settings.max_pixels
        need = await loop.run_in_executor(self._decoder, _decode_peak, model, upload.data, max_pixels)
        if need > self.decodes.capacity:
            raise model_package.ImageTooLarge(
                f"decoding it needs up to {need / memory.MIB:,.0f} MiB, more than all decodes together may use "
                f"({self.decodes.capacity / memory.MIB:,.0f} MiB, ALEXNET_DECODE_MEMORY_BYTES)"
            )
        async with self.decodes.hold(need):
            return await loop.run_in_executor(self._decoder, _decode, model, upload.data, max_pixels)

    @contextlib.contextmanager
    def explain_admission(self):
        """Hold one of the ``explain_concurrency`` places from before the body is read until the answer;
        none free: 503 with Retry-After (never a queue)."""
        limit = self.settings.explain_concurrency
        if self.explaining >= limit:
            self.metrics.explain_rejected.inc()
            retry_after = max(1, math.ceil(self._seconds_per_explanation * self.explaining / limit))
            raise ProblemError(
                503,
                "explain-busy",
                f"{limit} explanation(s) already under way (ALEXNET_EXPLAIN_CONCURRENCY); retry later",
                {"Retry-After": str(retry_after)},
            )
        self.explaining += 1
        try:
            yield
        finally:
            self.explaining -= 1

    async def explain(
        self, model: LoadedModel, image: torch.Tensor, class_index: int | None, *, as_png: bool
    ) -> tuple[Explanation, bytes | None]:
        """Grad-CAM of one decoded image in an explain thread, and the PNG of its overlay if asked for."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        explanation, png = await loop.run_in_executor(self._explainers, _explain, model, image, class_index, as_png)
        seconds = time.perf_counter() - started
        self.metrics.explain_seconds.observe(seconds)
        self._seconds_per_explanation = 0.8 * self._seconds_per_explanation + 0.2 * seconds
        return explanation, png

    def _queue_depth(self) -> dict:
        batcher = self.batcher
        if batcher is None:
            return {("admitted",): 0, ("waiting_inputs",): 0, ("explaining",): self.explaining}
        return {
            ("admitted",): batcher.admitted,
            ("waiting_inputs",): batcher.waiting_rows,
            ("explaining",): self.explaining,
        }

    def _model_info(self) -> dict:
        if self.model is None:
            return {}
        identity = self.model.identity
        errors = tuple("" if e is None else repr(e) for e in (identity.val_top1_error, identity.val_top5_error))
        return {(identity.checkpoint or "", identity.sha256 or "", str(identity.trained).lower(), *errors): 1}


def _missing(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # exists but unreadable: load_checkpoint says what is wrong
    return False


def _explain(model: LoadedModel, image: torch.Tensor, class_index: int | None, as_png: bool):
    explanation = model.explain(image, class_index)
    return explanation, explanation.png() if as_png else None


def _decode_peak(model: LoadedModel, data, max_pixels: int) -> int:
    try:
        return model.preprocessor.decode_peak_bytes(data, max_pixels=max_pixels)
    except ImageError:
        raise
    except Exception as e:  # as in _decode
        log.warning("unexpected decoder error", exc_info=True)
        raise model_package.CorruptImage(f"cannot read image header: {type(e).__name__}: {e}") from None


def _decode(model: LoadedModel, data, max_pixels: int) -> torch.Tensor:
    try:
        return model.preprocessor.load(data, max_pixels=max_pixels)
    except ImageError:
        raise
    except Exception as e:  # a decoder failure the model package did not anticipate: still the input's fault
        log.warning("unexpected decoder error", exc_info=True)
        raise model_package.CorruptImage(f"cannot decode image: {type(e).__name__}: {e}") from None


DESCRIPTION = """\
ImageNet classification with the 2012 AlexNet (Krizhevsky, Sutskever & Hinton).

`POST /classify` with one or more images (multipart field `file`, or a raw `image/*` body) answers the
top-k ImageNet classes per image; `POST /embed`, their fc6 or fc7 feature vectors; `POST /explain` (one
image), a Grad-CAM heat map of where the net finds a class. `GET /model/filters.png` shows conv1's kernels.
Errors are RFC 9457 `application/problem+json` bodies.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()
    state = ServiceState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await state.start()
        except memory.MemoryDoesNotFit as e:
            log.error("cannot start the service: %s", e, extra={"fields": {"event": "startup_failed"}})
            app.state.startup_exit_status = 2  # settings that cannot work, like an invalid one (__main__)
            await state.stop()
            raise
        except Exception as e:
            log.error("cannot start the service: %s", e, extra={"fields": {"event": "startup_failed"}})
            await state.stop()
            raise
        # Everything made so far (FastAPI's routes, pydantic's validators, torch's modules) lives as long as
        # the process: moved out of the collector's generations, its full passes, which the allocations of
        # each request trigger, stop walking it. About 2 ms less per request at 1 client (BENCHMARKS.md).
        gc.freeze()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="AlexNet classification API",
        version=model_package.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs is served by routes/page.py from this server's own files (FastAPI's loads Swagger UI from a
        # CDN, and its inline script breaks the Content-Security-Policy); no ReDoc, no OAuth2 redirect page.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.service = state
    problems.install(app)
    app.add_middleware(ObserveRequests, metrics=state.metrics)
    for router in ROUTERS:
        app.include_router(router)
    return app
