"""The service's memory bound: budgets for what requests hold, and the start-up check against the cgroup.

Each thing a request holds has a bound: bodies (``body_memory_bytes`` for all of them, reserved before they
are read), decodes (``decode_memory_bytes``, each image's peak bounded from its header before a pixel is
decoded; too big alone → 413) and decoded images (``queue_size`` × ``max_files``). ``worst_case`` adds
them to what the process holds once ready, to what a hot reload and /explain's net add, and to allocator
slack; at start-up it is compared with the cgroup's memory limit. docs/serving.md, "Memory", says how
each was measured and what to lower when it does not fit."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("service")

MIB = 1024 * 1024
# Allocator overhead on top of what is counted: glibc's free lists and per-thread arenas keep some of what
# was freed. Sized from bench/memory_load.py's peaks against the counted worst case (BENCHMARKS.md).
ALLOCATOR_SLACK_FRACTION = 0.05
ALLOCATOR_SLACK_BYTES = 64 * MIB
# One Grad-CAM in flight: the two-tower net's activations and their gradients at batch 1 (measured ~40 MiB).
EXPLANATION_BYTES = 64 * MIB
# The share of the memory limit a start should leave over its worst case. The ready size is measured at each
# start and moves by ~100 MiB from one to the next (582–700 MiB for the same settings): with less to spare,
# the same settings may refuse to start another time. Less than this is a warning (docs/serving.md, "Memory").
MIN_HEADROOM = 0.10


class ByteBudget:
    """Bytes that requests may hold at once. Waiters are served in arrival order, so a large request is not
    starved by a stream of small ones; one that needs more than ``capacity`` never fits (the caller says 413)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int, timeout: float | None = None) -> bool:
        """Take ``n`` bytes, waiting up to ``timeout`` seconds (None: as long as it takes) for room; False
        when the wait ran out (nothing is then held)."""
        if n > self.capacity:
            raise ValueError(f"{n} bytes is more than the whole budget of {self.capacity}")
        if not self._waiters and self.in_use + n <= self.capacity:
            self.in_use += n
            return True
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await future  # granted: in_use already counts n
            return True
        except BaseException as e:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as the wait ended
            else:
                with contextlib.suppress(ValueError):  # _grant may have dropped it already
                    self._waiters.remove(entry)
                self._grant()  # the waiters behind this one may fit now
            if isinstance(e, TimeoutError):
                return False
            raise

    def release(self, n: int) -> None:
        self.in_use -= n
        self._grant()

    @contextlib.asynccontextmanager
    async def hold(self, n: int):
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _grant(self) -> None:
        while self._waiters:
            n, future = self._waiters[0]
            if future.done():  # a wait that has just ended (timed out, cancelled) and not yet left the line
                self._waiters.popleft()
                continue
            if self.in_use + n > self.capacity:
                return
            self._waiters.popleft()
            self.in_use += n
            future.set_result(None)


# How long a body waits for room in the body budget before its request is refused (503 memory-busy). While
# it waits its body is not read: the client's sends block on TCP flow control, costing neither side memory
# or CPU. Longer waits would only move the wait from the client's retry into the server's queue.
BODY_ROOM_WAIT_S = 5.0


class Reservation:
    """One request's share of the body budget: grows as its body arrives, released once it is decoded."""

    def __init__(self, budget: ByteBudget | None, wait_s: float = BODY_ROOM_WAIT_S):
        self.budget = budget
        self.wait_s = wait_s
        self.held = 0

    async def grow_to(self, total: int) -> bool:
        """Hold ``total`` bytes in all, waiting up to ``wait_s`` for room (False: none came; no more is held).
        Raises ValueError when ``total`` is more than the whole budget."""
        if self.budget is None or total <= self.held:
            return True
        if not await self.budget.acquire(total - self.held, self.wait_s):
            return False
        self.held = total
        return True

    def release(self) -> None:
        if self.budget is not None and self.held:
            self.budget.release(self.held)
        self.held = 0


class MemoryDoesNotFit(RuntimeError):
    """The worst case the settings allow is more than the cgroup's memory limit."""

    def __init__(self, worst: "WorstCase", limit: int, source: str):
        self.worst, self.limit = worst, limit
        super().__init__(
            f"the settings allow up to {worst.describe()}, more than the memory limit of {limit / MIB:,.0f} MiB "
            f"({source}). Lower ALEXNET_BODY_MEMORY_BYTES, ALEXNET_DECODE_MEMORY_BYTES, ALEXNET_QUEUE_SIZE × "
            "ALEXNET_MAX_FILES or ALEXNET_MAX_BATCH, turn hot reload off (ALEXNET_RELOAD_INTERVAL_S=0), "
            "or raise the container's memory limit"
        )


