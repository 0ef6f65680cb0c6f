"""Reuse freed activation memory instead of faulting fresh pages in every forward pass (glibc only).

A forward pass allocates and frees tens of megabytes. Until glibc adapts its thresholds, it returns that
memory to the kernel, and the next pass takes a page fault for every 4 KiB it touches again.
``keep_freed_memory`` sets the thresholds to where glibc's own adaptation would end up at most.
It changes the whole process's allocator, so the process calls it, never a network's constructor.
docs/model-internals.md has the numbers.
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
