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
- **Exact percentiles.**  Merging HDR histograms loses nothing, so a fleet percentile is the
  percentile of one histogram fed every request, to 3 significant digits.  Histograms are
  always kept encoded (a decoded one is 140 KB) and merged one at a time (cells.py).
- **Open slots keep what agents sent.**  A report lands in the 10 s slot of its ``end`` as one
  pending entry per series: its varint counts, checked and inflated once by ``parse_report``.
- **Closed slots are compacted, once.**  ``CLOSE_AFTER_S`` after a slot ended (agents send
  as their interval ends, and bench/ingest.py measures acceptance in tens of milliseconds;
  only a stalled controller or a backlog is later) its pending entries are folded into three
  tables per direction.  Closing soon matters: a query's newest slot is the one that just
  ended, and while it is pending a query merges every series of it (50,000 at 1,000 agents,
  ~1 s) instead of a few thousand cells.  The tables are:
  one cell per edge-route (caller, service, route), per serving host, and per service.  Every
  grouping the API serves is a merge of one of them: route and edge of edge-route cells.
  A report that comes later still lands as pending entries of its slot, counted in every
  answer at once, and the next step folds it into the slot's cells: late is exact, dearer.
- **Five-minute blocks.**  Compacted slots are added, a minute's worth at a time, to their
  block's tables for all five groupings.  A query takes whole blocks where the window covers
  them and slots only at its ragged start, plus what a block does not hold yet (the newest
  slots, pending entries): a 1 h row merges a few dozen cells, not 360 slots' worth.
- **Stepping.**  Compaction is explicit work: ``compact(now, work)`` does about ``work``
  histogram merges (~15 µs each) and returns; the controller calls it between requests
  (daemon.py), the journal's replay after each slot file.  A job builds its tables aside and
  swaps them in at its end, so no answer ever sees half a fold.
