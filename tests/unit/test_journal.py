"""The metrics journal: what the controller counted comes back after a restart, exactly once.

A "restart" here is a new ``FleetMetrics`` and a new ``MetricsJournal`` on the same directory,
replayed from the files alone.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from nodemesh.controller import metrics
from nodemesh.controller.api import ControllerApi, Request
from nodemesh.controller.catalog import NodeInfo
from nodemesh.controller.journal import JournalError, MetricsJournal, oldest_slot
from nodemesh.controller.metrics import FleetMetrics, Ingested, parse_report, slot_of
from nodemesh.errors import ConfigError
from nodemesh.identity import spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.telemetry.metrics import new_histogram

T0 = 1_764_080_000.0  # a slot boundary
GROUPS = ("service", "route", "edge", "edge_route", "host")
PEERS = ("spiffe://mesh.test/dc/dc1/svc/api", "spiffe://mesh.test/dc/dc1/svc/shop", "")


def series(values: list[int], service: str = "web", status: str = "2xx", **more: str) -> Any:
    h = new_histogram()
    for v in values:
        h.record_value(v)
    labels = {"direction": "inbound", "service": service, "peer": PEERS[0], "status": status}
    return {"labels": labels | more, "count": len(values), "hdr": h.encode().decode()}


def report(seq: int, end: float, items: list[Any], node: str = "n1", **extra: Any) -> Any:
    return {
        "agent": f"spiffe://mesh.test/dc/dc1/node/{node}",
        "seq": seq,
        "start": end - 10,
        "end": end,
        "series": items,
        "tcp": [],
        **extra,
    }


def record(journal: MetricsJournal, fleet: FleetMetrics, doc: Any, now: float) -> Ingested:
    return journal.record(fleet, doc, parse_report(doc), now)


def restart(directory: Path, now: float) -> tuple[MetricsJournal, FleetMetrics]:
    journal, fleet = MetricsJournal(directory), FleetMetrics()
    journal.replay(fleet, now)
    return journal, fleet


def answers(fleet: FleetMetrics, now: float) -> list[Any]:
    return [
        fleet.query(now, window, by, direction)
        for window in (10, 60, 600, 3600)
        for by in GROUPS
        for direction in ("inbound", "outbound")
    ]


def lines(path: Path) -> list[Any]:
    return [json.loads(raw) for raw in path.read_bytes().splitlines()]


# --- what is written ---------------------------------------------------------------------------


def test_only_new_reports_are_journaled_one_line_each_in_the_file_of_their_slot(
    tmp_path: Path,
) -> None:
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    now = T0 + 25
    first, second = report(0, T0 + 10, [series([100])]), report(1, T0 + 20, [series([200])])
    assert record(journal, fleet, first, now) == Ingested(duplicate=False)
    assert record(journal, fleet, second, now) == Ingested(duplicate=False)
    assert record(journal, fleet, first, now) == Ingested(duplicate=True)  # a resend
    late = report(2, T0 - metrics.RETENTION_S - 10, [series([300])])
    assert record(journal, fleet, late, now) == Ingested(duplicate=False, late=True)
    journal.close()

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{slot_of(T0 + 10)}.jsonl", f"{slot_of(T0 + 20)}.jsonl"]
    (entry,) = lines(tmp_path / names[0])
    assert entry == {"accepted": now, "series_dropped": 0, "report": first}
    assert [e["report"]["seq"] for e in lines(tmp_path / names[1])] == [1]
    assert (tmp_path / names[0]).stat().st_mode & 0o077 == 0


def test_a_line_holds_only_the_series_memory_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_PENDING", 3)
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    doc = report(0, T0 + 10, [series([100 * (i + 1)], service=f"s{i}") for i in range(5)])
    record(journal, fleet, doc, T0 + 15)
    journal.close()
    (entry,) = lines(tmp_path / f"{slot_of(T0 + 10)}.jsonl")
    assert entry["series_dropped"] == 2
    assert entry["report"]["series"] == doc["series"][:3]

    _, again = restart(tmp_path, T0 + 15)
    assert again.overflow.series == fleet.overflow.series == 2
    assert answers(again, T0 + 25) == answers(fleet, T0 + 25)


# --- replay --------------------------------------------------------------------------------------


def test_a_restart_gives_back_exactly_the_same_answers_and_seen_sets(tmp_path: Path) -> None:
    rng = random.Random(7)
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    sent: list[Any] = []
    now = T0
    for seq in range(40):
        for node in ("n1", "n2", "n3"):
            now = T0 + 10 * seq + rng.uniform(0.5, 3)
            items = [
                series(
                    [rng.randint(50, 90_000) for _ in range(rng.randint(1, 30))],
                    service=rng.choice(("web", "db")),
                    status=rng.choice(("2xx", "2xx", "5xx", "error")),
                    peer=rng.choice(PEERS),
                    route=rng.choice(("", "get-user")),
                    direction=rng.choice(("inbound", "outbound")),
                    endpoint=rng.choice(("", "h9")),
                )
                for _ in range(rng.randint(0, 4))
            ]
            tcp = [{"direction": "inbound", "service": "web", "opened": 2, "closed": 1,
                    "bytes_in": rng.randint(0, 9999), "bytes_out": 5}]  # fmt: skip
            doc = report(seq, T0 + 10 * seq, items, node, tcp=tcp, dropped=seq // 10)
            assert not record(journal, fleet, doc, now).duplicate
            sent.append(doc)
            if rng.random() < 0.2:  # a lost 200: the agent sends it again
                assert record(journal, fleet, doc, now).duplicate
    journal.close()
    before = answers(fleet, now + 10)
    assert sum(len(a["rows"]) for a in before) > 100
    assert fleet.overflow.reports_dropped_by_agents == 9

    journal2, fleet2 = restart(tmp_path, now)
    assert answers(fleet2, now + 10) == before
    assert repr(fleet2) == repr(fleet)
    # Every report already counted is still known: resends are duplicates, not journaled.
    files = {p: p.stat().st_size for p in tmp_path.iterdir()}
    for doc in sent:
        assert record(journal2, fleet2, doc, now + 1).duplicate
    assert {p: p.stat().st_size for p in tmp_path.iterdir()} == files
    assert not record(journal2, fleet2, report(40, now, [series([5])]), now + 1).duplicate
    journal2.close()


def test_files_older_than_retention_go_at_replay_and_as_time_passes(tmp_path: Path) -> None:
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    for seq in range(3):
        record(journal, fleet, report(seq, T0 + 10 * (seq + 1), [series([100])]), T0 + 35)
    journal.close()
    (tmp_path / "notes.txt").write_text("not ours")
    slots = [slot_of(T0 + 10 * (i + 1)) for i in range(3)]

    # An hour later the first slot has aged out of memory: its file goes at replay.
    later = T0 + metrics.RETENTION_S + 10
    assert oldest_slot(later) == slots[1]
    journal2, fleet2 = MetricsJournal(tmp_path), FleetMetrics()
    done = journal2.replay(fleet2, later)
    assert (done.files, done.reports, done.pruned) == (2, 2, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{slots[1]}.jsonl",
        f"{slots[2]}.jsonl",
        "notes.txt",
    ]
    assert "slots=2 entries=2" in repr(fleet2)

    # Time passes: opening a new slot's file lets the expired ones go.
    much_later = later + 20
    record(journal2, fleet2, report(3, much_later, [series([100])]), much_later)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{slot_of(much_later)}.jsonl",
        "notes.txt",
    ]
    journal2.close()


def test_corrupt_and_torn_lines_are_skipped_by_file_and_line(tmp_path: Path) -> None:
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    for seq in range(2):
        record(journal, fleet, report(seq, T0 + 10, [series([100 + seq])]), T0 + 12)
    journal.close()
    path = tmp_path / f"{slot_of(T0 + 10)}.jsonl"
    good = path.read_bytes().splitlines(keepends=True)
    bad_report = {"accepted": T0, "series_dropped": 0, "report": {"agent": "nobody"}}
    torn = json.dumps({"accepted": T0, "report": report(9, T0 + 10, [series([7])])})[:150]
    path.write_bytes(
        good[0]
        + b"\x00garbage\n"
        + json.dumps(bad_report).encode()
        + b"\n"
        + good[1]
        + torn.encode()
    )

    journal2, fleet2 = MetricsJournal(tmp_path), FleetMetrics()
    done = journal2.replay(fleet2, T0 + 12)
    assert [(s.path, s.line) for s in done.skipped] == [(path, 2), (path, 3), (path, 5)]
    assert "not JSON" in done.skipped[0].why and "agent = 'nobody'" in done.skipped[1].why
    assert done.reports == 2
    assert answers(fleet2, T0 + 25) == answers(fleet, T0 + 25)

    # The next line does not glue onto the torn tail: a third restart reads it.
    record(journal2, fleet2, report(2, T0 + 10, [series([300])]), T0 + 13)
    journal2.close()
    _, fleet3 = restart(tmp_path, T0 + 13)
    assert fleet3.query(T0 + 25, 60, "service")["rows"][0]["requests"] == 3


def test_a_journalled_line_from_ahead_of_the_clock_is_skipped_at_replay(tmp_path: Path) -> None:
    """A line written before the clock bound existed (or before the clock stepped back)."""
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    record(journal, fleet, report(0, T0 + 10, [series([100])]), T0 + 12)
    journal.close()
    ahead = report(1, T0 + 10 + 86400, [series([5])])
    path = tmp_path / f"{slot_of(ahead['end'])}.jsonl"
    path.write_text(json.dumps({"accepted": T0, "series_dropped": 0, "report": ahead}) + "\n")
    fleet2 = FleetMetrics()
    done = MetricsJournal(tmp_path).replay(fleet2, T0 + 12)
    assert [(s.path, s.line) for s in done.skipped] == [(path, 1)]
    assert "ahead of the controller's clock" in done.skipped[0].why
    assert done.reports == 1
    assert fleet2.query(T0 + 25, 60, "service")["rows"][0]["requests"] == 1


# --- failures ------------------------------------------------------------------------------------


def test_a_failed_write_is_refused_and_written_when_the_agent_resends(tmp_path: Path) -> None:
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    doc = report(0, T0 + 10, [series([100, 200])])
    blocker = tmp_path / f"{slot_of(T0 + 10)}.jsonl"
    blocker.mkdir()  # the slot file cannot be opened: a real EISDIR
    with pytest.raises(JournalError, match=r"cannot append to the metrics journal in .*"):
        record(journal, fleet, doc, T0 + 12)
    blocker.rmdir()
    # Memory counted it; the resend is not a duplicate to the agent, and is now on disk.
    assert record(journal, fleet, doc, T0 + 13) == Ingested(duplicate=False)
    assert record(journal, fleet, doc, T0 + 14) == Ingested(duplicate=True)
    journal.close()
    assert len(lines(blocker)) == 1
    _, again = restart(tmp_path, T0 + 14)
    assert again.query(T0 + 25, 60, "service")["rows"][0]["requests"] == 2


def test_a_journal_directory_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file, not a directory")
    with pytest.raises(ConfigError, match=r"state/metrics: cannot create the metrics journal"):
        MetricsJournal(tmp_path / "state" / "metrics")


# --- through the API -----------------------------------------------------------------------------


class EveryNode:
    """Consul has every node, running ``web`` alone (what the reports here are about)."""

    async def node(self, name: str) -> NodeInfo | None:
        return NodeInfo(name, "198.18.0.1", frozenset({"web"}), alive=True)


def _post(doc: Any) -> Request:
    peer = spiffe.parse(doc["agent"])
    return Request("POST", "/v1/metrics/report", {}, json.dumps(doc).encode(), "198.18.0.1", peer)


async def test_the_api_waits_for_the_replay_then_journals_before_answering(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.create("mesh.test")
    first, fleet = MetricsJournal(tmp_path), FleetMetrics()
    doc = report(0, T0 + 10, [series([100, 300])])
    record(first, fleet, doc, T0 + 11)
    first.close()

    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    api = ControllerApi(ca, EveryNode(), "t", "dc1", 3600, fleet, lambda: T0 + 15, journal)
    query = Request("GET", "/v1/metrics", {}, b"", "198.18.0.1", spiffe.parse(doc["agent"]))
    for req in (_post(doc), query):
        resp = await api.handle(req)
        assert resp.status == 503 and b"replaying its metrics journal" in resp.body

    done = await journal.load(fleet, T0 + 15)
    assert journal.ready and done.reports == 1 and "ready" in repr(journal)
    assert json.loads((await api.handle(_post(doc))).body)["duplicate"] is True
    fresh = report(1, T0 + 10, [series([500])])
    assert json.loads((await api.handle(_post(fresh))).body)["duplicate"] is False
    journal.close()
    assert [e["report"]["seq"] for e in lines(tmp_path / f"{slot_of(T0 + 10)}.jsonl")] == [0, 1]
    rows = json.loads((await api.handle(query)).body)["rows"]
    assert rows[0]["requests"] == 3


async def test_series_the_node_cannot_claim_are_never_journaled(tmp_path: Path) -> None:
    """The API keeps only attributable series, in memory and on disk alike: a restart's replay
    (which never asks Consul) cannot bring a refused series back."""
    ca = CertificateAuthority.create("mesh.test")
    journal, fleet = MetricsJournal(tmp_path), FleetMetrics()
    await journal.load(fleet, T0 + 15)
    api = ControllerApi(ca, EveryNode(), "t", "dc1", 3600, fleet, lambda: T0 + 15, journal)
    doc = report(0, T0 + 10, [series([100]), series([9_000_000], service="payments")])
    assert (await api.handle(_post(doc))).status == 200
    journal.close()
    (line,) = lines(tmp_path / f"{slot_of(T0 + 10)}.jsonl")
    assert [s["labels"]["service"] for s in line["report"]["series"]] == ["web"]
    _, replayed = restart(tmp_path, T0 + 15)
    (row,) = replayed.plan(T0 + 15, 60, "service", "inbound").answer()["rows"]
    assert (row["name"], row["requests"]) == ("web", 1)
