"""Per-agent request and connection metrics: counters plus exact HDR latency histograms.

Theory of operation
-------------------
A ``Recorder`` holds one ``Series`` per label set (direction, service, peer, route, endpoint
host, status class).
Recording a request is a dict lookup, two integer additions and one ``record_value`` on an
HdrHistogram (about 1 µs); nothing is formatted or logged on the hot path.  Label sets are
bounded: services and hosts come from the Consul catalog, routes from each service's route
table (``routes.py``; a path no route matches is ``[default]``, so a flood of unique paths adds
nothing), status classes are six, and past ``MAX_SERIES`` new label sets collapse into an
``overflow`` series, counted.

Histograms keep microseconds from 1 µs to 60 s at 3 significant digits, so any percentile is
exact to 0.1 %, and their standard V2 encoding merges exactly across agents (``nodemesh stat``).

A request is recorded into the current reporting interval's histogram only; ``cut`` hands
the interval to the reporter, folds it into the series' past (one array addition in C) and
starts a fresh one, so shipping intervals costs the hot path nothing.  ``Series.latency``, the
cumulative view for ``/metrics`` and ``/stats.json``, is the past plus the open interval.  A
fresh histogram is allocated rather than reset: reset walks every bucket in Python (~0.8 ms),
allocation is ~0.1 ms, and only series that saw traffic need one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
DIGITS = 3
MAX_SERIES = 10_000
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
DEFAULT_ROUTE = "[default]"  # a request no route of its service matches


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


@dataclass
class Series:
    direction: str  # "outbound" | "inbound"
    service: str  # the destination service
    peer: str  # outbound: the source identity; inbound: the client identity
    route: str  # the destination service's route the request matched, or "[default]"
    endpoint: str  # outbound: the node that served it; inbound: "" (this node)
    status: str  # "2xx" ... or "error" (no status: cut off or failed before a response)
    count: int = 0
    interval_count: int = 0
    interval: HdrHistogram = field(default_factory=new_histogram)  # since the last cut
    past: HdrHistogram = field(default_factory=new_histogram)  # every interval already cut

    @property
    def latency(self) -> HdrHistogram:
        """Every latency recorded so far (a new histogram when both parts hold values)."""
        if not self.interval_count:
            return self.past
        if not self.past.get_total_count():
            return self.interval
        h = new_histogram()
        h.add(self.past)
        h.add(self.interval)
        return h

    def __repr__(self) -> str:
        return (
            f"<Series {self.direction} {self.service} {self.peer} {self.route} {self.endpoint} "
            f"{self.status} n={self.count}>"
        )


@dataclass
class TcpSeries:
    direction: str  # "outbound" | "inbound" | "egress"
    service: str
    opened: int = 0
    closed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class Cut:
    """One series' requests during one reporting interval."""

    direction: str
    service: str
    peer: str
    route: str
    endpoint: str
    status: str
    count: int
    latency: HdrHistogram


class ByteCount:
    """Bytes one connection carried: ``bytes_in`` from its client side, ``bytes_out`` to it."""

    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<ByteCount in={self.bytes_in} out={self.bytes_out}>"


class Recorder:
    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str, str, str, str], Series] = {}
        self._tcp: dict[tuple[str, str], TcpSeries] = {}
        self.overflowed = 0
        self.reports_dropped = 0  # interval reports the controller will never see (reporter)
        self.started = time.time()

    def __repr__(self) -> str:
        return f"<Recorder series={len(self._series)} tcp={len(self._tcp)}>"

    def request(
        self,
        direction: str,
        service: str,
        peer: str,
        status: int,
        seconds: float,
        route: str = DEFAULT_ROUTE,
        endpoint: str = "",
    ) -> None:
        cls = STATUS_CLASSES[status // 100 - 1] if 100 <= status < 600 else "error"
        key = (direction, service, peer, route, endpoint, cls)
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= MAX_SERIES:
                self.overflowed += 1
                key = (direction, "overflow", "overflow", DEFAULT_ROUTE, "", cls)
                s = self._series.get(key)
            if s is None:
                s = self._series[key] = Series(*key)
        s.count += 1
        s.interval_count += 1
        s.interval.record_value(min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US))

    def cut(self) -> list[Cut]:
        """The interval's count and histogram of every series that saw requests since the last
        cut; those series start a new interval.  Synchronous, so no request falls between the
        read and the reset."""
        out: list[Cut] = []
        for s in self._series.values():
            if s.interval_count:
                out.append(
                    Cut(
                        s.direction,
                        s.service,
                        s.peer,
                        s.route,
                        s.endpoint,
                        s.status,
                        s.interval_count,
                        s.interval,
                    )
                )
                s.past.add(s.interval)
                s.interval_count = 0
                s.interval = new_histogram()
        return out

    def tcp(self, direction: str, service: str) -> TcpSeries:
        key = (direction, service)
        t = self._tcp.get(key)
        if t is None:
            t = self._tcp[key] = TcpSeries(direction, service)
        return t

    @contextmanager
    def connection(
        self, direction: str, service: str, *, flip: bool = False
    ) -> Iterator[ByteCount]:
        """Count one TCP connection for its lifetime.  ``flip``: the counter was filled from the
        server's side (an inbound tunnel splices app-first), so in and out swap."""
        t = self.tcp(direction, service)
        t.opened += 1
        count = ByteCount()
        try:
            yield count
        finally:
            t.closed += 1
            t.bytes_in += count.bytes_out if flip else count.bytes_in
            t.bytes_out += count.bytes_in if flip else count.bytes_out

    def series(self) -> Iterator[Series]:
        return iter(list(self._series.values()))

    def tcp_series(self) -> Iterator[TcpSeries]:
        return iter(list(self._tcp.values()))