- **Bounded memory.**  Slots older than ``RETENTION_S`` go.  Series beyond
  ``MAX_SERIES_PER_REPORT`` in one report, or beyond ``MAX_PENDING`` waiting in all (after
  ingest first folds whatever is due itself), are dropped and counted (``overflow.series``).
  Compacted tables beyond ``MAX_STORED_BYTES`` cost, in this order: the 10 s detail of the
  oldest slots (their block stays, and windows reaching back there narrow to whole blocks:
  the answer's ``start`` and ``window_s`` say so; ``overflow.slots_coarsened``), but never of
  the newest ``FINE_SLOTS``, so 10-minute windows stay whole; then the oldest coarse blocks
  (``overflow.blocks_evicted``); then, only if that was not enough, the newest detail too.
  Measured over a simulated hour with bench/ingest.py's fleet and histograms: 100 agents x
  50 series keep the whole hour at 10 s in 0.47 GB of tables (0.53 GB resident); 1,000
  agents need ~9.8 MB a slot and ~48 MB a block (~4 GB for an hour at 10 s), so the bound
  keeps their newest 13-18 minutes at 10 s and the rest of the hour in blocks, at 1.6 GB
  resident.  Compacting costs them ~3.5 s of CPU a slot (0.35 core): two merges per series.

All of it is synchronous and takes ``now`` from the caller, so tests drive time directly.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import threading
from array import array
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from hdrh.histogram import HdrHistogram

from nodemesh.controller.cells import (
    DERIVED,
    EMPTY,
    Accumulator,
    Item,
    Key,
    KeyRing,
    Table,
    build_table,
    merge_tables,
    v2_counts,
)
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
CLOSE_AFTER_S = 2.0  # seconds a slot stays open after it ended (see the module doc)
# seconds a report's ``end`` may be ahead of the controller's clock (an agent's clock error): one
# further ahead would land in a slot that does not close for as long, holding its pending series
# (and, journalled, coming back after every restart).  Refused, naming the clocks.
MAX_CLOCK_SKEW_S = 60.0
BLOCK_SLOTS = 30  # five minutes: the second tier
GROW_EVERY = 12  # compacted slots added to their block together: each time rewrites it
MAX_PENDING = 300_000  # raw series awaiting compaction; see the module doc for the sizing
MAX_STORED_BYTES = 1_500_000_000  # compacted tables of slots and blocks; see the module doc
FINE_SLOTS = 60  # slots kept at 10 s before old blocks go: a whole 10-minute window
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
    counts: bytes  # its plain varint counts, what merges read (cells.py)


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
    try:
        raw = base64.b64decode(hdr.encode("ascii", "replace"), validate=True)
        counts, total = v2_counts(raw, _scratch())
    except (binascii.Error, ValueError):
        raise BadReport(
            f"{where}.hdr is not a base64 HdrHistogram V2 encoding of 1 µs..60 s"
        ) from None
    if total != count:
        raise BadReport(f"{where}.count = {count} but its histogram holds {total} values")
    labels = (direction, service, peer, status, route, endpoint)
    return SeriesReport(labels, count, hdr.encode("ascii"), counts)


OVERFLOW = "overflow"  # service and peer of an agent's series past its MAX_SERIES


def attribute(report: Report, services: frozenset[str]) -> tuple[Report, list[int], list[int]]:
    """The part of ``report`` its node can be held to, given the service names Consul has
    registered on that node (pure): the kept report and the indices of the series and TCP
    entries kept.

    A report speaks for one node, whose certificate sent it.  Inbound figures are the node's
    own services as served there: ``service`` must be registered on the node, and ``peer`` (the
    caller's verified certificate) an identity of this mesh, or empty (no caller named).
    Outbound figures are the node's calls: ``peer`` (the caller) must be the node itself or
    one of its services; the callee
    and the host that served it are the caller's own view of its calls.  An agent's
    ``overflow`` series (service and peer both ``overflow``) names nobody else.  So no node can
    put figures on a service it does not run or on calls it did not make."""
    node = spiffe.parse(report.agent)  # parse_report made sure it is a node identity
    assert node is not None
    td, dc, me = node.trust_domain, node.datacenter, report.agent
    mine = {spiffe.service_id(td, dc, s).uri for s in services}
    seen: dict[str, bool] = {}

    def ours(uri: str) -> bool:
        v = seen.get(uri)
        if v is None:
            ident = spiffe.parse(uri)
            v = ident is not None and (ident.trust_domain, ident.datacenter) == (td, dc)
            seen[uri] = v
        return v

    def ok(direction: str, service: str, peer: str) -> bool:
        if service == OVERFLOW and peer == OVERFLOW:
            return True
        if direction == "inbound":
            return service in services and (peer == "" or ours(peer))
        return peer == me or peer in mine

    series = [i for i, s in enumerate(report.series) if ok(*s.labels[:3])]
    tcp = [
        i
        for i, t in enumerate(report.tcp)
        if t.direction == "outbound" or t.service in services or t.service == OVERFLOW
    ]
    if len(series) == len(report.series) and len(tcp) == len(report.tcp):
        return report, series, tcp
    kept = replace(
        report,
        series=tuple(report.series[i] for i in series),
        tcp=tuple(report.tcp[i] for i in tcp),
    )
    return kept, series, tcp


_per_thread = threading.local()  # the journal replays in a worker thread while the API parses


def _scratch() -> Accumulator:
    acc: Accumulator | None = getattr(_per_thread, "acc", None)
    if acc is None:
        acc = _per_thread.acc = Accumulator()
    return acc


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


# edge-route key, serving-host key, reporting host id, requests, failures, plain varint counts
_Entry = tuple[Key, Key, int, int, int, bytes]
_SLOT_TABLES = ("edge_route", "host", "service")  # a slot's; blocks have all of GROUPS


@dataclass(eq=False)
class _Tcp:
    """TCP counter deltas as reported, appended: (reporting host, service key, 4 sums)."""

    hosts: array[int] = field(default_factory=lambda: array("I"))
    keys: list[Key] = field(default_factory=list)
    sums: array[int] = field(default_factory=lambda: array("Q"))  # 4 per entry

    def add(self, host: int, key: Key, sums: Iterable[int]) -> None:
        self.hosts.append(host)
        self.keys.append(key)
        self.sums.extend(sums)

    def copy(self) -> _Tcp:
        return _Tcp(array("I", self.hosts), list(self.keys), array("Q", self.sums))

    def extend(self, other: _Tcp) -> None:
        self.hosts.extend(other.hosts)
        self.keys.extend(other.keys)
        self.sums.extend(other.sums)

    def nbytes(self) -> int:
        return 4 * len(self.hosts) + 8 * len(self.keys) + 8 * len(self.sums)


@dataclass(eq=False)
class _Slot:
    pending: list[_Entry] = field(default_factory=list)  # series not yet in ``tables``
    tables: dict[tuple[str, str], Table] = field(default_factory=dict)  # _SLOT_TABLES
    tcp: _Tcp = field(default_factory=_Tcp)
    agents: set[int] = field(default_factory=set)  # hosts with a series kept here
    series: int = 0  # series accepted, pending or compacted
    in_block: bool = False  # ``tables`` are in the block's; later folds go to both

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values()) + self.tcp.nbytes()


