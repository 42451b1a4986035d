"""``nodemesh stat`` merging: exact percentiles across agents' documents; hostile ones skipped."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, cast

import pytest
from hdrh.histogram import HdrHistogram

from nodemesh.agent.admin import stats
from nodemesh.agent.state import AgentState
from nodemesh.telemetry.metrics import Recorder, new_histogram
from nodemesh.telemetry.stat import COLUMNS, Row, rows, table, with_rates


@dataclass
class _Cfg:
    node: str


@dataclass
class _Agent:
    """The two attributes ``admin.stats`` reads from an agent."""

    cfg: _Cfg
    recorder: Recorder


def doc(node: str, rec: Recorder) -> dict[str, Any]:
    """An agent's ``/stats.json`` as it arrives: built by the admin listener, through JSON."""
    raw = stats(cast(AgentState, _Agent(_Cfg(node), rec)))
    parsed: dict[str, Any] = json.loads(json.dumps(raw))
    return parsed


def two_agents() -> tuple[dict[str, Any], dict[str, Any], HdrHistogram]:
    """Agents a and b serve web; ``whole`` recorded every value both did, in one histogram."""
    a, b, whole = Recorder(), Recorder(), new_histogram()
    for i in range(1, 801):  # a: fast, 1..800 µs * 10
        a.request("inbound", "web", "shop", 200, i * 10 / 1e6)
        whole.record_value(i * 10)
    for i in range(1, 201):  # b: a slow tail, 10..2000 ms
        b.request("inbound", "web", "cart", 200 if i % 50 else 503, i * 10 / 1e3)
        whole.record_value(i * 10_000)
    a.request(
        "outbound", "web", "shop", 200, 0.5
    )  # the outbound view is ignored when inbound has data
    return doc("a", a), doc("b", b), whole


def test_merged_percentiles_are_exact() -> None:
    da, db, whole = two_agents()
    row = rows([da, db], {"web": 2})["web"]
    assert row.requests == 1000
    assert row.latency.get_total_count() == whole.get_total_count() == 1000
    for pct in (1, 50, 75, 90, 95, 99, 99.9, 100):
        assert row.latency.get_value_at_percentile(pct) == whole.get_value_at_percentile(pct), pct
    assert row.failures == 4  # b's 503s at i = 50, 100, 150, 200
    assert row.success == pytest.approx(0.996)
    assert row.meshed == 2


def test_merge_is_order_independent() -> None:
    da, db, _ = two_agents()
    one, two = rows([da, db], {})["web"], rows([db, da], {})["web"]
    assert one.requests == two.requests
    assert one.latency.encode() == two.latency.encode()


def test_failures_count_5xx_and_errors_not_4xx() -> None:
    rec = Recorder()
    for status in (200, 404, 429, 500, 503, 0):
        rec.request("inbound", "web", "shop", status, 0.01)
    row = rows([doc("a", rec)], {})["web"]
    assert (row.requests, row.failures) == (6, 3)


def test_outbound_view_when_no_inbound_traffic() -> None:
    rec = Recorder()
    rec.request("outbound", "ext", "shop", 200, 0.01)
    rec.request("outbound", "ext", "shop", 502, 0.01)
    rec.tcp("inbound", "ext")  # an inbound row exists, but with no requests
    row = rows([doc("a", rec)], {})["ext"]
    assert (row.requests, row.failures) == (2, 1)


def test_meshed_services_without_traffic_get_a_row() -> None:
    got = rows([], {"idle": 3})
    assert set(got) == {"idle"}
    row = got["idle"]
    assert (row.meshed, row.requests, row.success) == (3, 0, None)
    assert row.as_json()["latency_ms_p99"] is None


def test_open_tcp_connections_are_summed_over_inbound_only() -> None:
    a, b = Recorder(), Recorder()
    ta = a.tcp("inbound", "db")
    ta.opened, ta.closed = 10, 7
    tb = b.tcp("inbound", "db")
    tb.opened, tb.closed = 2, 2
    eg = b.tcp("egress", "db")
    eg.opened = 50
    assert rows([doc("a", a), doc("b", b)], {})["db"].tcp_open == 3


