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

    @classmethod
    def existing(cls, path: Path, *, v2: bool, limit_bytes: int) -> MemoryCgroup:
        """A group that is already there (not created, not removed): for reading its peak and OOM kills."""
        group = cls.__new__(cls)
        group.path, group.v2, group.limit_bytes = path, v2, limit_bytes
        return group

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
    (e.g. inside a container); None otherwise. Includes everything in the group (this process too). The group
    is found as the service finds it for its start-up check (service.memory.cgroup_memory_limit)."""
    from service.memory import cgroup_memory_limit

    limit, source = cgroup_memory_limit()
    if limit is None:
        return None
    group = MemoryCgroup.existing(Path(source).parent, v2=Path(source).name == "memory.max", limit_bytes=limit)
    return {"path": str(group.path), "limit": limit, "peak": group.peak, "oom_kills": group.oom_kills}
