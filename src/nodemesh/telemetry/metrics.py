"""Per-agent request and connection metrics: counters plus exact HDR latency histograms.

Theory of operation
-------------------
A ``Recorder`` holds one ``Series`` per label set (direction, service, peer, route, endpoint
host, status class).  Label sets are bounded: services and hosts come from the Consul catalog,
routes from each service's route table (``routes.py``; a path no route matches is
``[default]``, so a flood of unique paths adds nothing), status classes are six, and past
``MAX_SERIES`` new label sets collapse into an ``overflow`` series, counted.

Histograms keep microseconds from 1 µs to 60 s at 3 significant digits, so any percentile is
exact to 0.1 %, and their standard V2 encoding merges exactly across agents (``nodemesh stat``).

Recording a request does not touch an HdrHistogram: hdrh's ``record_value`` is pure Python
and cost 1.3 µs of the 1.8 µs a request took (bench/recording.py, docs/benchmarks.md).
Instead ``request`` does a dict lookup for the series, one addition to its count, computes
the histogram's counts index of the clamped latency in two integer operations, and adds one
to that index in the series' sparse ``interval_counts`` dict (index -> count).  That index
is hdrh's own ``_counts_index_for``: for a histogram whose ``unit_magnitude`` is 0 it is
``b = (v | sub_bucket_mask).bit_length() - (sub_bucket_half_count_magnitude + 1)`` and
``(b << sub_bucket_half_count_magnitude) + (v >> b)``.  The constants are read from a
histogram at import, and the import fails if hdrh lays the counts out differently.

``cut`` (every reporting interval) *folds* each active series' sparse counts into a fresh
HdrHistogram: the counts go into hdrh's counts array and ``set_internal_tacking_values``
(hdrh's own decode path) sets total, min and max from the lowest and highest index.  hdrh
reports min and max only as bucket bounds (``get_min_value``, ``get_max_value``) and encodes
counts only up to the max's bucket, so the folded histogram encodes to the same bytes and
gives the same count, min, max, mean and percentiles as one fed by ``record_value``
(tests/unit/test_recording_index.py checks that).  The interval is then added into the
series' past: bucket by bucket while it touched fewer than ``ADD_SPARSE_BELOW`` buckets,
else with hdrh's add, which walks all 17,408 counters in C.  The fold costs ~40 ns per
distinct bucket on top of the fresh histogram every cut always needed; bench/recording.py
reports the whole cut per request, for quiet and busy series.  A dict rather than a full
counts array per series: a quiet series touches a handful of the 17,408 buckets, and agents
hold thousands of series.  (A busy series with latencies spread over five decades can
touch thousands, and its dict then outgrows the 136 KB array until the cut.)

``Series.latency``, the cumulative view for ``/metrics`` and ``/stats.json``, is the past
plus the open interval folded on demand.  Histograms are allocated, not reset: reset
walks every bucket in Python (~0.8 ms), allocation 0.01 to 0.08 ms, and only series that saw
traffic need one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from nodemesh.errors import NodemeshError

LOWEST_US = 1
HIGHEST_US = 60_000_000
DIGITS = 3
MAX_SERIES = 10_000
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
DEFAULT_ROUTE = "[default]"  # a request no route of its service matches


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def _index_constants() -> tuple[int, int, int]:
    """``sub_bucket_mask``, the bucket shift and ``sub_bucket_half_count_magnitude`` of the
    recorder's histograms, checked against the layout ``counts_index`` assumes."""
    h = new_histogram()
    mask, half_mag = h.sub_bucket_mask, h.sub_bucket_half_count_magnitude
    if h.unit_magnitude != 0 or mask != (1 << (half_mag + 1)) - 1:
        raise NodemeshError(
            f"hdrh lays out HdrHistogram({LOWEST_US}, {HIGHEST_US}, {DIGITS}) with "
            f"unit_magnitude={h.unit_magnitude}, sub_bucket_mask={mask}, "
            f"sub_bucket_half_count_magnitude={half_mag}, which telemetry/metrics.py's "
            "counts index does not handle; install hdrhistogram 0.10.8 (the version it was "
            "checked against) or adapt counts_index to the new layout"
        )
    return mask, half_mag + 1, half_mag


