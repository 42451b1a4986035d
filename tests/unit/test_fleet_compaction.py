"""Compaction changes no answer: random fleets, with and without it, against a reference.

The reference is the aggregation as it was before compaction, kept here in its plainest form:
every accepted series as received, merged with hdrh's own ``decode_and_add`` at query time.
"""

from __future__ import annotations

import gc
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from nodemesh.controller import cells
from nodemesh.controller import metrics as fm
from nodemesh.controller.journal import MetricsJournal
from nodemesh.controller.metrics import FleetMetrics, Report, parse_report
from nodemesh.telemetry.metrics import new_histogram

T0 = 1_764_080_000.0  # a slot boundary, not a block boundary
GROUPS = ("service", "route", "edge", "edge_route", "host")
WINDOWS = (10, 60, 130, 300, 470, 600, 1800, 3600)
SERVICES = ("web", "db", "cache")
PEERS = ("spiffe://mesh.test/dc/dc1/svc/api", "spiffe://mesh.test/dc/dc1/svc/shop", "")
STATUSES = ("2xx", "2xx", "2xx", "4xx", "5xx", "error")


# --- the reference ---------------------------------------------------------------------------


@dataclass
class Reference:
    """Accepted series and TCP deltas per slot, merged the old way at query time."""

    series: dict[int, list[tuple[str, fm.SeriesReport]]] = field(default_factory=dict)
    tcp: dict[int, list[tuple[str, fm.TcpReport]]] = field(default_factory=dict)

    def add(self, report: Report, kept: int) -> None:
        index = fm.slot_of(report.end)
        self.series.setdefault(index, []).extend((report.host, s) for s in report.series[:kept])
        self.tcp.setdefault(index, []).extend((report.host, t) for t in report.tcp)

    def query(self, now: float, window_s: int, by: str, direction: str, floor: int) -> Any:
        newest = math.floor(now / fm.SLOT_S) - 1
        n = max(1, math.ceil(window_s / fm.SLOT_S))
        oldest = max(newest - n + 1, fm.slot_of(now) - fm.RETENTION_S // fm.SLOT_S + 1, floor)
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        agents: set[str] = set()

        def row(key: tuple[str, ...]) -> dict[str, Any]:
            return rows.setdefault(
                key, {"hosts": set(), "req": 0, "fail": 0, "h": new_histogram(), "tcp": [0] * 4}
            )

        for index in range(oldest, newest + 1):
            for host, s in self.series.get(index, []):
                agents.add(host)
                dir_, service, peer, status, route, endpoint = s.labels
                if dir_ != direction:
                    continue
                key = {
                    "service": (service,),
                    "route": (service, route),
                    "edge": (peer, service),
                    "edge_route": (peer, service, route),
                    "host": (endpoint or host,),
                }[by]
                r = row(key)
                r["hosts"].add(host)
                r["req"] += s.count
                r["fail"] += s.count if status in fm.FAILED else 0
                r["h"].decode_and_add(s.hdr)
            if by in ("service", "host"):
                for host, t in self.tcp.get(index, []):
                    agents.add(host)
                    if t.direction != direction:
                        continue
                    r = row((t.service,) if by == "service" else (host,))
                    r["hosts"].add(host)
                    sums = (t.opened, t.closed, t.bytes_in, t.bytes_out)
                    r["tcp"] = [a + b for a, b in zip(r["tcp"], sums, strict=True)]
        out = []
        for key, r in rows.items():
            h: HdrHistogram = r["h"]
            has = h.get_total_count() > 0
            # hdrh's one-pass form of get_value_at_percentile (same rule, four times faster)
            at = h.get_percentile_to_value_dict([p for _, p in cells.PERCENTILES]) if has else {}
            latency = {name: at.get(p) for name, p in cells.PERCENTILES} | {
                "min": int(h.get_min_value()) if has else None,
                "max": int(h.get_max_value()) if has else None,
            }
            tcp = dict(zip(("opened", "closed", "bytes_in", "bytes_out"), r["tcp"], strict=True))
            out.append(
                {
                    "name": fm._name(by, key),
                    "hosts": len(r["hosts"]),
                    "requests": r["req"],
                    "successes": r["req"] - r["fail"],
                    "latency_us": latency,
                    "tcp": tcp if by in ("service", "host") else {},
                }
            )
        out.sort(key=lambda x: (-x["requests"], x["name"]))
        return {"agents": len(agents), "rows": out}


def essentials(answer: dict[str, Any]) -> Any:
    keep = ("name", "hosts", "requests", "successes", "latency_us", "tcp")
    return {
        "agents": answer["agents"],
        "rows": [{k: r[k] for k in keep} for r in answer["rows"]],
    }


# --- random fleets ---------------------------------------------------------------------------


def hdr(rng: random.Random, count: int) -> str:
    h = new_histogram()
    median = math.exp(rng.uniform(math.log(50), math.log(2_000_000)))
    for _ in range(count):
        h.record_value(min(max(int(rng.lognormvariate(math.log(median), 1.2)), 1), 60_000_000))
    return str(h.encode().decode("ascii"))


def random_report(rng: random.Random, node: int, seq: int, end: float) -> dict[str, Any]:
    series = []
    for _ in range(rng.randint(0, 6)):
        count = rng.choice((1, 2, 5, 30))
        direction = rng.choice(("inbound", "outbound"))
        labels = {
            "direction": direction,
            "service": rng.choice(SERVICES),
            "peer": rng.choice(PEERS),
            "status": rng.choice(STATUSES),
            "route": rng.choice(("", "GET /a", "POST /b")),
            "endpoint": rng.choice(("n1", "n7", "")) if direction == "outbound" else "",
        }
        series.append({"labels": labels, "count": count, "hdr": hdr(rng, count)})
    tcp = [
        {"direction": rng.choice(("inbound", "outbound", "egress")),
         "service": rng.choice(SERVICES), "opened": rng.randint(0, 5), "closed": 1,
         "bytes_in": rng.randint(0, 9999), "bytes_out": 7}
        for _ in range(rng.randint(0, 2))
    ]  # fmt: skip
    return {
        "agent": f"spiffe://mesh.test/dc/dc1/node/n{node}",
        "seq": seq,
        "start": end - 10,
        "end": end,
        "series": series,
        "tcp": tcp,
    }


@dataclass
class Run:
    """Reports as a fleet delivers them: mostly on time, some late, some twice."""

    deliveries: list[tuple[float, dict[str, Any]]]
    end: float


def random_run(seed: int, slots: int = 100, nodes: int = 4, late: float = 0.1) -> Run:
    rng = random.Random(seed)
    out = []
    for node in range(nodes):
        for seq in range(slots):
            end = T0 + 10 * (seq + 1)
            doc = random_report(rng, node, seq, end)
            delay = rng.uniform(0.1, 3)
            if rng.random() < late:  # a backlog: minutes later, into compacted slots
                delay = rng.uniform(40, 900)
            out.append((end + delay, doc))
            if rng.random() < 0.05:
                out.append((end + delay + rng.uniform(1, 60), doc))  # a lost 200
    out.sort(key=lambda d: d[0])
    return Run(out, T0 + 10 * slots + 5)


def feed(
    run: Run,
    fleet: FleetMetrics,
    ref: Reference | None = None,
    work: int | None = 0,
    journal: MetricsJournal | None = None,
) -> None:
    """Deliver ``run``; between reports, ``work`` units of compaction (None: all due)."""
    for at, doc in run.deliveries:
        report = parse_report(doc)
        before = fleet.overflow.series
        if journal is not None:
            done = journal.record(fleet, doc, report, at)
        else:
            done = fleet.ingest(report, at)
        if ref is not None and not done.duplicate and not done.late:
            ref.add(report, len(report.series) - (fleet.overflow.series - before))
        if work != 0:
            fleet.compact(at, work)


def answers(fleet: FleetMetrics, now: float) -> list[Any]:
    return [
        essentials(fleet.query(now, w, by, d))
        for w in WINDOWS
        for by in GROUPS
        for d in ("inbound", "outbound")
    ]


def reference_answers(ref: Reference, now: float, floor: int = -(2**62)) -> list[Any]:
    return [
        ref.query(now, w, by, d, floor)
        for w in WINDOWS
        for by in GROUPS
        for d in ("inbound", "outbound")
    ]


# --- compaction changes no answer --------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compacted_and_raw_fleets_answer_exactly_as_the_reference(seed: int) -> None:
    run = random_run(seed)
    raw, ref = FleetMetrics(), Reference()
    feed(run, raw, ref)
    compacted = FleetMetrics()
    feed(run, compacted, work=None)
    stats = compacted.statistics()
    assert stats.blocks >= 2 and stats.pending < raw.statistics().pending / 5

    want = reference_answers(ref, run.end)
    assert sum(len(a["rows"]) for a in want) > 300
    assert answers(raw, run.end) == want
    assert answers(compacted, run.end) == want
    compacted.compact(run.end)  # and with every due slot folded
    assert not compacted.compact(run.end)
    assert answers(compacted, run.end) == want
    assert repr(compacted) == repr(raw)


def test_answers_hold_at_every_step_of_a_compaction() -> None:
    run = random_run(5, slots=70, nodes=3, late=0.2)
    fleet, ref = FleetMetrics(), Reference()
    feed(run, fleet, ref)
    now = run.end
    want = reference_answers(ref, now)
    steps = 0
    while fleet.compact(now, work=40):
        steps += 1
        if steps % 7 == 0:
            assert answers(fleet, now) == want, steps
    assert steps > 20
    assert answers(fleet, now) == want
    assert fleet.statistics().blocks >= 2
    assert_only_open_slots_pending(fleet, now)


def assert_only_open_slots_pending(fleet: FleetMetrics, now: float) -> None:
    closed = fm.closed_slot(now)
    assert all(not s.pending for i, s in fleet._slots.items() if i <= closed)


def test_late_reports_fold_into_compacted_slots_and_their_blocks() -> None:
    run = random_run(8, slots=70, nodes=3, late=0.0)
    fleet, ref = FleetMetrics(), Reference()
    feed(run, fleet, ref, work=None)
    now = run.end + 600  # ten minutes on: every slot compacted, both blocks built
    fleet.compact(now)
    blocks = dict(fleet._blocks)
    assert len(blocks) >= 2
    rng = random.Random(9)
    for seq in range(70):  # a fourth agent delivers its whole backlog now
        doc = random_report(rng, 9, seq, T0 + 10 * (seq + 1))
        report = parse_report(doc)
        assert not fleet.ingest(report, now).late
        ref.add(report, len(report.series))
    assert fleet.statistics().pending > 0
    want = reference_answers(ref, now)
    assert answers(fleet, now) == want  # counted at once, still pending
    fleet.compact(now)
    assert_only_open_slots_pending(fleet, now)
    assert all(fleet._blocks[j] is b for j, b in blocks.items())  # folded in, not rebuilt
    assert answers(fleet, now) == want


def test_reports_older_than_the_retention_stay_late() -> None:
    fleet = FleetMetrics()
    doc = random_report(random.Random(1), 1, 0, T0 + 10)
    assert fleet.ingest(parse_report(doc), T0 + 10 + fm.RETENTION_S + 20).late
    assert fleet.overflow.late_reports == 1


def test_a_journal_replay_gives_back_the_same_answers(tmp_path: Path) -> None:
    run = random_run(11, slots=80, nodes=3, late=0.15)
    journal, fleet, ref = MetricsJournal(tmp_path), FleetMetrics(), Reference()
    feed(run, fleet, ref, work=200, journal=journal)
    journal.close()
    now = run.end
    want = reference_answers(ref, now)
    assert answers(fleet, now) == want

    again = FleetMetrics()
    MetricsJournal(tmp_path).replay(again, now)
    assert answers(again, now) == want
    assert again.statistics().blocks >= 2  # the replay compacts as it goes
    assert repr(again) == repr(fleet)


# --- bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("share", "fine"), [(2, 30), (4, 30), (5, 66)])
def test_past_the_memory_bound_old_slots_keep_only_their_blocks_counted(
    monkeypatch: pytest.MonkeyPatch, share: int, fine: int
) -> None:
    run = random_run(12, slots=150, nodes=3, late=0.0)
    full = FleetMetrics()
    feed(run, full, work=None)
    limit = full.statistics().stored_bytes // share
    monkeypatch.setattr(fm, "MAX_STORED_BYTES", limit)
    monkeypatch.setattr(fm, "FINE_SLOTS", fine)
    fleet, ref = FleetMetrics(), Reference()
    feed(run, fleet, ref, work=None)
    assert not fleet.compact(run.end)
    assert fleet.statistics().stored_bytes <= limit
    coarsened = fleet.overflow.slots_coarsened
    fine_floor = fleet._fine_floor
    assert coarsened >= fm.BLOCK_SLOTS and fine_floor % fm.BLOCK_SLOTS == 0
    assert min(fleet._slots) >= fine_floor
    newest = math.floor(run.end / fm.SLOT_S) - 1
    coarse_blocks = [j for j in fleet._blocks if j * fm.BLOCK_SLOTS < fine_floor]
    kept = newest - fine_floor + 1
    if share == 2:  # old slots lost their detail, old blocks went; the newest ``fine`` stay
        assert kept >= fine
    else:  # not even that fit: the newest slots lost their detail only after old blocks went
        assert kept < fine and fleet.overflow.blocks_evicted > 0 and len(coarse_blocks) <= 1
    now = run.end
    for window in WINDOWS:
        asked = newest - window // fm.SLOT_S + 1
        for by in GROUPS:
            for direction in ("inbound", "outbound"):
                got = fleet.query(now, window, by, direction)
                first = int(got["start"]) // fm.SLOT_S
                if asked >= fine_floor:
                    assert first == asked
                else:  # narrowed to whole blocks, never widened
                    assert first >= asked and first % fm.BLOCK_SLOTS == 0
                    assert first == max(fleet._floor, -(-asked // fm.BLOCK_SLOTS) * 30)
                assert got["window_s"] == (newest - first + 1) * fm.SLOT_S
                span = (newest - first + 1) * fm.SLOT_S
                assert essentials(got) == ref.query(now, span, by, direction, -(2**62))
    overflow = fleet.query(now, 3600, "service")["overflow"]
    assert overflow["slots_coarsened"] == coarsened
    # A report for a coarsened slot is late, as if its hour were up.
    old = random_report(random.Random(3), 8, 0, T0 + 10)
    assert fleet.ingest(parse_report(old), now).late


def test_when_pending_series_reach_the_bound_ingest_folds_due_slots_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fm, "MAX_PENDING", 600)
    run = random_run(13, slots=60, nodes=4, late=0.0)
    fleet, ref = FleetMetrics(), Reference()
    feed(run, fleet, ref)  # nobody runs the compaction step
    assert fleet.overflow.series == 0
    assert fleet.statistics().pending <= 600
    assert answers(fleet, run.end) == reference_answers(ref, run.end)


def test_series_of_open_slots_over_the_bound_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fm, "MAX_PENDING", 5)
    fleet = FleetMetrics()
    rng = random.Random(2)
    docs = [random_report(rng, n, 0, T0 + 10) for n in range(6)]
    total = sum(len(d["series"]) for d in docs)
    for doc in docs:
        fleet.ingest(parse_report(doc), T0 + 11)
    assert fleet.statistics().pending == 5
    assert fleet.overflow.series == total - 5


# --- the cells themselves --------------------------------------------------------------------


def test_accumulator_summaries_equal_hdrh_and_survive_storage() -> None:
    rng = random.Random(4)
    for trial in range(200):
        ref, acc = new_histogram(), cells.Accumulator()
        for _ in range(rng.randint(1, 6)):
            h = new_histogram()
            for _ in range(rng.randint(1, 200)):
                v = int(rng.lognormvariate(rng.uniform(0, 15), rng.uniform(0.1, 2)))
                h.record_value(min(v if trial % 5 else 0, 60_000_000))
            ref.add(h)
            payload, total = cells.v2_counts(base64_decode(h.encode()), acc)
            assert total == h.get_total_count()
            acc.add(payload, packed=False)
        want = {name: int(ref.get_value_at_percentile(p)) for name, p in cells.PERCENTILES}
        want |= {"min": int(ref.get_min_value()), "max": int(ref.get_max_value())}
        assert acc.latency() == want
        stored = acc.encode()
        acc.reset()
        assert acc.total == 0 and acc.latency()["p50"] is None
        acc.add(stored)
        assert acc.latency() == want and acc.total == ref.get_total_count()
        acc.reset()


@pytest.mark.parametrize("gap", [1, 2, 511, 512, 513, 1023, 1024, 1025, 9000])
def test_percentiles_across_chunk_edges(gap: int) -> None:
    shape = new_histogram()
    first = shape.get_counts_array_index(1000)
    h, acc = new_histogram(), cells.Accumulator()
    for index, times in ((first, 50), (first + gap, 45), (first + gap + 1, 5)):
        h.record_value(shape.get_value_from_index(index), times)
    payload, _ = cells.v2_counts(base64_decode(h.encode()), acc)
    acc.add(payload, packed=False)
    want = {name: int(h.get_value_at_percentile(p)) for name, p in cells.PERCENTILES}
    assert {k: v for k, v in acc.latency().items() if k in want} == want


def base64_decode(text: bytes) -> bytes:
    import base64

    return base64.b64decode(text)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x1c\x84\x93\x14\x00\x00\x00\x05hello",
        b"\x1c\x84\x93\x14\x00\x00\x00\x03abc",
        b"\x00\x00\x00\x00\x00\x00\x00\x00",
    ],
)
def test_v2_payload_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        cells.v2_counts(raw, cells.Accumulator())