@dataclass(eq=False)
class _Block:
    """The tables of its slots marked ``in_block``, in all five groupings, and the TCP counters
    and agents of all its slots."""

    tables: dict[tuple[str, str], Table]  # (grouping, direction)
    tcp: _Tcp
    agents: set[int]
    last: int  # its newest slot with anything in it: a window must reach it to use the block

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.tables.values()) + self.tcp.nbytes()


@dataclass
class Overflow:
    series: int = 0  # series dropped by the caps
    late_reports: int = 0  # reports for slots already gone
    reports_dropped_by_agents: int = 0  # the agents' own backlog drops, as they reported them
    slots_coarsened: int = 0  # slots whose 10 s detail went for memory (their block stays)
    blocks_evicted: int = 0  # five-minute blocks that went for memory before their hour
    unattributed: int = 0  # series and TCP entries refused: labels their node cannot claim


@dataclass(frozen=True)
class Ingested:
    duplicate: bool
    late: bool = False
    ahead: float = 0.0  # > 0: refused, its end is this many seconds past now + MAX_CLOCK_SKEW_S


@dataclass(frozen=True)
class FleetStatistics:
    """What ``FleetMetrics`` holds, for logs, tests and benchmarks."""

    slots: int
    blocks: int
    pending: int  # raw series awaiting compaction
    slot_bytes: int  # compacted tables and TCP counters of slots
    block_bytes: int  # the same of blocks
    keys: int
    compacting: bool

    @property
    def stored_bytes(self) -> int:
        return self.slot_bytes + self.block_bytes