_MASK, _SHIFT, _HALF_MAG = _index_constants()
# hdrh's add walks all 17,408 counters (~23 µs); adding a bucket alone costs ~80 ns, so
# below this many buckets a cut adds the interval into the past one bucket at a time.
ADD_SPARSE_BELOW = 256
# Status code -> class for 0..599 (a tuple index is cheaper than arithmetic on the hot path).
_CLASS_OF = tuple("error" if s < 100 else STATUS_CLASSES[s // 100 - 1] for s in range(600))


def clamp_us(seconds: float) -> int:
    """The latency in whole microseconds, clamped to the histograms' range."""
    return min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US)


def counts_index(us: int) -> int:
    """hdrh's counts index of ``us`` (1 <= us <= HIGHEST_US); ``request`` inlines this."""
    b = (us | _MASK).bit_length() - _SHIFT
    return (b << _HALF_MAG) + (us >> b)


def histogram_of(counts: Mapping[int, int]) -> HdrHistogram:
    """A fresh histogram holding sparse ``counts`` (counts index -> count), with the total,
    min and max hdrh would have tracked had the values been recorded one by one."""
    h = new_histogram()
    if counts:
        c = h.counts
        for i, n in counts.items():
            c[i] = n
        h.set_internal_tacking_values(min(counts), max(counts), sum(counts.values()))
    return h


def add_sparse(into: HdrHistogram, counts: Mapping[int, int], of: HdrHistogram) -> None:
    """``into.add(of)`` where ``of`` is ``histogram_of(counts)``, one bucket at a time."""
    c = into.counts
    for i, n in counts.items():
        c[i] += n
    into.total_count += of.total_count
    into.min_value = min(into.min_value, of.min_value)
    into.max_value = max(into.max_value, of.max_value)


@dataclass(slots=True)
class Series:
    direction: str  # "outbound" | "inbound"
    service: str  # the destination service
    peer: str  # outbound: the source identity; inbound: the client identity
    route: str  # the destination service's route the request matched, or "[default]"
    endpoint: str  # outbound: the node that served it; inbound: "" (this node)
    status: str  # "2xx" ... or "error" (no status: cut off or failed before a response)
    count: int = 0
    # Since the last cut: hdrh counts index -> requests (see the module docstring).
    interval_counts: dict[int, int] = field(default_factory=dict)
    past: HdrHistogram = field(default_factory=new_histogram)  # every interval already cut

    @property
    def interval_count(self) -> int:
        """Requests since the last cut."""
        return sum(self.interval_counts.values())

    @property
    def latency(self) -> HdrHistogram:
        """Every latency recorded so far (a new histogram when the interval holds values)."""
        if not self.interval_counts:
            return self.past
        h = histogram_of(self.interval_counts)
        if self.past.total_count:
            h.add(self.past)
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
        # The hot path (bench/recording.py): clamp_us and counts_index inlined, no calls.
        cls = _CLASS_OF[status] if 0 <= status < 600 else "error"
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
        us = int(seconds * 1_000_000)
        if us < LOWEST_US:
            us = LOWEST_US
        elif us > HIGHEST_US:
            us = HIGHEST_US
        b = (us | _MASK).bit_length() - _SHIFT
        i = (b << _HALF_MAG) + (us >> b)
        counts = s.interval_counts
        counts[i] = counts.get(i, 0) + 1

    def cut(self) -> list[Cut]:
        """The interval's count and histogram of every series that saw requests since the last
        cut; those series start a new interval.  Synchronous, so no request falls between the
        read and the reset."""
        out: list[Cut] = []
        for s in self._series.values():
            counts = s.interval_counts
            if counts:
                h = histogram_of(counts)
                out.append(
                    Cut(
                        s.direction,
                        s.service,
                        s.peer,
                        s.route,
                        s.endpoint,
                        s.status,
                        h.total_count,
                        h,
                    )
                )
                if len(counts) < ADD_SPARSE_BELOW:
                    add_sparse(s.past, counts, h)
                else:
                    s.past.add(h)
                s.interval_counts = {}
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