def test_v2_payload_refuses_counts_beyond_the_range_and_stays_clean() -> None:
    import base64
    import zlib

    from hdrh import codec

    h = new_histogram()
    h.record_value(60_000_000)
    raw = base64.b64decode(h.encode())
    data = bytearray(zlib.decompress(raw[8:]))
    data += b"\x02" * cells.COUNTS_LEN  # counters past the last bucket
    payload = zlib.compress(bytes(data))
    header = codec.ExternalHeader()
    header.cookie, header.length = codec.get_compression_cookie(), len(payload)
    bad = bytes(header) + payload
    acc = cells.Accumulator()
    with pytest.raises(ValueError, match="range"):
        cells.v2_counts(bad, acc)
    good, total = cells.v2_counts(raw, acc)
    assert total == 1
    acc.add(good, packed=False)
    assert acc.latency()["max"] == h.get_max_value() and acc.total == 1


def test_keys_vanish_with_the_last_table_holding_them() -> None:
    ring = cells.KeyRing()
    key = ring.get("edge_route", "inbound", ("a", "web", "/x"))
    assert ring.get("edge_route", "inbound", ("a", "web", "/x")) is key
    assert [k.values for k in key.derived] == [("web",), ("web", "/x"), ("a", "web")]
    assert len(ring) == 4
    del key
    gc.collect()
    assert len(ring) == 0