def test_rates_and_json() -> None:
    before = rows([doc("a", _counted(100))], {"web": 1})
    now = rows([doc("a", _counted(160))], {"web": 1})
    with_rates(now, before, 2.0)
    assert now["web"].rps == pytest.approx(30.0)
    restarted = rows([doc("a", _counted(10))], {"web": 1})
    with_rates(restarted, now, 2.0)
    assert restarted["web"].rps == 0.0  # counters went back (restart): never negative
    fresh = rows([doc("a", _counted(10))], {"web": 1})
    with_rates(fresh, {}, 2.0)
    assert fresh["web"].rps is None
    j = now["web"].as_json()
    assert set(j) == {
        "name",
        "meshed",
        "requests",
        "success",
        "rps",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_p99",
        "tcp_open_connections",
    }
    assert j["latency_ms_p50"] == pytest.approx(5.0, rel=1e-3)


def _counted(n: int) -> Recorder:
    rec = Recorder()
    for _ in range(n):
        rec.request("inbound", "web", "shop", 200, 0.005)
    return rec


def test_table() -> None:
    r = Row("web", meshed=2, requests=4, failures=1, rps=1.25)
    for v in (1000, 2000, 3000, 4000):
        r.latency.record_value(v)
    text = table([Row("zz-idle"), r])
    lines = text.split("\n")
    assert lines[0].split() == list(COLUMNS)
    assert lines[1].split() == ["web", "2", "75.00%", "1.2", "2.00ms", "4.00ms", "4.00ms", "0"]
    assert lines[2].split() == ["zz-idle", "0", "-", "-", "-", "-", "-", "0"]
    assert all(line == line.rstrip() for line in lines)


# --- hostile documents --------------------------------------------------------------------------


def _series(**over: Any) -> dict[str, Any]:
    rec = Recorder()
    rec.request("inbound", "web", "shop", 200, 0.010)
    s: dict[str, Any] = doc("x", rec)["series"][0]
    s.update(over)
    return s


@pytest.mark.parametrize(
    "hdr",
    [
        "!!! not base64 !!!",
        base64.b64encode(b"\x00\x01garbage").decode(),
        base64.b64encode(b"").decode(),
        "",
        123,
        None,
        ["x"],
    ],
    ids=["not-base64", "not-hdr", "empty-b64", "empty", "int", "none", "list"],
)
def test_bad_histogram_is_skipped_and_the_rest_merges(hdr: Any) -> None:
    da, db, _ = two_agents()
    da["series"].append(_series(service="web", hdr=hdr))
    row = rows([da, db], {})["web"]
    assert row.latency.get_total_count() == 1000  # the bad histogram added nothing


@pytest.mark.parametrize(
    "bad",
    [
        {"series": "everything"},
        {"series": [1, "x", None, []]},
        {"series": [{"direction": "sideways", "service": "web", "count": 5}]},
        {"series": None, "tcp": "nope"},
        {"tcp": [{"direction": "inbound", "service": "web", "opened": "9", "closed": 0}]},
        {},
    ],
    ids=["series-str", "series-items", "direction", "none", "tcp-types", "empty"],
)
def test_hostile_document_shapes_are_skipped(bad: dict[str, Any]) -> None:
    da, db, _ = two_agents()
    got = rows([da, bad, db], {})
    assert got["web"].requests == 1000
    assert got["web"].tcp_open == 0


@pytest.mark.parametrize("count", [-5, "7", 2.5, None], ids=repr)
def test_bad_counts_add_nothing(count: Any) -> None:
    da, db, _ = two_agents()
    da["series"].append(_series(service="web", count=count))
    row = rows([da, db], {})["web"]
    assert row.requests == 1000
    assert row.latency.get_total_count() == 1000


@pytest.mark.parametrize(
    "entry",
    [
        {"direction": "inbound", "service": "ghost", "count": -1},
        {"direction": "inbound", "count": 3},  # no service: a row named "None"
        {"direction": "inbound", "service": ["x"], "count": 1},
    ],
    ids=["negative-count", "no-service", "list-service"],
)
def test_rejected_entries_make_no_rows(entry: dict[str, Any]) -> None:
    da, db, _ = two_agents()
    da["series"].append(entry)
    assert set(rows([da, db], {})) == {"web"}


def test_boolean_count_is_not_a_number() -> None:
    da, db, _ = two_agents()
    da["series"].append(_series(service="web", count=True))
    assert rows([da, db], {})["web"].requests == 1000


def test_histogram_with_a_wider_range_does_not_break_the_table() -> None:
    wide = HdrHistogram(1, 3_600_000_000, 3)  # an agent built with a one-hour range
    wide.record_value(100_000_000)  # 100 s
    da, db, _ = two_agents()
    da["series"].append(_series(service="web", hdr=wide.encode().decode("ascii")))
    row = rows([da, db], {})["web"]
    assert row.requests == 1001
