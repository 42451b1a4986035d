"""Compacted cells: merged latency histograms kept encoded, in columnar tables.

Theory of operation
-------------------
The controller merges a great many HDR histograms of one shape (1 µs..60 s, 3 digits).  A
decoded one is a 17,408-counter array (139 KB), so thousands cannot be held at once: what is
kept is always an encoding, and merging means decoding into one array, one input at a time.

- **One accumulator, reused.**  ``Accumulator`` owns a counts array and a scratch array.  An
  input is inflated, its varint counts decoded into the scratch (hdrh's own C decoder, bounds
  checked), added into the counts over only the input's non-zero index range, and the range
  zeroed again.  Measured here: ~10 µs for an agent's histogram (~50 µs for a merged cell,
  wider and inflated first) against ~48 µs for hdrh's ``decode_and_add`` of an agent's, which
  allocates, fills and sums whole arrays.
- **Our own storage encoding.**  A stored cell is the zlib-compressed varint counts (the body
  of the V2 encoding, without its headers, base64 or shape fields: every cell has our shape).
  Agents' encodings are checked and inflated once, at ingest (``v2_counts``), and wait for
  compaction as plain varint counts, so folding them costs a decode, not an inflate too.
- **Exact summaries.**  Percentiles, min and max follow hdrh's own rules
  (``get_value_at_percentile``, ``get_min_value``, ``get_max_value``) over the merged counts,
  with a cumulative sum and a bisection instead of a Python loop over every counter.
- **Tables.**  A ``Table`` holds the cells of one grouping and direction for one stretch of
  time: parallel arrays of requests, failures, the reporting hosts (ids) and the encodings
  concatenated.  About 30 bytes of bookkeeping per cell beside its encoding, where a Python
  object per cell would cost ten times that.  ``build_table`` merges items (cells of other
  tables, or agents' raw histograms) by key; it is a generator that yields the work done so
  far, so the caller can stop between any two inputs and resume later.
- **Keys.**  A ``Key`` is one row identity (a grouping's label values in a direction),
  interned in a ``KeyRing`` of weak references: a key lives while some table or pending entry
  holds it, and vanishes with the last one, so label churn never accumulates.  Edge-route keys
  carry their service, route and edge keys, which is how coarser groupings are derived.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import struct
import threading
import weakref
import zlib
from array import array
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hdrh import codec

from nodemesh.telemetry.metrics import new_histogram

_SHAPE = new_histogram()  # value <-> index arithmetic of our one histogram shape
COUNTS_LEN: int = _SHAPE.counts_len
V2_OFFSET = 40  # bytes of the V2 payload header before its varint counts (hdrh.codec)
_WORD = 8
_MAX_VARINT = COUNTS_LEN * 9  # LEB128 of a 64-bit counter takes at most 9 bytes
ZLIB_LEVEL = 1  # against the default 6: a fifth of the time, 4-8 % more bytes (measured)
ENCODE_WORK = 8  # work units of one encode (~100 µs) next to one input merged (~12 µs)
_CHUNK = 512  # counters summed at a time for percentiles (measured fastest of 128..1024)
PERCENTILES = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p999", 99.9))


class Accumulator:
    """One histogram being summed from encodings; only the touched range is ever reset."""

    __slots__ = ("_buf", "_counts", "_scratch", "hi", "lo", "total")

    def __init__(self) -> None:
        self._counts = (ctypes.c_uint64 * COUNTS_LEN)()
        self._scratch = (ctypes.c_uint64 * COUNTS_LEN)()
        self._buf = (ctypes.c_byte * _MAX_VARINT)()
        self.lo, self.hi, self.total = COUNTS_LEN, -1, 0

    def __repr__(self) -> str:
        return f"<Accumulator total={self.total} range={self.lo}..{self.hi}>"

    def add(self, counts: bytes | memoryview, packed: bool = True) -> None:
        """Add varint counts, zlib-compressed (a stored cell) or not (``packed=False``)."""
        if not counts:
            return
        data = zlib.decompress(counts) if packed else counts
        scratch = ctypes.addressof(self._scratch)
        got = codec.decode(data, 0, scratch, COUNTS_LEN, _WORD)
        if not got["total"]:
            # Zeros may still have been written, and nothing else: the scratch stays clean.
            return
        lo, hi = got["min_nonzero_index"], got["max_nonzero_index"]
        n = hi - lo + 1
        codec.add_array(ctypes.addressof(self._counts) + lo * _WORD, scratch + lo * _WORD, n, _WORD)
        ctypes.memset(scratch + lo * _WORD, 0, n * _WORD)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.total += got["total"]

    def count_varint(self, data: bytes, offset: int = 0) -> int:
        """Values in a varint body, leaving this accumulator as it was; ``ValueError`` for
        counts beyond our shape (hdrh's bounds check)."""
        scratch = ctypes.addressof(self._scratch)
        try:
            got = codec.decode(data, offset, scratch, COUNTS_LEN, _WORD)
        except IndexError:
            ctypes.memset(scratch, 0, COUNTS_LEN * _WORD)  # written up to the overrun
            raise ValueError("counts beyond the histogram's range") from None
        if got["total"]:
            lo, hi = got["min_nonzero_index"], got["max_nonzero_index"]
            ctypes.memset(scratch + lo * _WORD, 0, (hi - lo + 1) * _WORD)
        return int(got["total"])

    def encode(self) -> bytes:
        """The storage encoding of what was added (empty for no values)."""
        if self.total == 0:
            return b""
        # From the first non-zero counter on, behind one zero run: the encoder walks every
        # counter it is given, and the first thousands are all zero for most latencies.
        buf = ctypes.addressof(self._buf)
        start = ctypes.addressof(self._counts) + self.lo * _WORD
        n = codec.encode(start, self.hi - self.lo + 1, _WORD, buf, _MAX_VARINT)
        return zlib.compress(_zero_run(self.lo) + ctypes.string_at(buf, n), ZLIB_LEVEL)

    def reset(self) -> None:
        if self.hi >= 0:
            start = ctypes.addressof(self._counts) + self.lo * _WORD
            ctypes.memset(start, 0, (self.hi - self.lo + 1) * _WORD)
        self.lo, self.hi, self.total = COUNTS_LEN, -1, 0

    def latency(self) -> dict[str, int | None]:
        """p50/p95/p99/p999/min/max in µs exactly as hdrh reports them, None without values."""
        out: dict[str, int | None] = {}
        if self.total == 0:
            return {name: None for name in (*(p for p, _ in PERCENTILES), "min", "max")}
        counts = array("Q")
        start = ctypes.addressof(self._counts) + self.lo * _WORD
        counts.frombytes(ctypes.string_at(start, (self.hi - self.lo + 1) * _WORD))
        # Running sums by chunk, then within the one chunk a target falls in.
        chunks = list(
            itertools.accumulate(sum(counts[i : i + _CHUNK]) for i in range(0, len(counts), _CHUNK))
        )
        for name, p in PERCENTILES:
            # hdrh: the first index whose running count reaches round(p% of total), at least 1
            target = max(int((min(p, 100.0) * self.total / 100) + 0.5), 1)
            c = bisect.bisect_left(chunks, target)
            before = chunks[c - 1] if c else 0
            inner = itertools.accumulate(counts[c * _CHUNK : (c + 1) * _CHUNK], initial=before)
            index = self.lo + c * _CHUNK + bisect.bisect_left(list(inner), target) - 1
            out[name] = int(_SHAPE.get_highest_equivalent_value(_SHAPE.get_value_from_index(index)))
        low = _SHAPE.get_value_from_index(self.lo)
        out["min"] = 0 if self.lo == 0 else int(_SHAPE.get_lowest_equivalent_value(low))
        top = _SHAPE.get_value_from_index(self.hi)
        out["max"] = int(_SHAPE.get_highest_equivalent_value(top)) if top else 0
        return out


def _zero_run(n: int) -> bytes:
    """The varint of ``n`` zero counters: ZigZag of -n, LEB128."""
    if n == 0:
        return b""
    v, out = 2 * n - 1, bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def v2_counts(raw: bytes, acc: Accumulator) -> tuple[bytes, int]:
    """An agent's V2 encoding (base64-decoded) -> (its plain varint counts, values in them);
    ``ValueError`` for anything but a well-formed encoding of our histogram shape.  The same
    checks as ``HdrHistogram.decode`` plus the shape, at a fifth of its cost."""
    if len(raw) < _V2_HEADER.size:
        raise ValueError("too short")
    cookie, length = _V2_HEADER.unpack_from(raw)
    if codec.get_cookie_base(cookie) != codec.V2_COMPRESSION_COOKIE_BASE:
        raise ValueError("not a V2 compressed encoding")
    if length != len(raw) - _V2_HEADER.size:
        raise ValueError("length mismatch")
    payload = raw[_V2_HEADER.size :]
    inflate = zlib.decompressobj()
    try:
        data = inflate.decompress(payload, V2_OFFSET + _MAX_VARINT + 1)
    except zlib.error:
        raise ValueError("not zlib") from None
    if inflate.unconsumed_tail or not V2_OFFSET <= len(data) <= V2_OFFSET + _MAX_VARINT:
        raise ValueError("too long or too short")
    header = codec.PayloadHeader.from_buffer_copy(data)
    if (
        codec.get_cookie_base(header.cookie) != codec.V2_ENCODING_COOKIE_BASE
        or header.lowest_trackable_value != _SHAPE.lowest_trackable_value
        or header.highest_trackable_value != _SHAPE.highest_trackable_value
        or header.significant_figures != _SHAPE.significant_figures
    ):
        raise ValueError("another encoding or histogram shape")
    return data[V2_OFFSET:], acc.count_varint(data, V2_OFFSET)


_V2_HEADER = struct.Struct(">II")  # cookie, compressed length


# --- keys --------------------------------------------------------------------------------------


class Key:
    """One row identity: label values of a grouping, in a direction."""

    __slots__ = ("__weakref__", "derived", "direction", "values")

    def __init__(self, direction: str, values: tuple[str, ...]) -> None:
        self.direction = direction
        self.values = values
        self.derived: tuple[Key, ...] = ()  # edge_route keys: (service, route, edge)

    def __repr__(self) -> str:
        return f"<Key {self.direction} {self.values}>"


class KeyRing:
    """Interned keys per (grouping, direction); each lives only while something holds it."""

    def __init__(self) -> None:
        self._keys: weakref.WeakValueDictionary[tuple[str, str, tuple[str, ...]], Key] = (
            weakref.WeakValueDictionary()
        )
        # Queries run in a worker thread and intern host keys (metrics.QueryPlan): without
        # the lock, two threads missing at once could make two keys for one row.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, by: str, direction: str, values: tuple[str, ...]) -> Key:
        name = (by, direction, values)
        key = self._keys.get(name)
        if key is not None:
            return key
        with self._lock:
            key = self._keys.get(name)
            if key is not None:
                return key
            key = Key(direction, values)
            if by == "edge_route":
                peer, service, route = values
                key.derived = (
                    self.get("service", direction, (service,)),
                    self.get("route", direction, (service, route)),
                    self.get("edge", direction, (peer, service)),
                )
            self._keys[name] = key  # whole before any reader can see it
        return key


DERIVED = ("service", "route", "edge")  # the order of ``Key.derived``


# --- tables ------------------------------------------------------------------------------------

# key, requests, failures, reporting host ids, varint counts, whether they are zlib-packed
Item = tuple[Key, int, int, Sequence[int], bytes | memoryview, bool]


@dataclass(frozen=True, slots=True)
class Table:
    keys: list[Key]
    requests: array[int]
    failures: array[int]
    host_ends: array[int]  # cell i reported by hosts[host_ends[i-1]:host_ends[i]]
    hosts: array[int]
    hist_ends: array[int]  # cell i's encoding is hists[hist_ends[i-1]:hist_ends[i]]
    hists: bytes

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"<Table cells={len(self.keys)} bytes={self.nbytes()}>"

    def nbytes(self) -> int:
        """Memory held, measured the way ``sys.getsizeof`` would count it, roughly."""
        arrays = (self.requests, self.failures, self.host_ends, self.hosts, self.hist_ends)
        return len(self.hists) + 8 * len(self.keys) + sum(a.itemsize * len(a) for a in arrays)

    def items(self, derive: int = -1) -> Iterable[Item]:
        """Cells as merge inputs, keyed by themselves or by ``Key.derived[derive]``."""
        view = memoryview(self.hists)
        h0 = s0 = 0
        for i, key in enumerate(self.keys):
            h1, s1 = self.host_ends[i], self.hist_ends[i]
            k = key if derive < 0 else key.derived[derive]
            yield k, self.requests[i], self.failures[i], self.hosts[h0:h1], view[s0:s1], True
            h0, s0 = h1, s1


EMPTY = Table([], array("Q"), array("Q"), array("I"), array("I"), array("I"), b"")


class _Columns:
    """A table being written, cell by cell, in ascending ``id(key)`` (what merges rely on)."""

    def __init__(self) -> None:
        self.keys: list[Key] = []
        self.requests, self.failures = array("Q"), array("Q")
        self.host_ends, self.hosts, self.hist_ends = array("I"), array("I"), array("I")
        self.chunks: list[bytes | memoryview] = []
        self.size = 0

    def add(
        self, key: Key, req: int, fail: int, hosts: Iterable[int], blob: bytes | memoryview
    ) -> None:
        self.keys.append(key)
        self.requests.append(req)
        self.failures.append(fail)
        self.hosts.extend(hosts)
        self.host_ends.append(len(self.hosts))
        self.chunks.append(blob)
        self.size += len(blob)
        self.hist_ends.append(self.size)

    def copy(self, table: Table, i: int) -> None:
        key, req, fail, hosts, blob, _ = _cell(table, i)
        self.add(key, req, fail, hosts, blob)

    def table(self) -> Table:
        return Table(
            self.keys,
            self.requests,
            self.failures,
            self.host_ends,
            self.hosts,
            self.hist_ends,
            b"".join(self.chunks),
        )


def build_table(items: list[Item], acc: Accumulator) -> Generator[int, None, Table]:
    """Merge ``items`` by key into a new table, yielding work units as it goes (see module
    doc); the table is the generator's return value.  ``acc`` must be clean and stays so."""
    items.sort(key=lambda it: id(it[0]))  # equal keys are one object: group by identity
    out = _Columns()
    work = 0
    i, n = 0, len(items)
    while i < n:
        key = items[i][0]
        req = fail = 0
        seen: set[int] = set()
        while i < n and items[i][0] is key:
            _, r, f, hs, enc, packed = items[i]
            req += r
            fail += f
            seen.update(hs)
            acc.add(enc, packed)
            i += 1
            work += 1
            if work >= YIELD_EVERY:
                yield work
                work = 0
        out.add(key, req, fail, sorted(seen), acc.encode())
        acc.reset()
        work += ENCODE_WORK
    yield work
    return out.table()


def merge_tables(old: Table, new: Table, acc: Accumulator) -> Generator[int, None, Table]:
    """``old`` plus ``new`` (both as ``build_table`` writes them): a cell of only one is
    copied as it is, a cell of both is merged; yields work units, returns the table."""
    if not len(new) or not len(old):
        return new if len(new) else old
    out = _Columns()
    work = i = j = 0
    end = 2**64
    while i < len(old) or j < len(new):
        a = id(old.keys[i]) if i < len(old) else end
        b = id(new.keys[j]) if j < len(new) else end
        if a < b:
            out.copy(old, i)
            i += 1
        elif b < a:
            out.copy(new, j)
            j += 1
        else:
            (_, r1, f1, h1, e1, _), (_, r2, f2, h2, e2, _) = _cell(old, i), _cell(new, j)
            acc.add(e1)
            acc.add(e2)
            out.add(old.keys[i], r1 + r2, f1 + f2, sorted({*h1, *h2}), acc.encode())
            acc.reset()
            i += 1
            j += 1
            work += 2 + ENCODE_WORK
        work += 1 if (i + j) % 16 == 0 else 0  # copying is cheap, not free
        if work >= YIELD_EVERY:
            yield work
            work = 0
    yield work
    return out.table()


def _cell(table: Table, i: int) -> Item:
    h0, s0 = (table.host_ends[i - 1], table.hist_ends[i - 1]) if i else (0, 0)
    blob = memoryview(table.hists)[s0 : table.hist_ends[i]]
    hosts = table.hosts[h0 : table.host_ends[i]]
    return table.keys[i], table.requests[i], table.failures[i], hosts, blob, True


YIELD_EVERY = 64  # work units between yields: about a millisecond


def run(job: Generator[int, None, Any]) -> Any:
    """Drive a job to its end at once (replays and tests)."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            return done.value