def test_merge_copies_cells_of_one_side_and_merges_shared_ones() -> None:
    ring, acc = cells.KeyRing(), cells.Accumulator()
    rng = random.Random(6)

    def table(names: list[str]) -> cells.Table:
        items: list[cells.Item] = []
        for i, name in enumerate(names):
            h = new_histogram()
            h.record_value(100 * (i + 1))
            payload, _ = cells.v2_counts(base64_decode(h.encode()), acc)
            key = ring.get("host", "inbound", (name,))
            items.append((key, 1, i % 2, (rng.randint(0, 3),), payload, False))
        built: cells.Table = cells.run(cells.build_table(items, acc))
        return built

    old, new = table(["a", "b", "c"]), table(["c", "d"])
    both: cells.Table = cells.run(cells.merge_tables(old, new, acc))
    got = {k.values[0]: both.requests[i] for i, k in enumerate(both.keys)}
    assert got == {"a": 1, "b": 1, "c": 2, "d": 1}
    assert [id(k) for k in both.keys] == sorted(id(k) for k in both.keys)
    assert cells.run(cells.merge_tables(old, cells.EMPTY, acc)) is old
    assert json.dumps(repr(both))


# --- a query's plan answers what was accepted when it was taken ------------------------------


@pytest.mark.parametrize("seed", [4, 5])
def test_a_plan_answers_in_a_thread_while_ingest_and_compaction_go_on(seed: int) -> None:
    """The API computes answers in a worker thread (metrics.QueryPlan) while the event loop
    keeps ingesting and compacting; each answer is exactly the fleet as the plan found it."""
    import threading

    run = random_run(seed, slots=60)
    half = len(run.deliveries) // 2
    first, rest = Run(run.deliveries[:half], run.end), Run(run.deliveries[half:], run.end)
    fleet = FleetMetrics()
    feed(first, fleet, work=50)  # leaves compaction part-way, pending entries in open slots
    now = first.deliveries[-1][0]
    shapes = [(w, by, d) for w in WINDOWS for by in GROUPS for d in ("inbound", "outbound")]
    want = [essentials(fleet.query(now, w, by, d)) for w, by, d in shapes]
    plans = [fleet.plan(now, w, by, d) for w, by, d in shapes]
    got: list[Any] = []
    failed: list[BaseException] = []

    def answer_all() -> None:
        try:
            got.extend(essentials(p.answer()) for p in plans)
        except BaseException as e:  # re-raised in the test's thread below
            failed.append(e)

    worker = threading.Thread(target=answer_all)
    worker.start()
    feed(rest, fleet, work=50)  # ingest, fold and grow blocks while the worker reads
    fleet.compact(run.end)
    worker.join(timeout=120)
    assert not worker.is_alive() and not failed, failed
    assert got == want
    # And the fleet moved on meanwhile: a new plan sees the rest.
    assert [essentials(fleet.query(now, w, by, d)) for w, by, d in shapes] != want
