"""What the service holds while it runs: the model being served, the batcher, the decode and explain
threads, the budgets and the reload watcher; its start and stop.

Endpoints use its parts directly, in the order decode → batch → predict → encode: ``not_ready()`` and
``ready_model()`` (the one readiness check), ``body_reservation()`` (a body's share of the budget),
``decoder.decode`` (decoding.py), ``batcher.admission`` and ``batcher.infer`` (batcher.py), and
``explainers`` for Grad-CAM (explaining.py). Encoding the answer is each route's business (routes/); routes
get this state and the ready model as typed dependencies (routes/dependencies.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os

import model as model_package

from . import engine, memory, reload
from .batcher import Batcher
from .decoding import Decoder
from .engine import LoadedModel
from .explaining import Explainers
from .logs import identity_summary
from .memory import ByteBudget, Reservation
from .metrics import ServiceMetrics
from .problems import ProblemError
from .settings import Settings

log = logging.getLogger("service")

UNTRAINED_WARNING = (
    "NO CHECKPOINT at %s: serving a freshly initialised AlexNet whose predictions are NOISE "
    '("trained": false in every response). Train one (python -m training train … --out checkpoints), import '
    "the published weights (python -m model.import_weights … --out %s; see the README), or point "
    "ALEXNET_CHECKPOINT at a checkpoint file. A checkpoint appearing there is picked up without a restart."
)

# Why requests cannot be served (ServiceState.not_ready): /readyz says which; the endpoints answer 503.
NOT_LOADED = "not-loaded"  # starting, or shutting down
WORKER_STOPPED = "worker-stopped"  # the batching worker died (a bug; the log says why)


class ServiceState:
    """Everything a request needs, created with the app and started and stopped in its lifespan."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model: LoadedModel | None = None
        self.ready = False
        self.metrics = ServiceMetrics(queue_depth=self._queue_depth, model_info=self._model_info, memory=self._memory)
        self.batcher: Batcher | None = None
        self.bodies = ByteBudget(settings.body_memory_bytes)
        self.decoder = Decoder(ByteBudget(settings.decode_memory_bytes), settings.max_pixels)
        self.explainers = Explainers(settings.explain_concurrency, self.metrics)
        self._watcher: asyncio.Task | None = None
        self.worst_case: memory.WorstCase | None = None
        self.memory_limit: int | None = None  # the cgroup's, found at start-up

    async def start(self) -> None:
        """Load the model, then start the batcher, the decode and explain threads and the reload watcher."""
        s = self.settings
        devices = model_package.resolve_devices(s.device)
        if engine.runs_cpu_inference_net(devices):
            # Set once for the process, before the model is loaded: loading, warming up and every forward
            # pass then run with the allocator that CPUInferenceNet's throughput assumes (model/malloc.py).
            model_package.keep_freed_memory()
        loaded, load_cost = await self._load(devices)
        _log_serving(self.model, s.checkpoint if loaded else None, devices)
        self.batcher = Batcher(
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            threads=s.thread_count,
            metrics=self.metrics,
        )
        self.batcher.start()
        loop = asyncio.get_running_loop()
        self.worst_case = await loop.run_in_executor(None, self._check_memory, self.model, load_cost)
        self.decoder.start(s.decode_worker_count)
        self.explainers.start(s.thread_count)
        if s.reload_interval_s > 0:
            self._watcher = loop.create_task(self._watch(loaded, devices), name="checkpoint-watcher")
        self.ready = True

    async def _load(self, devices) -> tuple[reload.Fingerprint | None, memory.ModelLoadCost]:
        """Load the checkpoint (or, when none was asked for and the default one is missing, an untrained
        net) into ``self.model``: the file's fingerprint (None: untrained), and what loading it cost."""
        s, loop = self.settings, asyncio.get_running_loop()
        path = s.checkpoint
        await loop.run_in_executor(None, engine.start_runtime, devices)  # counted once, not in the load's cost
        with memory.MeasureLoad() as load_cost:
            if _missing(path) and not s.checkpoint_given:  # given, a missing file is CheckpointError (exit 3)
                log.warning(UNTRAINED_WARNING, path, path)
                self.model = await loop.run_in_executor(None, engine.untrained, devices)
                loaded = None
            else:
                loaded = reload.fingerprint(path)
                self.model = await loop.run_in_executor(None, engine.load, path, devices)
        return loaded, load_cost.result

    def _watch(self, loaded: reload.Fingerprint | None, devices):
        """The reload watcher's coroutine: polls the checkpoint file, and switches to a new one that loads."""
        return reload.watch_checkpoint(
            self.settings.checkpoint,
            self.settings.reload_interval_s,
            loaded,
            load=functools.partial(engine.load, devices=devices),
            switch=self._switch,
            on_result=lambda result: self.metrics.reloads.inc(result),
        )

    async def stop(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self.batcher is not None:
            await self.batcher.close()
        self.decoder.close()
        self.explainers.close()

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
        self.memory_limit = limit
        fields = {"event": "memory_bound", "worst_case_bytes": worst.total, "limit_bytes": limit}
        if limit is None:
            log.info("memory: worst case %s; %s", worst.describe(), source, extra={"fields": fields})
        elif worst.total > limit:
            raise memory.MemoryDoesNotFit(worst, limit, source)
        else:
            level, message = memory.fit_report(worst, limit, source)
            log.log(level, "%s", message, extra={"fields": fields})
        return worst

    # What the endpoints ask of the state itself ------------------------------------------------------------

    def not_ready(self) -> str | None:
        """Why requests cannot be served now (NOT_LOADED, WORKER_STOPPED), or None when they can: the one
        readiness check, for /readyz and every endpoint."""
        if not self.ready or self.model is None:
            return NOT_LOADED
        if self.batcher is None or not self.batcher.running:
            return WORKER_STOPPED
        return None

    def ready_model(self) -> LoadedModel | None:
        """The model being served, when requests can be served (else None). A request keeps the one it got
        throughout, even across a reload."""
        return None if self.not_ready() else self.model

    @contextlib.contextmanager
    def body_reservation(self):
        """A request's share of the body budget, released when the request ends (if not before)."""
        reservation = Reservation(self.bodies)
        try:
            yield reservation
        except ProblemError as e:
            if e.slug == "memory-busy":
                self.metrics.memory_busy.inc()
            raise
        finally:
            reservation.release()

    # --------------------------------------------------------------------------------------------------------

    def _switch(self, new: LoadedModel) -> None:
        self.model = new  # requests already under way keep the model they started with

    def _queue_depth(self) -> dict:
        batcher, explaining = self.batcher, self.explainers.under_way
        if batcher is None:
            return {("admitted",): 0, ("waiting_inputs",): 0, ("explaining",): explaining}
        return {
            ("admitted",): batcher.admitted,
            ("waiting_inputs",): batcher.waiting_rows,
            ("explaining",): explaining,
        }

    def _memory(self) -> dict:
        out = {
            ("bodies", "in_use"): self.bodies.in_use,
            ("bodies", "capacity"): self.bodies.capacity,
            ("decodes", "in_use"): self.decoder.budget.in_use,
            ("decodes", "capacity"): self.decoder.budget.capacity,
        }
        if self.worst_case is not None:
            out[("process", "worst_case")] = self.worst_case.total
        if self.memory_limit is not None:
            out[("process", "limit")] = self.memory_limit
        return out

    def _model_info(self) -> dict:
        if self.model is None:
            return {}
        identity = self.model.identity
        errors = tuple("" if e is None else repr(e) for e in (identity.val_top1_error, identity.val_top5_error))
        return {(identity.checkpoint or "", identity.sha256 or "", str(identity.trained).lower(), *errors): 1}


def _log_serving(model: LoadedModel, path, devices) -> None:
    """One line at start-up: what is served (``path``; None: an untrained net), where, and how good it is."""
    text, fields = identity_summary(model.identity)
    where = path if path is not None else "an untrained net"
    devices = [str(d) for d in devices]
    log.info("serving %s on %s (%s)", where, ",".join(devices), text, extra={"fields": {**fields, "devices": devices}})


def _missing(path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # exists but unreadable: load_checkpoint says what is wrong
    return False