class FleetMetrics:
    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._slots: dict[int, _Slot] = {}
        self._blocks: dict[int, _Block] = {}
        self._agent_dropped: dict[str, int] = {}
        self._keys = KeyRing()
        self._host_ids: dict[str, int] = {}
        self._host_names: list[str] = []
        self._entries = 0  # series in retained slots, pending or compacted
        self._pending = 0
        self._fine_floor = -(2**62)  # slots below it were coarsened: only blocks remain
        self._floor = -(2**62)  # blocks below it were evicted too
        self._now = 0.0  # the latest ``now`` a caller gave
        self._job: Generator[int, None, None] | None = None
        self._acc = Accumulator()  # for queries; a job has its own
        self.overflow = Overflow()
        self.generation = 0  # moves whenever an answer could: a report kept, data dropped

    def __repr__(self) -> str:
        n_agents, n_slots = len(self._seen), len(self._slots)
        return f"<FleetMetrics agents={n_agents} slots={n_slots} entries={self._entries}>"

    def statistics(self) -> FleetStatistics:
        return FleetStatistics(
            slots=len(self._slots),
            blocks=len(self._blocks),
            pending=self._pending,
            slot_bytes=sum(s.nbytes() for s in self._slots.values()),
            block_bytes=sum(b.nbytes() for b in self._blocks.values()),
            keys=len(self._keys),
            compacting=self._job is not None,
        )

    # --- ingest ----------------------------------------------------------------------------

    def ingest(self, report: Report, now: float) -> Ingested:
        if report.end > now + MAX_CLOCK_SKEW_S:  # before its seq counts: the agent may resend
            return Ingested(duplicate=False, ahead=report.end - now)
        seen = self._seen.setdefault(report.agent, _Seen())
        if not seen.add(report.seq):
            return Ingested(duplicate=True)
        self.generation += 1
        self._agent_dropped[report.agent] = max(
            self._agent_dropped.get(report.agent, 0), report.dropped
        )
        self.overflow.reports_dropped_by_agents = sum(self._agent_dropped.values())
        self._prune(now)
        if self._pending + len(report.series) > MAX_PENDING:
            self._make_room(now)  # before the slot is looked up: making room may coarsen
        index = slot_of(report.end)
        if index < self._oldest(now):
            self.overflow.late_reports += 1
            return Ingested(duplicate=False, late=True)
        slot = self._slots.setdefault(index, _Slot())
        host = self._host_id(report.host)
        for i, s in enumerate(report.series):
            if i >= MAX_SERIES_PER_REPORT or self._pending >= MAX_PENDING:
                self.overflow.series += 1
                continue
            direction, service, peer, status, route, endpoint = s.labels
            edge_route = self._keys.get("edge_route", direction, (peer, service, route))
            served = self._keys.get("host", direction, (endpoint or report.host,))
            failed = s.count if status in FAILED else 0
            slot.pending.append((edge_route, served, host, s.count, failed, s.counts))
            slot.series += 1
            slot.agents.add(host)
            self._pending += 1
            self._entries += 1
        for t in report.tcp:
            slot.tcp.add(
                host,
                self._keys.get("service", t.direction, (t.service,)),
                (t.opened, t.closed, t.bytes_in, t.bytes_out),
            )
        block = self._blocks.get(index // BLOCK_SLOTS)
        if block is not None:  # it keeps all its slots' TCP counters and agents
            for k in range(len(slot.tcp.keys) - len(report.tcp), len(slot.tcp.keys)):
                block.tcp.add(host, slot.tcp.keys[k], slot.tcp.sums[4 * k : 4 * k + 4])
            if host in slot.agents:
                block.agents.add(host)
            block.last = max(block.last, index)
        return Ingested(duplicate=False)

    def _host_id(self, name: str) -> int:
        got = self._host_ids.get(name)
        if got is None:
            got = self._host_ids[name] = len(self._host_names)
            self._host_names.append(name)
        return got

    def _oldest(self, now: float) -> int:
        """The oldest slot a report may still land in: an hour back, unless memory made its
        slot go sooner."""
        return max(slot_of(now) - RETENTION_S // SLOT_S + 1, self._fine_floor)

    def _prune(self, now: float) -> None:
        self._now = max(self._now, now)
        oldest = slot_of(now) - RETENTION_S // SLOT_S + 1
        for index in [i for i in self._slots if i < oldest]:
            self._drop_slot(index)
        for j in [j for j in self._blocks if j * BLOCK_SLOTS < oldest]:
            del self._blocks[j]  # no window covers all of it again
            self.generation += 1

    def _drop_slot(self, index: int) -> None:
        self.generation += 1
        gone = self._slots.pop(index)
        self._entries -= gone.series
        self._pending -= len(gone.pending)

    def _make_room(self, now: float) -> None:
        """Fold due slots now, on the caller's time, rather than drop series: the background
        step fell behind (or nobody runs it)."""
        while self._pending + MAX_SERIES_PER_REPORT > MAX_PENDING and self.compact(now, 10_000):
            pass

    # --- compaction ------------------------------------------------------------------------

    def compact(self, now: float, work: int | None = None, through: int | None = None) -> bool:
        """Fold pending series of closed slots into their tables, and those into blocks, for
        about ``work`` histogram merges (all that is due when None); True while more is due.
        ``through``: treat no slot after it as closed (a replay, which knows what comes)."""
        self._prune(now)
        self._evict()  # TCP counters grow between steps too
        done = 0
        while work is None or done < work:
            if self._job is None:
                self._job = self._next_job(now, through)
                if self._job is None:
                    return False
            try:
                done += next(self._job)
            except StopIteration:
                self._job = None
        return True

    def _next_job(self, now: float, through: int | None) -> Generator[int, None, None] | None:
        closed = closed_slot(now)
        if through is not None:
            closed = min(closed, through)
        due = [i for i, s in self._slots.items() if s.pending and i <= closed]
        if due:
            # A block's due slots together: a backlog rewrites the block once, not per slot.
            j = min(due) // BLOCK_SLOTS
            return self._fold(j, {i: self._slots[i] for i in due if i // BLOCK_SLOTS == j})
        ready: dict[int, dict[int, _Slot]] = {}
        for i, s in self._slots.items():
            if s.tables and not s.in_block and i <= closed:
                ready.setdefault(i // BLOCK_SLOTS, {})[i] = s
        for j in sorted(ready):
            if len(ready[j]) >= GROW_EVERY or (j + 1) * BLOCK_SLOTS - 1 <= closed:
                return self._grow(j, ready[j])
        return None

    def _fold(self, j: int, slots: dict[int, _Slot]) -> Generator[int, None, None]:
        """Fold these slots' pending entries into their tables, and into block ``j``'s for
        slots already in it; everything swaps in at the end, together."""
        acc = Accumulator()
        taken = {i: len(s.pending) for i, s in slots.items()}
        new: dict[int, dict[tuple[str, str], Table]] = {}
        to_block: dict[tuple[str, str], list[Item]] = {}
        for i, slot in slots.items():
            new[i] = dict(slot.tables)
            entries = slot.pending[: taken[i]]
            for direction in DIRECTIONS:
                mine = [e for e in entries if e[0].direction == direction]
                if not mine:
                    continue
                items: list[Item] = [(e[0], e[3], e[4], (e[2],), e[5], False) for e in mine]
                er = yield from build_table(items, acc)
                items = [(e[1], e[3], e[4], (e[2],), e[5], False) for e in mine]
                host = yield from build_table(items, acc)
                service = yield from build_table(list(er.items(0)), acc)
                for by, delta in (("edge_route", er), ("host", host), ("service", service)):
                    old = slot.tables.get((by, direction), EMPTY)
                    new[i][by, direction] = yield from merge_tables(old, delta, acc)
                if slot.in_block:
                    to_block.setdefault(("edge_route", direction), []).extend(er.items())
                    to_block.setdefault(("host", direction), []).extend(host.items())
        block = self._blocks.get(j)
        block_tables: dict[tuple[str, str], Table] = {}
        if block is not None and to_block:
            for direction in DIRECTIONS:
                parts = yield from _groupings(to_block, direction, acc)
                for by, part in parts.items():
                    old = block.tables.get((by, direction), EMPTY)
                    block_tables[by, direction] = yield from merge_tables(old, part, acc)
        for i, slot in slots.items():
            if self._slots.get(i) is not slot:
                continue  # pruned or coarsened meanwhile
            slot.tables = new[i]
            del slot.pending[: taken[i]]
            self._pending -= taken[i]
        if block is not None and self._blocks.get(j) is block:
            block.tables.update(block_tables)
        self._evict()

    def _grow(self, j: int, slots: dict[int, _Slot]) -> Generator[int, None, None]:
        """Add these compacted slots to block ``j``, making it if need be."""
        acc = Accumulator()
        block = self._blocks.get(j)
        tables: dict[tuple[str, str], Table] = {}
        for direction in DIRECTIONS:
            for by in _SLOT_TABLES:
                old = EMPTY if block is None else _table(block, by, direction)
                items = list(old.items())
                for s in slots.values():
                    items.extend(s.tables.get((by, direction), EMPTY).items())
                tables[by, direction] = yield from build_table(items, acc)
            # Route and edge anew from the block's edge-route cells: fewer, if wider, inputs
            # than the old cells plus every slot's.
            for k, by in enumerate(DERIVED[1:], start=1):
                items = list(tables["edge_route", direction].items(k))
                tables[by, direction] = yield from build_table(items, acc)
        tables = {name: t for name, t in tables.items() if len(t)}
        if any(self._slots.get(i) is not s for i, s in slots.items()):
            return  # a slot went meanwhile: the next step starts over
        if block is None:
            first = j * BLOCK_SLOTS
            inside = {
                i: self._slots[i] for i in range(first, first + BLOCK_SLOTS) if i in self._slots
            }
            block = self._blocks[j] = _Block(tables, _Tcp(), set(), max(inside))
            for one in inside.values():
                block.agents |= one.agents
                block.tcp.extend(one.tcp)
        elif self._blocks.get(j) is not block:
            return  # pruned meanwhile
        else:
            block.tables = tables
        for s in slots.values():
            s.in_block = True
        self._evict()

    def _evict(self) -> None:
        """Past ``MAX_STORED_BYTES``, in this order: the oldest slots held in a complete
        block lose their 10 s detail (the block stays; windows reaching there narrow to whole
        blocks), but never the newest ``FINE_SLOTS``; then the oldest coarse block goes; then,
        only if that is not enough, the newest slots are coarsened too."""
        stored = self.statistics().stored_bytes
        newest = math.floor(self._now / SLOT_S) - 1
        while stored > MAX_STORED_BYTES:
            j = min(self._slots, default=self._fine_floor) // BLOCK_SLOTS
            last = (j + 1) * BLOCK_SLOTS - 1
            can = self._coarsenable(j, closed_slot(self._now))
            coarse = [k for k in self._blocks if k * BLOCK_SLOTS < self._fine_floor]
            if can and (last <= newest - FINE_SLOTS or not coarse):
                stored -= sum(self._slots[i].nbytes() for i in can)
                for i in can:
                    self._drop_slot(i)
                self.overflow.slots_coarsened += len(can)
                self._fine_floor = last + 1
            elif coarse:
                k = min(coarse)
                stored -= self._blocks.pop(k).nbytes()
                self.generation += 1
                self.overflow.blocks_evicted += 1
                self._floor = (k + 1) * BLOCK_SLOTS
            else:
                return  # nothing may go yet; the pending bound still holds

    def _coarsenable(self, j: int, closed: int) -> list[int]:
        """Block ``j``'s slots, if the block holds all of them and none can change."""
        first, last = j * BLOCK_SLOTS, (j + 1) * BLOCK_SLOTS - 1
        inside = [i for i in range(first, last + 1) if i in self._slots]
        if not inside or j not in self._blocks or last > closed:
            return []
        if any(not self._slots[i].in_block or self._slots[i].pending for i in inside):
            return []
        return inside

    # --- queries ---------------------------------------------------------------------------

    def query(
        self, now: float, window_s: int, by: str, direction: str = "inbound"
    ) -> dict[str, Any]:
        """Rows for the last ``window_s`` seconds grouped ``by``, as the API answers them."""
        return self.plan(now, window_s, by, direction).answer(self._acc)

    def plan(self, now: float, window_s: int, by: str, direction: str = "inbound") -> QueryPlan:
        """What a query reads, taken at once: cheap (references and list copies), so the
        API takes it on the event loop and computes ``answer`` in a worker thread while
        ingest and compaction go on (see ``QueryPlan``)."""
        if by not in GROUPS:
            raise BadReport(f"by = {by!r} is not one of {', '.join(GROUPS)}")
        if direction not in DIRECTIONS:
            raise BadReport(f"direction = {direction!r} is not inbound or outbound")
        self._prune(now)
        # The newest slot that has ended: the one holding ``now`` has no intervals yet, and
        # counting it would understate the rate.
        newest = math.floor(now / SLOT_S) - 1
        first = newest - max(1, math.ceil(window_s / SLOT_S)) + 1
        if first < self._fine_floor:  # only whole blocks are left there
            first = min(-(-max(first, self._floor) // BLOCK_SLOTS) * BLOCK_SLOTS, newest)
        with_tcp = by in ("service", "host")
        pieces = [
            (dict(tables), tcp.copy() if with_tcp else _NO_TCP, list(pending), set(agents))
            for tables, tcp, pending, agents in self._pieces(first, newest)
        ]
        o = self.overflow
        return QueryPlan(
            by,
            direction,
            first,
            newest,
            pieces,
            self._keys,
            self._host_names,
            {
                "series": o.series,
                "late_reports": o.late_reports,
                "reports_dropped_by_agents": o.reports_dropped_by_agents,
                "slots_coarsened": o.slots_coarsened,
                "blocks_evicted": o.blocks_evicted,
                "unattributed": o.unattributed,
            },
        )

    def _pieces(
        self, first: int, last: int
    ) -> Iterator[tuple[dict[tuple[str, str], Table], _Tcp, list[_Entry], set[int]]]:
        """Slots ``first..last``: a whole block where one is made and the window reaches its
        newest slot, with what it does not hold yet (its slots' pending entries, and the
        tables of slots not added to it yet); elsewhere slot by slot."""
        i = first
        while i <= last:
            j, block = i // BLOCK_SLOTS, self._blocks.get(i // BLOCK_SLOTS)
            if block is not None and i == j * BLOCK_SLOTS and block.last <= last:
                inside = [s for k in range(i, i + BLOCK_SLOTS) if (s := self._slots.get(k))]
                pending = [e for s in inside for e in s.pending]
                yield block.tables, block.tcp, pending, block.agents
                for s in inside:
                    if not s.in_block and s.tables:
                        yield s.tables, _NO_TCP, [], _NO_AGENTS
                i += BLOCK_SLOTS
                continue
            slot = self._slots.get(i)
            if slot is not None:
                yield slot.tables, slot.tcp, slot.pending, slot.agents
            i += 1


@dataclass(frozen=True, eq=False)
class QueryPlan:
    """One query's inputs as they were when ``FleetMetrics.plan`` took them.

    ``answer`` is the expensive part (merging every cell and pending series of the window, then
    percentiles: 0.5-1.6 s at 1,000 agents).  It reads only what the plan holds: copies of the
    pieces' mutable parts (table dicts, pending lists, TCP counters, agent sets) and immutable
    ``Table``s, which compaction replaces rather than changes.  The two shared objects are
    safe to read from another thread: host names are only ever appended, and ``KeyRing.get``
    takes a lock to intern.  So a query answers exactly what was accepted before it began, in
    a worker thread, and the event loop keeps accepting reports meanwhile."""

    by: str
    direction: str
    first: int
    newest: int
    pieces: list[tuple[dict[tuple[str, str], Table], _Tcp, list[_Entry], set[int]]]
    keys: KeyRing
    host_names: list[str]
    overflow: dict[str, int]

    def answer(self, acc: Accumulator | None = None) -> dict[str, Any]:
        """The API's answer; ``acc`` defaults to this thread's own scratch accumulator."""
        acc = _scratch() if acc is None else acc
        by, direction = self.by, self.direction
        n = self.newest - self.first + 1
        rows: dict[Key, _Row] = {}
        agents: set[int] = set()
        with_tcp = by in ("service", "host")
        for tables, tcp, pending, series_agents in self.pieces:
            agents |= series_agents
            for key, req, fail, hosts, enc, packed in _items(tables, pending, by, direction):
                row = rows.get(key)
                if row is None:
                    row = rows[key] = _Row()
                row.requests += req
                row.failures += fail
                row.hosts.update(hosts)
                row.encodings.append((enc, packed))
            if with_tcp:
                self._add_tcp(rows, agents, tcp)
        out = [r.as_json(by, k.values, n * SLOT_S, acc) for k, r in rows.items()]
        out.sort(key=lambda r: (-r["requests"], r["name"]))
        return {
            "window_s": n * SLOT_S,
            "by": by,
            "direction": direction,
            "start": float(self.first * SLOT_S),
            "end": float((self.newest + 1) * SLOT_S),
            "agents": len(agents),
            "rows": out,
            "overflow": dict(self.overflow),
        }

    def _add_tcp(self, rows: dict[Key, _Row], agents: set[int], tcp: _Tcp) -> None:
        by, direction = self.by, self.direction
        for n, (host, key) in enumerate(zip(tcp.hosts, tcp.keys, strict=True)):
            agents.add(host)
            if key.direction != direction:
                continue
            if by == "host":
                key = self.keys.get("host", direction, (self.host_names[host],))
            row = rows.get(key)
            if row is None:
                row = rows[key] = _Row()
            row.hosts.add(host)
            for k in range(4):
                row.tcp[k] += tcp.sums[4 * n + k]


_NO_TCP = _Tcp()
_NO_AGENTS: set[int] = set()


def _table(block: _Block, by: str, direction: str) -> Table:
    return block.tables.get((by, direction), EMPTY)


def _groupings(
    finest: dict[tuple[str, str], list[Item]], direction: str, acc: Accumulator
) -> Generator[int, None, dict[str, Table]]:
    """Tables of all five groupings from cells of the two finest, in one direction."""
    out: dict[str, Table] = {}
    for by in ("edge_route", "host"):
        out[by] = yield from build_table(finest.get((by, direction), []), acc)
    for k, coarse in enumerate(DERIVED):
        out[coarse] = yield from build_table(list(out["edge_route"].items(k)), acc)
    return out


def _items(
    tables: dict[tuple[str, str], Table], pending: list[_Entry], by: str, direction: str
) -> Iterator[Item]:
    """One piece's cells and pending entries keyed for ``by``."""
    table = tables.get((by, direction))
    if table is not None:
        yield from table.items()
    elif by in DERIVED and (finest := tables.get(("edge_route", direction))) is not None:
        yield from finest.items(DERIVED.index(by))
    coarse = DERIVED.index(by) if by in DERIVED else -1
    for e in pending:
        if e[0].direction != direction:
            continue
        key = e[0].derived[coarse] if coarse >= 0 else e[0] if by == "edge_route" else e[1]
        yield key, e[3], e[4], (e[2],), e[5], False


def closed_slot(now: float) -> int:
    """The newest slot that ended ``CLOSE_AFTER_S`` or more before ``now``."""
    return math.floor((now - CLOSE_AFTER_S) / SLOT_S) - 1


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


@dataclass(eq=False)
class _Row:
    hosts: set[int] = field(default_factory=set)
    requests: int = 0
    failures: int = 0
    encodings: list[tuple[bytes | memoryview, bool]] = field(default_factory=list)
    tcp: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    def as_json(
        self, by: str, key: tuple[str, ...], window_s: int, acc: Accumulator
    ) -> dict[str, Any]:
        for enc, packed in self.encodings:
            acc.add(enc, packed)  # validated at ingest, same shape as ours
        latency = acc.latency()
        acc.reset()
        successes = self.requests - self.failures
        return {
            "key": dict(zip(_KEY_NAMES[by], key, strict=True)),
            "name": _name(by, key),
            "hosts": len(self.hosts),
            "requests": self.requests,
            "successes": successes,
            "success_rate": successes / self.requests if self.requests else None,
            "rps": self.requests / window_s,
            "latency_us": latency,
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
