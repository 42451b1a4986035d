"""The agent's heap trimmer: glibc keeps freed heap below its top until asked to give it back."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import trio

from nodemesh.agent import heap

# A child process: glibc's mmap threshold raised by freeing a 4 MiB buffer (as a tunnel's
# traffic does), then 50 MiB of 256 KiB buffers between small live objects, freed.  RSS stays
# up until malloc_trim hands the free pages back.
CHILD = """
import sys
from nodemesh.agent import heap
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
x = bytearray(4 << 20); del x
big, small = [], []
for _ in range(200):
    big.append(bytearray(256 * 1024)); small.append(bytearray(1024))
del big
before = rss()
heap.find_trim()(0)
print(before, rss())
"""


@pytest.mark.skipif(heap.find_trim() is None, reason="this C library has no malloc_trim")
def test_trim_gives_freed_heap_back() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after >= 30, (before, after)  # MiB


async def test_serve_trims_on_its_interval_off_the_event_loop() -> None:
    calls: list[tuple[int, float]] = []

    def trim(pad: int) -> int:  # in a worker thread: it must ask the loop for the time
        calls.append((pad, trio.from_thread.run_sync(trio.current_time)))
        return 1

    with trio.move_on_after(1.0):  # real time: the autojump clock would leap past the thread
        await heap.serve(0.2, trim=trim)
    assert 3 <= len(calls) <= 5 and {pad for pad, _ in calls} == {0}
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(calls)]
    assert all(g >= 0.2 for g in gaps), gaps
