"""glibc ``malloc``: its settings for a process whose buffer holds received ZeroMQ frames
(:func:`tune_malloc`), and what a process holds through it (:func:`memory_metrics`).

Why the settings: libzmq's I/O thread allocates every received message with ``malloc``, in its own
glibc arena. A replay buffer keeps thousands of those multi-megabyte frames and frees
the oldest as new ones arrive; with glibc's defaults the freed memory is handed back
to the kernel (per-thread heaps unmapped, the main heap trimmed) and faulted in again,
zero-filled, for the next message. One arena, a fixed mmap threshold and no trimming below
``trim_threshold`` avoid that; ``bench/bench_stream.py --no-tune-malloc`` measures the
difference (BENCHMARKS.md, "Streaming"). jemalloc or tcmalloc via ``LD_PRELOAD`` would
do the same, but are not installable with pip; ``mallopt`` is in every glibc.

The settings are process-wide and cannot be undone, so they are applied once, before
the receiver's ZeroMQ context starts its I/O thread (a thread keeps the arena it got
first), and only where ``stream.tune_malloc`` is on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_applied: "MallocSettings | None" = None
_lock = threading.Lock()


@dataclass(frozen=True)
class MallocSettings:
    """``arena_max`` = 1 keeps libzmq's allocations in the main arena, whose freed chunks
    are reused; ``mmap_threshold`` (fixed, so glibc stops adapting it) sends only larger
    blocks to ``mmap``; ``trim_threshold`` is how much free memory at the top of the heap
    is kept rather than returned to the kernel."""

    arena_max: int = 1
    mmap_threshold: int = 32 * 1024 * 1024  # glibc's ceiling for its adaptive threshold
    trim_threshold: int = 1024 * 1024 * 1024


def tune_malloc(settings: MallocSettings = MallocSettings()) -> bool:
    """Apply ``settings`` with ``mallopt`` once per process. Returns whether they are in
    effect (False, logged, where the C library is not glibc)."""
    global _applied
    with _lock:
        if _applied is not None:
            if _applied != settings:
                log.warning("malloc already tuned with %s; ignoring %s", _applied, settings)
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            log.warning("mallopt is not available (not glibc); malloc left at its defaults")
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        for param, value in ((M_ARENA_MAX, settings.arena_max), (M_MMAP_THRESHOLD, settings.mmap_threshold),
                             (M_TRIM_THRESHOLD, settings.trim_threshold)):
            if mallopt(param, value) != 1:
                log.warning("mallopt(%d, %d) failed; malloc left partly at its defaults", param, value)
                return False
        _applied = settings
        log.info("malloc tuned for the replay buffer: %s", settings)
        return True


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33), every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def memory_metrics() -> dict[str, float]:
    """What this process holds, in MiB, for the metrics (``memory/*``): ``rss_mib`` (resident, from
    ``/proc/self/statm``) and, under glibc, ``malloc_held_mib`` (what ``malloc`` has taken from the
    kernel: heaps plus mmapped blocks) and ``malloc_in_use_mib`` (what is allocated now). The gap
    between held and in use is freed memory that ``malloc`` keeps (fragmentation, and the
    ``trim_threshold`` above): RSS that grows while in-use stays flat is the allocator's, not a leak.
    Missing keys are ones this platform cannot tell."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/statm") as f:
            out["memory/rss_mib"] = int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        pass
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        out["memory/malloc_held_mib"] = (info.arena + info.hblkhd) / 2**20
        out["memory/malloc_in_use_mib"] = (info.uordblks + info.hblkhd) / 2**20
    return out