@dataclass(frozen=True)
class WorstCase:
    """The most memory the settings let the process use, by part (bytes)."""

    ready: int  # resident once the model is loaded and a full batch has run
    reload: int  # a second model while a hot reload loads it
    explain: int  # the net /explain builds on first use, and the explanations in flight
    bodies: int
    joining: int  # a body being joined into one block (the inference protocol's), while its chunks live
    decodes: int
    decoded_images: int
    slack: int

    @property
    def total(self) -> int:
        return sum(
            (self.ready, self.reload, self.explain, self.bodies, self.joining, self.decodes, self.decoded_images)
        ) + self.slack

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {value / MIB:,.0f}"
            for name, value in (
                ("ready", self.ready),
                ("reload", self.reload),
                ("explain", self.explain),
                ("bodies", self.bodies),
                ("joining", self.joining),
                ("decodes", self.decodes),
                ("decoded images", self.decoded_images),
                ("allocator slack", self.slack),
            )
        )
        return f"{self.total / MIB:,.0f} MiB ({parts} MiB)"


def worst_case(settings, *, ready_bytes: int, model_load: "ModelLoadCost", decoded_image_bytes: int) -> WorstCase:
    """``ready_bytes``: measured resident size once ready; ``model_load``: what loading the model cost
    (a reload costs it again while the old model still serves; /explain's net stays as resident as the
    first one); ``decoded_image_bytes``: one decoded uint8 image."""
    reload = model_load.peak if settings.reload_interval_s > 0 else 0
    explain = model_load.resident + settings.explain_concurrency * EXPLANATION_BYTES
    decoded_images = settings.queue_size * settings.max_files * decoded_image_bytes
    counted = ready_bytes + reload + explain + settings.body_memory_bytes + settings.max_body_bytes
    counted += settings.decode_memory_bytes + decoded_images
    return WorstCase(
        ready=ready_bytes,
        reload=reload,
        explain=explain,
        bodies=settings.body_memory_bytes,
        joining=settings.max_body_bytes,
        decodes=settings.decode_memory_bytes,
        decoded_images=decoded_images,
        slack=int(counted * ALLOCATOR_SLACK_FRACTION) + ALLOCATOR_SLACK_BYTES,
    )


def fit_report(worst: WorstCase, limit: int, source: str) -> tuple[int, str]:
    """(log level, message) for a worst case that fits ``limit``: info with MIN_HEADROOM or more to spare,
    else a warning that says what to do."""
    spare = 1 - worst.total / limit
    message = (
        f"memory: worst case {worst.describe()} fits the limit of {limit / MIB:,.0f} MiB ({source}), "
        f"{spare:.0%} to spare"
    )
    if spare >= MIN_HEADROOM:
        return logging.INFO, message
    return logging.WARNING, (
        f"{message}: less than {MIN_HEADROOM:.0%}. The ready size moves by ~100 MiB between starts, so these "
        "settings may not fit the next time: raise the memory limit, or lower ALEXNET_DECODE_MEMORY_BYTES or "
        "ALEXNET_BODY_MEMORY_BYTES (docs/serving.md, 'Memory')"
    )


@dataclass(frozen=True)
class ModelLoadCost:
    """Measured around the first load: the most it added at once, and what stays resident."""

    peak: int
    resident: int


class MeasureLoad:
    """``with MeasureLoad() as cost: load()`` → ``cost.result``: the peak from the kernel's high-water mark
    (reset first through /proc/self/clear_refs), falling back to the resident growth twice over where the
    mark cannot be reset (the load then holds the checkpoint's tensors and their laid-out copy at once)."""

    def __enter__(self) -> MeasureLoad:
        self.before = resident_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc) -> None:
        resident = max(0, resident_bytes() - self.before)
        peak = max(0, _status_bytes("VmHWM") - self.before) if self.resettable else 2 * resident
        self.result = ModelLoadCost(peak=max(peak, resident), resident=resident)


def cgroup_memory_limit(proc_self_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")):
    """(limit in bytes, the file it came from) of this process's memory cgroup, or (None, reason).

    cgroup v2: ``memory.max`` of the group in /proc/self/cgroup's ``0::`` line; v1: ``memory.limit_in_bytes``
    of its ``memory`` line. Inside a container the group's own directory is usually mounted as the root, so
    both the path and the root are tried, and every ancestor's limit counts (the smallest wins)."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError as e:
        return None, f"cannot read {proc_self_cgroup}: {e}"
    candidates: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():
            candidates += [d / "memory.max" for d in _ancestors(root, path)]
        elif "memory" in controllers.split(","):
            candidates += [d / "memory.limit_in_bytes" for d in _ancestors(root / "memory", path)]
    limits = []
    for file in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < (1 << 62):  # v1 writes "no limit" as a page-rounded 2^63
            limits.append((int(text), str(file)))
    if not limits:
        return None, "no memory limit set on this process's cgroup"
    return min(limits)


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The group's directory and each one above it up to the mount, then the mount itself."""
    parts = [p for p in path.strip("/").split("/") if p]
    out = [mount.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
    return [d for d in out if d.is_dir()] + [mount]


def resident_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    return _status_bytes("VmRSS")


def _status_bytes(key: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0
