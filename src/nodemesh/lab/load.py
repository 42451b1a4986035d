"""A bounded HTTP load generator for the lab: keep-alive clients, a request rate, exact counts.

    python -m nodemesh.lab.load http://198.18.0.3:8090/ --rate 20 --duration 60
    python -m nodemesh.lab.load http://198.18.0.3:8090/ --count 1000 --concurrency 8

It is an unmodified client, like the sample apps: stdlib ``http.client``, one kept-alive
connection per worker thread, no retries (a failure is counted, never hidden).  The run is
always bounded: ``--count`` and/or ``--duration`` must be given, and SIGTERM or Ctrl-C end it
early after in-flight requests finish.

Pacing: request *i* is due at ``start + i / rate`` (a fixed schedule, not "sleep after each
reply"), so a slow server does not lower the offered rate as long as a worker is free.
Latency is measured from when the request was due, so time spent waiting for a free worker
counts too (no coordinated omission); with ``--rate 0`` it is measured from the send.

Every ``--interval`` the current statistics are written as JSON to ``--stats-file`` (replaced
atomically, so a reader never sees half a file); the final statistics go to stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000  # 60 s: the longest latency recorded exactly; longer ones are clamped
DIGITS = 3


class Stats:
    """Counts and latency histograms, cumulative and for the current window (thread-safe)."""

    def __init__(self, now: float) -> None:
        self._lock = threading.Lock()
        self.start = now
        self.sent = 0
        self.retried = 0  # idempotent requests sent again after a reused connection failed
        self.statuses: Counter[str] = Counter()
        self.total = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
        self.window = HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)
        self.window_start = now
        self.window_count = 0

    def retry(self) -> None:
        with self._lock:
            self.retried += 1

    def record(self, outcome: str, latency_s: float) -> None:
        us = min(max(int(latency_s * 1e6), LOWEST_US), HIGHEST_US)
        with self._lock:
            self.sent += 1
            self.statuses[outcome] += 1
            self.total.record_value(us)
            self.window.record_value(us)
            self.window_count += 1

    def snapshot(self, now: float, reset_window: bool = True) -> dict[str, Any]:
        with self._lock:
            ok = sum(n for k, n in self.statuses.items() if k.isdigit() and int(k) < 500)
            span = max(now - self.window_start, 1e-9)
            # "ok" as in a success rate: any answer below 500 (a 404 is the server's answer).
            snap = {
                "elapsed_s": round(now - self.start, 3),
                "sent": self.sent,
                "ok": ok,
                "failed": self.sent - ok,
                "retried": self.retried,
                "statuses": dict(sorted(self.statuses.items())),
                "latency_ms": _percentiles(self.total),
                "window": {
                    "seconds": round(span, 3),
                    "rps": round(self.window_count / span, 2),
                    "latency_ms": _percentiles(self.window),
                },
            }
            if reset_window:
                self.window.reset()
                self.window_count = 0
                self.window_start = now
            return snap


def _percentiles(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {}
    return {
        "p50": h.get_value_at_percentile(50) / 1000,
        "p90": h.get_value_at_percentile(90) / 1000,
        "p99": h.get_value_at_percentile(99) / 1000,
        "max": h.get_max_value() / 1000,
    }


class Schedule:
    """Hands out request tickets: at most ``count``, none after ``end``, each with its due time."""

    def __init__(self, start: float, rate: float, count: int | None, end: float) -> None:
        self._lock = threading.Lock()
        self.start, self.rate, self.count, self.end = start, rate, count, end
        self.issued = 0
        self.stopped = threading.Event()

    def next(self, now: float) -> float | None:
        """The due time of the next request, or None when the run is over."""
        with self._lock:
            if self.stopped.is_set() or (self.count is not None and self.issued >= self.count):
                return None
            due = self.start + self.issued / self.rate if self.rate > 0 else now
            if due >= self.end or now >= self.end:
                return None
            self.issued += 1
            return due


IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """The server closed this idle keep-alive connection (readable with nothing pending means
    EOF): do not send on it.  urllib3 and most HTTP client libraries check this before reuse."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _worker(url: str, method: str, timeout: float, sched: Schedule, stats: Stats) -> None:
    """One client connection with keep-alive, behaving as RFC 9112 section 9.3.1 asks of HTTP
    clients: a connection the server closed while idle is not reused, and an idempotent
    request that fails on a *reused* connection before any response byte is sent once more on
    a new connection (counted in ``retried``).  A failure on a fresh connection is a failure."""
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    conn: http.client.HTTPConnection | None = None
    while True:
        due = sched.next(time.monotonic())
        if due is None:
            break
        delay = due - time.monotonic()
        if delay > 0 and sched.stopped.wait(delay):
            break
        start = due if sched.rate > 0 else time.monotonic()
        if conn is not None and _dropped(conn):
            conn.close()
            conn = None
        for attempt in (1, 2):
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            c = conn
            started_response = False
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                started_response = True
                resp.read()
                outcome = str(resp.status)
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                outcome = f"error:{type(e).__name__}"
                c.close()
                conn = None
                if reused and not started_response and method in IDEMPOTENT and attempt == 1:
                    stats.retry()
                    continue
            break
        stats.record(outcome, time.monotonic() - start)
    if conn is not None:
        conn.close()


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def run(
    url: str,
    *,
    count: int | None = None,
    duration: float | None = None,
    rate: float = 0.0,
    concurrency: int = 1,
    timeout: float = 5.0,
    method: str = "GET",
    stats_file: Path | None = None,
    interval: float = 1.0,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run to the bound and return the final statistics (also usable in-process by tests)."""
    if not count and not duration:
        raise ValueError("give --count and/or --duration: the load must be bounded")
    now = time.monotonic()
    end = now + duration if duration else float("inf")
    sched = Schedule(now, rate, count, end)
    if stop is not None:
        sched.stopped = stop
    stats = Stats(now)
    workers = [
        threading.Thread(target=_worker, args=(url, method, timeout, sched, stats), daemon=True)
        for _ in range(max(1, concurrency))
    ]
    for w in workers:
        w.start()
    # Bounded: every worker ends by the count, the duration or the stop event, each request
    # within ``timeout``.
    while alive := [w for w in workers if w.is_alive()]:
        alive[0].join(timeout=interval)
        if stats_file is not None:
            _write_atomic(stats_file, stats.snapshot(time.monotonic()))
    final = stats.snapshot(time.monotonic(), reset_window=False)
    del final["window"]  # the last partial window means nothing once the run is over
    final["done"] = True
    if stats_file is not None:
        _write_atomic(stats_file, final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nodemesh.lab.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("url")
    ap.add_argument("--count", type=int, help="stop after this many requests")
    ap.add_argument("--duration", type=float, help="stop after this many seconds")
    ap.add_argument("--rate", type=float, default=0.0, help="requests per second (0: flat out)")
    ap.add_argument("--concurrency", type=int, default=1, help="worker threads (connections)")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    ap.add_argument("--method", default="GET")
    ap.add_argument("--stats-file", type=Path, help="JSON statistics, rewritten every interval")
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args(argv)
    if not args.count and not args.duration:
        ap.error("give --count and/or --duration: the load must be bounded")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    final = run(
        args.url,
        count=args.count,
        duration=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        timeout=args.timeout,
        method=args.method,
        stats_file=args.stats_file,
        interval=args.interval,
        stop=stop,
    )
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
