"""Freed heap goes back to the kernel.

The large buffers of the data path (a tunnel's 256 KiB reads, the TLS records and HTTP/2 frames
made of them) come from glibc's heap once its adaptive mmap threshold has risen past them, and
glibc returns free heap to the kernel only from the heap's top.  So after a bulk transfer the
agent kept memory it no longer used: with 4 MiB HTTP/2 windows, 83-87 MiB RSS with 1,000 idle
connections after the benchmark's bulk, h2c and gRPC workloads, against 73-74 with this trimmer
(docs/benchmarks.md, "Bulk with a 4 MiB window").

``serve`` calls ``malloc_trim(0)`` every ``TRIM_EVERY`` seconds, which hands free pages anywhere
in the heap back (``madvise``).  When nothing is free it costs a few microseconds; after a burst
about 70 us per MiB returned.  It runs in a worker thread, so the event loop goes on meanwhile
(ctypes releases the GIL for the call).  Where the C library has no ``malloc_trim`` (musl) this
is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import trio

from nodemesh import log

TRIM_EVERY = 5.0  # seconds

_log = log.get("nodemesh.agent")


def find_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None without it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


async def serve(
    every: float = TRIM_EVERY,
    *,
    trim: Callable[[int], int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    fn = trim or find_trim()
    task_status.started()
    if fn is None:
        _log.debug("heap_trim_unavailable", why="the C library has no malloc_trim")
        return
    while True:
        await trio.sleep(every)
        await trio.to_thread.run_sync(fn, 0)
