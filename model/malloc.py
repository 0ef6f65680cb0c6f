"""Reuse freed activation memory instead of faulting fresh pages in every forward pass (glibc only).

A forward pass allocates and frees tens of megabytes of activations. Until glibc's malloc has adapted its
thresholds (and whenever a free resets them), it serves blocks over 128 KiB with fresh mmaps and hands
freed memory at the top of its heaps back to the kernel, so the next pass touches new pages and takes a
page fault for every 4 KiB of them: tens of thousands of faults per pass, and much less throughput than
with the pages reused (BENCHMARKS.md, under "What CPUInferenceNet changes", has the measurements).
``keep_freed_memory`` sets the thresholds to where glibc's own adaptation would end up at most: blocks up
to 32 MiB come from the heap, and up to 64 MiB of free memory may stay at the top of each heap. Memory
the process keeps is therefore bounded as it is by glibc's own defaults.

It changes the whole process's allocator, so the process decides: whatever runs CPUInferenceNet for speed
calls it once (the service at start-up, training's predict, the benchmarks), never a network's constructor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: 4 MiB × sizeof(long)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's adaptive scheme pairs with its largest mmap threshold


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds; freed memory goes back to the kernel as usual")
    return done
