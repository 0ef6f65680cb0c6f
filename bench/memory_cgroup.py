"""A memory cgroup for one process tree: create it with a limit, start a process in it, read its peak.

cgroup v2 (``memory.max``, ``memory.peak``, ``memory.events`` oom_kill) where the unified hierarchy has the
memory controller, else v1 (``memory.limit_in_bytes``, ``memory.max_usage_in_bytes``, ``memory.oom_control``
oom_kill). Creating one needs root (or a delegated subtree); ``available()`` says why not otherwise.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _v2_root() -> Path | None:
    controllers = ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return ROOT
    return None


def _v1_root() -> Path | None:
    memory = ROOT / "memory"
    return memory if (memory / "memory.limit_in_bytes").exists() else None


def available() -> str | None:
    """None when a memory cgroup can be made here, else the reason it cannot."""
    root = _v2_root() or _v1_root()
    if root is None:
        return "no memory cgroup controller mounted at /sys/fs/cgroup"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (creating a memory cgroup needs root)"
    return None


class MemoryCgroup:
    """``with MemoryCgroup(limit) as group:`` … ``subprocess.Popen(..., preexec_fn=group.enter)`` … ``group.peak``.

    Swap is limited to nothing as well, so the limit is on memory, not on memory + swap."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit_bytes = limit_bytes
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.v2 = _v2_root() is not None
        root = _v2_root() or _v1_root()
        self.path = root / (name or f"alexnet-{uuid.uuid4().hex[:12]}")

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        if self.v2:
            self._write("memory.max", self.limit_bytes)
            if (self.path / "memory.swap.max").exists():
                self._write("memory.swap.max", 0)
        else:
            self._write("memory.limit_in_bytes", self.limit_bytes)
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                self._write("memory.memsw.limit_in_bytes", self.limit_bytes)
        return self

    def __exit__(self, *exc) -> None:
        for pid in self.pids():  # whatever is left (the caller normally stops its process first)
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                import time

                time.sleep(0.05)

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def enter(self) -> None:
        """Move the calling process into the group: for ``preexec_fn`` (runs in the child before exec)."""
        self._write("cgroup.procs", os.getpid())

    def pids(self) -> list[int]:
        text = (self.path / "cgroup.procs").read_text() if self.path.exists() else ""
        return [int(line) for line in text.split()]

    @property
    def usage(self) -> int:
        return int((self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes")).read_text())

    @property
    def peak(self) -> int | None:
        """Most memory the group has used (v2: ``memory.peak``, kernel 5.19+; None where missing)."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        path = self.path / name
        return int(path.read_text()) if path.exists() else None

    @property
    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer has killed in this group."""
        path = self.path / ("memory.events" if self.v2 else "memory.oom_control")
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def limit_hits(self) -> int:
        """How often usage reached the limit (v1 ``memory.failcnt``, v2 ``max`` events): reclaim happened."""
        if self.v2:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "max":
                    return int(value)
            return 0
        return int((self.path / "memory.failcnt").read_text())


def own_group_peak() -> dict | None:
    """The peak, limit and OOM kills of the memory cgroup this process is in, when that group has a limit
    (e.g. inside a container); None otherwise. Includes everything in the group (this process too)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and _v2_root():
            names = ("memory.max", "memory.peak", "memory.events")
            candidates = [ROOT / path.lstrip("/"), ROOT]
        elif "memory" in controllers.split(",") and _v1_root():
            names = ("memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control")
            candidates = [ROOT / "memory" / path.lstrip("/"), ROOT / "memory"]
        else:
            continue
        for directory in candidates:
            limit_file, peak_file, events_file = (directory / n for n in names)
            if not limit_file.exists():
                continue
            text = limit_file.read_text().strip()
            if text == "max" or int(text) >= 1 << 62:
                continue
            oom = 0
            for event in events_file.read_text().splitlines() if events_file.exists() else []:
                key, _, value = event.partition(" ")
                oom = int(value) if key == "oom_kill" else oom
            peak = int(peak_file.read_text()) if peak_file.exists() else None
            return {"path": str(directory), "limit": int(text), "peak": peak, "oom_kills": oom}
    return None
