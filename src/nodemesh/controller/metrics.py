"""Fleet metrics in the controller: agents' interval reports merged into rolling windows.

Theory of operation
-------------------
Each agent reports, every interval, per label set a request count and that interval's HDR
latency histogram (V2 encoding), plus TCP counter deltas; each report carries the agent's
identity and a sequence number (docs/observability.md, "Controller metrics API").

- **Nothing counted twice.**  ``ingest`` remembers, per agent, a high-water mark below which
  every seq was seen, plus the few seqs seen above it.  An agent delivers its backlog in order,
  so the set stays tiny; past ``MAX_SEEN`` entries the mark moves up to the oldest of them (a
  seq below it that never came is one the agent dropped and counted itself).
- **Exact percentiles.**  Histograms are kept as received (compressed, a few hundred bytes)
  in 10 s slots and merged at query time; merging HDR histograms loses nothing, so a fleet
  percentile is the percentile of one histogram fed every request, to 3 significant digits.
  Keeping the encodings rather than decoded arrays (140 KB each) is what bounds memory.
- **Bounded memory.**  Slots older than ``RETENTION_S`` go; series beyond
  ``MAX_SERIES_PER_REPORT`` in one report, and stored histograms beyond ``MAX_ENTRIES`` in
  all, are dropped and counted in ``overflow``, never an error for the agent.

All of it is synchronous and takes ``now`` from the caller, so tests drive time directly.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from nodemesh.identity import spiffe
from nodemesh.telemetry.metrics import (
    DEFAULT_ROUTE,
    DIGITS,
    HIGHEST_US,
    LOWEST_US,
    new_histogram,
)

SLOT_S = 10  # seconds per slot; the agents' default interval
RETENTION_S = 3600 + SLOT_S  # one full hour of windows, plus the slot being filled
MAX_WINDOW_S = 3600
MAX_SERIES_PER_REPORT = 500
MAX_ENTRIES = 500_000  # stored histograms over all slots: ~200 MB at a few hundred bytes each
MAX_SEEN = 256  # seqs remembered above an agent's high-water mark
MAX_HDR_CHARS = 64 * 1024  # one series' encoding; a full 3-digit histogram compresses far below
DIRECTIONS = ("inbound", "outbound")
STATUSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")
FAILED = ("5xx", "error")
GROUPS = ("service", "route", "edge", "edge_route", "host")
_LABEL = re.compile(r"[\x20-\x7e]{0,256}")  # printable, bounded: labels end up in terminals
_WINDOW = re.compile(r"^(\d+)(s|m|h)$")
_UNIT = {"s": 1, "m": 60, "h": 3600}

# direction, service, peer, status, route, endpoint (outbound: the node that served; else "")
Labels = tuple[str, str, str, str, str, str]


class BadReport(ValueError):
    """A report or query is malformed; the message names the field (an API 400)."""


@dataclass(frozen=True)
class SeriesReport:
    labels: Labels
    count: int
    hdr: bytes  # the V2 encoding, base64, as the agent sent it


@dataclass(frozen=True)
class TcpReport:
    direction: str
    service: str
    opened: int
    closed: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Report:
    agent: str
    host: str
    seq: int
    start: float
    end: float
    series: tuple[SeriesReport, ...]
    tcp: tuple[TcpReport, ...]
    dropped: int


# --- parsing ---------------------------------------------------------------------------------


def parse_report(doc: Any) -> Report:
    """Validate a decoded JSON report; ``BadReport`` names the first bad field."""
    if not isinstance(doc, dict):
        raise BadReport("the report must be a JSON object")
    agent = doc.get("agent")
    ident = spiffe.parse(agent) if isinstance(agent, str) else None
    if ident is None or ident.kind != "node":
        raise BadReport(f"agent = {agent!r} is not a node identity spiffe://<td>/dc/<dc>/node/<n>")
    seq = _int(doc, "seq", "seq")
    start, end = _time(doc, "start"), _time(doc, "end")
    if end < start:
        raise BadReport(f"end = {end} is before start = {start}")
    raw_series = doc.get("series")
    if not isinstance(raw_series, list):
        raise BadReport("series must be a list")
    series = tuple(_series(s, f"series[{i}]") for i, s in enumerate(raw_series))
    raw_tcp = doc.get("tcp", [])
    if not isinstance(raw_tcp, list):
        raise BadReport("tcp must be a list")
    tcp = tuple(_tcp(t, f"tcp[{i}]") for i, t in enumerate(raw_tcp))
    dropped = _int(doc, "dropped", "dropped") if "dropped" in doc else 0
    return Report(str(agent), ident.name, seq, start, end, series, tcp, dropped)


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**63:
        raise BadReport(f"{where} = {v!r} is not a non-negative integer")
    return v


def _time(obj: dict[str, Any], key: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e11:
        raise BadReport(f"{key} = {v!r} is not a Unix time in seconds")
    return float(v)


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key, "")
    if not isinstance(v, str) or not _LABEL.fullmatch(v):
        raise BadReport(f"{where} = {v!r} is not a printable string of at most 256 characters")
    return v


def _series(s: Any, where: str) -> SeriesReport:
    if not isinstance(s, dict) or not isinstance(s.get("labels"), dict):
        raise BadReport(f"{where} must be an object with a labels object")
    lab = s["labels"]
    direction = lab.get("direction")
    if direction not in DIRECTIONS:
        raise BadReport(f"{where}.labels.direction = {direction!r} is not inbound or outbound")
    status = lab.get("status")
    if status not in STATUSES:
        raise BadReport(f"{where}.labels.status = {status!r} is not one of {', '.join(STATUSES)}")
    service = _str(lab, "service", f"{where}.labels.service")
    if not service:
        raise BadReport(f"{where}.labels.service is empty")
    peer = _str(lab, "peer", f"{where}.labels.peer")
    route = _str(lab, "route", f"{where}.labels.route") or DEFAULT_ROUTE
    endpoint = _str(lab, "endpoint", f"{where}.labels.endpoint")
    count = _int(s, "count", f"{where}.count")
    hdr = s.get("hdr")
    if not isinstance(hdr, str) or not 0 < len(hdr) <= MAX_HDR_CHARS:
        raise BadReport(f"{where}.hdr is not a base64 HdrHistogram V2 encoding")
    h = decode(hdr.encode("ascii", "replace"))
    if h is None:
        raise BadReport(f"{where}.hdr is not a base64 HdrHistogram V2 encoding of 1 µs..60 s")
    if h.get_total_count() != count:
        raise BadReport(
            f"{where}.count = {count} but its histogram holds {h.get_total_count()} values"
        )
    labels = (direction, service, peer, status, route, endpoint)
    return SeriesReport(labels, count, hdr.encode("ascii"))


def _tcp(t: Any, where: str) -> TcpReport:
    if not isinstance(t, dict):
        raise BadReport(f"{where} must be an object")
    direction = t.get("direction")
    if not isinstance(direction, str) or direction not in (*DIRECTIONS, "egress"):
        raise BadReport(f"{where}.direction = {direction!r} is not inbound, outbound or egress")
    return TcpReport(
        direction,
        _str(t, "service", f"{where}.service"),
        *(_int(t, k, f"{where}.{k}") for k in ("opened", "closed", "bytes_in", "bytes_out")),
    )


def decode(hdr: bytes) -> HdrHistogram | None:
    """A histogram of nodemesh's own shape, or None (garbage, or another range or precision:
    merging those would be inexact or raise)."""
    try:
        base64.b64decode(hdr, validate=True)
        h: HdrHistogram = HdrHistogram.decode(hdr)
    except Exception:  # binascii, zlib and hdrh's own errors: all mean "not an encoding"
        return None
    if (
        h.lowest_trackable_value != LOWEST_US
        or h.highest_trackable_value != HIGHEST_US
        or h.significant_figures != DIGITS
    ):
        return None
    return h


def parse_window(text: str) -> int:
    """``"1m"`` → 60 seconds, rounded up to whole slots, at most one hour."""
    m = _WINDOW.match(text)
    if m is None or int(m[1]) == 0:
        raise BadReport(f'window = "{text}" is not a duration like "1m", "10m" or "1h"')
    seconds = int(m[1]) * _UNIT[m[2]]
    if seconds > MAX_WINDOW_S:
        raise BadReport(f'window = "{text}" is longer than the 1h the controller keeps')
    return math.ceil(seconds / SLOT_S) * SLOT_S


# --- the aggregation -------------------------------------------------------------------------


@dataclass
class _Seen:
    """Which seqs of one agent were accepted: all up to ``mark``, plus ``above``."""

    mark: int = -1
    above: set[int] = field(default_factory=set)

    def add(self, seq: int) -> bool:
        """Remember ``seq``; False if it was seen before."""
        if seq <= self.mark or seq in self.above:
            return False
        self.above.add(seq)
        while self.mark + 1 in self.above:
            self.mark += 1
            self.above.discard(self.mark)
        if len(self.above) > MAX_SEEN:
            # A gap that never fills is a report the agent dropped (and counted) itself.
            self.mark = min(self.above)
            self.above = {s for s in self.above if s > self.mark}
            while self.mark + 1 in self.above:
                self.mark += 1
                self.above.discard(self.mark)
        return True


@dataclass
class _Cell:
    count: int = 0
    hdrs: list[bytes] = field(default_factory=list)


@dataclass
class _Slot:
    series: dict[tuple[str, Labels], _Cell] = field(default_factory=dict)
    tcp: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)  # host, dir, svc


@dataclass
class Overflow:
    series: int = 0  # series dropped by the caps
    late_reports: int = 0  # reports for slots already gone
    reports_dropped_by_agents: int = 0  # the agents' own backlog drops, as they reported them


@dataclass(frozen=True)
class Ingested:
    duplicate: bool
    late: bool = False


class FleetMetrics:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._slots: dict[int, _Slot] = {}
        self._agent_dropped: dict[str, int] = {}
        self._entries = 0
        self.overflow = Overflow()

    def __repr__(self) -> str:
        n_agents, n_slots = len(self._seen), len(self._slots)
        return f"<FleetMetrics agents={n_agents} slots={n_slots} entries={self._entries}>"

    def ingest(self, report: Report, now: float) -> Ingested:
        seen = self._seen.setdefault(report.agent, _Seen())
        if not seen.add(report.seq):
            return Ingested(duplicate=True)
        self._agent_dropped[report.agent] = max(
            self._agent_dropped.get(report.agent, 0), report.dropped
        )
        self.overflow.reports_dropped_by_agents = sum(self._agent_dropped.values())
        self._prune(now)
        index = slot_of(report.end)
        if index < slot_of(now) - RETENTION_S // SLOT_S + 1:
            self.overflow.late_reports += 1
            return Ingested(duplicate=False, late=True)
        slot = self._slots.setdefault(index, _Slot())
        for i, s in enumerate(report.series):
            if i >= MAX_SERIES_PER_REPORT or self._entries >= MAX_ENTRIES:
                self.overflow.series += 1
                continue
            cell = slot.series.setdefault((report.host, s.labels), _Cell())
            cell.count += s.count
            cell.hdrs.append(s.hdr)
            self._entries += 1
        for t in report.tcp:
            sums = slot.tcp.setdefault((report.host, t.direction, t.service), [0, 0, 0, 0])
            for k, v in enumerate((t.opened, t.closed, t.bytes_in, t.bytes_out)):
                sums[k] += v
        return Ingested(duplicate=False)

    def _prune(self, now: float) -> None:
        oldest = slot_of(now) - RETENTION_S // SLOT_S + 1
        for index in [i for i in self._slots if i < oldest]:
            gone = self._slots.pop(index)
            self._entries -= sum(len(c.hdrs) for c in gone.series.values())

    def query(
        self, now: float, window_s: int, by: str, direction: str = "inbound"
    ) -> dict[str, Any]:
        """Rows for the last ``window_s`` seconds grouped ``by``, as the API answers them."""
        if by not in GROUPS:
            raise BadReport(f"by = {by!r} is not one of {', '.join(GROUPS)}")
        if direction not in DIRECTIONS:
            raise BadReport(f"direction = {direction!r} is not inbound or outbound")
        self._prune(now)
        # The newest slot that has ended: the one holding ``now`` has no intervals yet, and
        # counting it would understate the rate.
        newest = math.floor(now / SLOT_S) - 1
        n = max(1, math.ceil(window_s / SLOT_S))
        slots = [self._slots[i] for i in range(newest - n + 1, newest + 1) if i in self._slots]
        rows: dict[tuple[str, ...], _Row] = {}
        agents: set[str] = set()
        for slot in slots:
            for (host, labels), cell in slot.series.items():
                agents.add(host)
                if labels[0] != direction:
                    continue
                key = _key(by, host, labels)
                row = rows.setdefault(key, _Row())
                row.add(host, labels[3], cell)
            if by in ("service", "host"):
                for (host, tdir, service), sums in slot.tcp.items():
                    agents.add(host)
                    if tdir != direction:
                        continue
                    row = rows.setdefault((service,) if by == "service" else (host,), _Row())
                    row.hosts.add(host)
                    row.tcp = [a + b for a, b in zip(row.tcp, sums, strict=True)]
        out = [r.as_json(by, k, n * SLOT_S) for k, r in rows.items()]
        out.sort(key=lambda r: (-r["requests"], r["name"]))
        return {
            "window_s": n * SLOT_S,
            "by": by,
            "direction": direction,
            "start": float((newest - n + 1) * SLOT_S),
            "end": float((newest + 1) * SLOT_S),
            "agents": len(agents),
            "rows": out,
            "overflow": {
                "series": self.overflow.series,
                "late_reports": self.overflow.late_reports,
                "reports_dropped_by_agents": self.overflow.reports_dropped_by_agents,
            },
        }


def slot_of(t: float) -> int:
    """Slot k holds the intervals ending in (10k, 10k+10]: an interval cut exactly at 10k+10
    belongs with the ten seconds before it."""
    return math.ceil(t / SLOT_S) - 1


_KEY_NAMES = {
    "service": ("service",),
    "route": ("service", "route"),
    "edge": ("src", "dst"),
    "edge_route": ("src", "dst", "route"),
    "host": ("host",),
}


def _key(by: str, host: str, labels: Labels) -> tuple[str, ...]:
    _, service, peer, _, route, endpoint = labels
    if by == "service":
        return (service,)
    if by == "route":
        return (service, route)
    if by == "edge":
        return (peer, service)
    if by == "edge_route":
        return (peer, service, route)
    # The host that served: the reporting agent's own for inbound, the endpoint for outbound.
    return (endpoint or host,)


@dataclass
class _Row:
    hosts: set[str] = field(default_factory=set)
    requests: int = 0
    failures: int = 0
    latency: HdrHistogram = field(default_factory=new_histogram)
    tcp: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    def add(self, host: str, status: str, cell: _Cell) -> None:
        self.hosts.add(host)
        self.requests += cell.count
        if status in FAILED:
            self.failures += cell.count
        for hdr in cell.hdrs:
            self.latency.decode_and_add(hdr)  # validated at ingest, same shape as ours

    def as_json(self, by: str, key: tuple[str, ...], window_s: int) -> dict[str, Any]:
        h = self.latency
        has = h.get_total_count() > 0
        successes = self.requests - self.failures
        return {
            "key": dict(zip(_KEY_NAMES[by], key, strict=True)),
            "name": _name(by, key),
            "hosts": len(self.hosts),
            "requests": self.requests,
            "successes": successes,
            "success_rate": successes / self.requests if self.requests else None,
            "rps": self.requests / window_s,
            "latency_us": {
                name: (int(h.get_value_at_percentile(p)) if has else None)
                for name, p in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))
            }
            | {
                "min": int(h.get_min_value()) if has else None,
                "max": int(h.get_max_value()) if has else None,
            },
            "tcp": (
                dict(zip(("opened", "closed", "bytes_in", "bytes_out"), self.tcp, strict=True))
                if by in ("service", "host")
                else {}
            ),
        }


def _name(by: str, key: tuple[str, ...]) -> str:
    if by == "edge":
        return " -> ".join(key)
    if by == "edge_route":
        return f"{key[0]} -> {key[1]} {key[2]}"
    return " ".join(key)


def merged(hdrs: Iterable[bytes]) -> HdrHistogram:
    """One histogram holding every value of ``hdrs`` (for tests and tools)."""
    h = new_histogram()
    for hdr in hdrs:
        h.decode_and_add(hdr)
    return h
