"""The controller's fleet aggregation: de-duplication, windows, exact merges, bounds, parsing."""

from __future__ import annotations

import random
from typing import Any

import pytest

from nodemesh.controller import metrics as fm
from nodemesh.controller.metrics import BadReport, FleetMetrics, parse_report, parse_window
from nodemesh.telemetry.metrics import new_histogram

T0 = 1_764_080_000.0  # a slot boundary


def hdr(values: list[int]) -> str:
    h = new_histogram()
    for v in values:
        h.record_value(v)
    return str(h.encode().decode("ascii"))


def series(
    values: list[int],
    service: str = "web",
    status: str = "2xx",
    peer: str = "spiffe://nodemesh.local/dc/dc1/svc/api",
    route: str = "",
    direction: str = "inbound",
    endpoint: str | None = None,
) -> dict[str, Any]:
    labels = {
        "direction": direction,
        "service": service,
        "peer": peer,
        "status": status,
        "route": route,
    }
    if endpoint is not None:
        labels["endpoint"] = endpoint
    return {"labels": labels, "count": len(values), "hdr": hdr(values)}


def report(
    seq: int, end: float, items: list[dict[str, Any]], node: str = "n1", **extra: Any
) -> dict[str, Any]:
    return {
        "agent": f"spiffe://nodemesh.local/dc/dc1/node/{node}",
        "seq": seq,
        "start": end - 10,
        "end": end,
        "series": items,
        "tcp": [],
        **extra,
    }


def ingest(fleet: FleetMetrics, doc: dict[str, Any], now: float) -> fm.Ingested:
    return fleet.ingest(parse_report(doc), now)


def row(answer: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [r for r in answer["rows"] if r["name"] == name]
    assert len(found) == 1, answer["rows"]
    return found[0]


# --- de-duplication --------------------------------------------------------------------------


def test_a_retried_report_counts_once() -> None:
    fleet = FleetMetrics()
    doc = report(7, T0 + 10, [series([100, 200])])
    assert ingest(fleet, doc, T0 + 11).duplicate is False
    assert ingest(fleet, doc, T0 + 12).duplicate is True
    assert row(fleet.query(T0 + 12, 60, "service"), "web")["requests"] == 2


def test_same_seq_from_another_agent_is_not_a_duplicate() -> None:
    fleet = FleetMetrics()
    ingest(fleet, report(1, T0 + 10, [series([5])], node="n1"), T0 + 10)
    assert ingest(fleet, report(1, T0 + 10, [series([5])], node="n2"), T0 + 10).duplicate is False
    r = row(fleet.query(T0 + 10, 60, "service"), "web")
    assert (r["requests"], r["hosts"]) == (2, 2)


def test_out_of_order_and_gaps_are_remembered() -> None:
    seen = fm._Seen()
    assert [seen.add(s) for s in (0, 2, 1, 2, 0, 5)] == [True, True, True, False, False, True]
    assert seen.mark == 2 and seen.above == {5}
    assert seen.add(3) and seen.add(4) and not seen.add(5)
    assert seen.mark == 5 and not seen.above


def test_seen_set_stays_bounded_when_a_gap_never_fills() -> None:
    seen = fm._Seen()
    seen.add(0)
    for s in range(2, 2 + fm.MAX_SEEN * 3):  # seq 1 was dropped by the agent
        assert seen.add(s)
        assert len(seen.above) <= fm.MAX_SEEN
    assert not seen.add(2)  # still a duplicate after the mark moved
    assert not seen.add(2 + fm.MAX_SEEN * 3 - 1)


# --- windows ---------------------------------------------------------------------------------


def test_windows_cover_whole_slots_and_old_slots_expire() -> None:
    fleet = FleetMetrics()
    # one request per 10 s interval for 70 minutes
    for i in range(420):
        end = T0 + 10 * (i + 1)
        ingest(fleet, report(i, end, [series([1000])]), end + 0.5)
    now = T0 + 4200 + 0.5
    assert row(fleet.query(now, 60, "service"), "web")["requests"] == 6
    assert row(fleet.query(now, 600, "service"), "web")["requests"] == 60
    one_hour = fleet.query(now, 3600, "service")
    assert row(one_hour, "web")["requests"] == 360
    assert row(one_hour, "web")["rps"] == pytest.approx(0.1)
    assert len(fleet._slots) <= fm.RETENTION_S // fm.SLOT_S
    assert fleet._entries == len(fleet._slots)


def test_an_interval_ending_on_a_boundary_belongs_to_the_slot_before() -> None:
    assert fm.slot_of(T0 + 10) == fm.slot_of(T0 + 0.001) == fm.slot_of(T0 + 9.9)
    assert fm.slot_of(T0 + 10.001) == fm.slot_of(T0 + 10) + 1


def test_a_report_older_than_the_retention_is_late_and_counted() -> None:
    fleet = FleetMetrics()
    res = ingest(fleet, report(0, T0, [series([1])]), T0 + 2 * 3600)
    assert res.late and fleet.overflow.late_reports == 1
    assert fleet.query(T0 + 2 * 3600, 3600, "service")["rows"] == []


def test_a_report_from_ahead_of_the_clock_is_refused_and_its_seq_stays_free() -> None:
    """A far-future ``end`` would sit in a slot that never closes; within the skew it lands."""
    fleet = FleetMetrics()
    now = T0 + 5
    res = ingest(fleet, report(0, now + fm.MAX_CLOCK_SKEW_S + 3600, [series([1])]), now)
    assert res.ahead == pytest.approx(fm.MAX_CLOCK_SKEW_S + 3600)
    assert fleet.statistics().pending == 0 and fleet.generation == 0
    # The same seq with the agent's clock fixed is new; a little skew is an honest clock.
    assert not ingest(fleet, report(0, now + 30, [series([1])]), now).duplicate
    assert fleet.statistics().pending == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("1m", 60), ("15s", 20), ("10m", 600), ("1h", 3600)]
)
def test_parse_window(text: str, seconds: int) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "2h", "1d", "-1m", "1.5m", "61m"])
def test_parse_window_refuses(text: str) -> None:
    with pytest.raises(BadReport, match="window"):
        parse_window(text)


# --- exact merges ----------------------------------------------------------------------------


def test_merged_percentiles_equal_one_histogram_fed_every_value() -> None:
    rng = random.Random(4)
    fleet = FleetMetrics()
    everything = new_histogram()
    for node in range(5):
        for i in range(6):
            values = [int(rng.lognormvariate(7, 1.5)) + 1 for _ in range(300)]
            values = [min(v, 60_000_000) for v in values]
            for v in values:
                everything.record_value(v)
            end = T0 + 10 * (i + 1)
            ingest(fleet, report(i, end, [series(values)], node=f"n{node}"), end)
    r = row(fleet.query(T0 + 60, 60, "service"), "web")
    assert r["requests"] == everything.get_total_count() == 9000
    want = {
        "p50": everything.get_value_at_percentile(50),
        "p95": everything.get_value_at_percentile(95),
        "p99": everything.get_value_at_percentile(99),
        "p999": everything.get_value_at_percentile(99.9),
        "min": everything.get_min_value(),
        "max": everything.get_max_value(),
    }
    assert r["latency_us"] == want
    assert r["hosts"] == 5


def test_a_5001_ms_response_is_reported_as_5001_ms() -> None:
    fleet = FleetMetrics()
    ingest(fleet, report(0, T0 + 10, [series([5_001_000] * 100)]), T0 + 10)
    lat = row(fleet.query(T0 + 10, 60, "service"), "web")["latency_us"]
    for v in lat.values():
        assert abs(v - 5_001_000) <= 5_001_000 * 0.001


# --- grouping --------------------------------------------------------------------------------


def test_group_by_route_edge_host_and_success() -> None:
    fleet = FleetMetrics()
    api = "spiffe://nodemesh.local/dc/dc1/svc/api"
    cron = "spiffe://nodemesh.local/dc/dc1/svc/cron"
    items = [
        series([10, 20, 30], route="/users", peer=api),
        series([40], route="/users", peer=api, status="5xx"),
        series([50], route="/orders", peer=cron, status="error"),
        series([60, 70], route="/orders", peer=cron, status="4xx"),
        series([999], service="db", direction="outbound"),
    ]
    tcp = {"direction": "inbound", "service": "web", "opened": 3, "closed": 1}
    doc = report(0, T0 + 10, items, tcp=[tcp | {"bytes_in": 10, "bytes_out": 20}])
    ingest(fleet, doc, T0 + 10)
    ingest(fleet, report(0, T0 + 10, [series([80], peer=cron)], node="n2"), T0 + 10)
    now = T0 + 10

    web = row(fleet.query(now, 60, "service"), "web")
    assert (web["requests"], web["successes"], web["hosts"]) == (8, 6, 2)
    assert web["success_rate"] == pytest.approx(0.75)
    assert web["tcp"] == {"opened": 3, "closed": 1, "bytes_in": 10, "bytes_out": 20}
    assert [r["name"] for r in fleet.query(now, 60, "service")["rows"]] == ["web"]

    routes = fleet.query(now, 60, "route")
    assert row(routes, "web /users")["key"] == {"service": "web", "route": "/users"}
    assert row(routes, "web /users")["requests"] == 4
    assert row(routes, "web [default]")["requests"] == 1

    edges = fleet.query(now, 60, "edge")
    assert row(edges, f"{cron} -> web")["key"] == {"src": cron, "dst": "web"}
    assert row(edges, f"{cron} -> web")["requests"] == 4
    assert row(edges, f"{api} -> web")["latency_us"]["max"] == 40
    assert row(edges, f"{api} -> web")["latency_us"]["min"] <= 40

    hosts = fleet.query(now, 60, "host")
    assert row(hosts, "n1")["requests"] == 7 and row(hosts, "n2")["requests"] == 1
    out = fleet.query(now, 60, "service", direction="outbound")
    assert row(out, "db")["requests"] == 1
    assert out["agents"] == 2


def test_edge_routes_and_the_outbound_endpoint_host() -> None:
    fleet = FleetMetrics()
    api = "spiffe://nodemesh.local/dc/dc1/svc/api"
    items = [
        series([10, 20], route="GET /users/{id}", direction="outbound", endpoint="n7"),
        series([30], route="GET /users/{id}", direction="outbound", endpoint="n8"),
        series([40], route="[default]", direction="outbound", endpoint="n8"),
    ]
    ingest(fleet, report(0, T0 + 10, items), T0 + 10)
    now = T0 + 10
    er = fleet.query(now, 60, "edge_route", direction="outbound")
    users = row(er, f"{api} -> web GET /users/{{id}}")
    assert users["key"] == {"src": api, "dst": "web", "route": "GET /users/{id}"}
    assert users["requests"] == 3
    assert row(er, f"{api} -> web [default]")["requests"] == 1
    # Outbound rows by host are the hosts that served, not the one that reported.
    hosts = fleet.query(now, 60, "host", direction="outbound")
    assert sorted((r["name"], r["requests"]) for r in hosts["rows"]) == [("n7", 2), ("n8", 2)]


def test_empty_window_answers_no_rows() -> None:
    a = FleetMetrics().query(T0, 60, "edge")
    assert a["rows"] == [] and a["window_s"] == 60 and a["end"] - a["start"] == 60


@pytest.mark.parametrize(("by", "direction"), [("path", "inbound"), ("service", "sideways")])
def test_query_refuses_bad_grouping(by: str, direction: str) -> None:
    with pytest.raises(BadReport, match=by if by == "path" else direction):
        FleetMetrics().query(T0, 60, by, direction)


# --- bounds ----------------------------------------------------------------------------------


def test_series_over_the_per_report_cap_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fm, "MAX_SERIES_PER_REPORT", 3)
    fleet = FleetMetrics()
    items = [series([1], service=f"s{i}") for i in range(5)]
    ingest(fleet, report(0, T0 + 10, items), T0 + 10)
    assert fleet.overflow.series == 2
    assert len(fleet.query(T0 + 10, 60, "service")["rows"]) == 3


def test_series_over_the_total_cap_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fm, "MAX_PENDING", 4)
    fleet = FleetMetrics()
    for node in range(3):
        items = [series([1], service=f"s{i}") for i in range(2)]
        ingest(fleet, report(0, T0 + 10, items, node=f"n{node}"), T0 + 10)
    assert fleet._entries == 4 and fleet.overflow.series == 2
    assert fleet.query(T0 + 10, 60, "service")["overflow"]["series"] == 2


def test_agent_drops_are_reported_as_overflow() -> None:
    fleet = FleetMetrics()
    ingest(fleet, report(0, T0 + 10, [], dropped=3), T0 + 10)
    ingest(fleet, report(1, T0 + 20, [], dropped=5), T0 + 20)
    ingest(fleet, report(0, T0 + 20, [], node="n2", dropped=1), T0 + 20)
    assert fleet.query(T0 + 20, 60, "service")["overflow"]["reports_dropped_by_agents"] == 6


# --- parsing ---------------------------------------------------------------------------------


def good() -> dict[str, Any]:
    return report(3, T0 + 10, [series([1, 2, 3])])


def test_parse_a_good_report() -> None:
    r = parse_report(good())
    assert (r.host, r.seq, r.end) == ("n1", 3, T0 + 10)
    assert r.series[0].labels == (
        "inbound",
        "web",
        "spiffe://nodemesh.local/dc/dc1/svc/api",
        "2xx",
        "[default]",  # no route: the agent's default route
        "",
    )


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target: Any = doc
    parts = path.split(".")
    for p in parts[:-1]:
        target = target[int(p)] if p.isdigit() else target[p]
    target[parts[-1]] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("agent", "spiffe://nodemesh.local/dc/dc1/svc/web", "agent"),
        ("seq", -1, "seq"),
        ("seq", "1", "seq"),
        ("seq", True, "seq"),
        ("start", "now", "start"),
        ("end", T0 - 100, "end"),
        ("series", {}, "series"),
        ("series.0.labels.direction", "up", r"series\[0\].labels.direction"),
        ("series.0.labels.status", "200", r"series\[0\].labels.status"),
        ("series.0.labels.service", "", r"series\[0\].labels.service"),
        ("series.0.labels.peer", "a\nb", r"series\[0\].labels.peer"),
        ("series.0.count", 4, r"series\[0\].count"),
        ("series.0.hdr", "not base64!", r"series\[0\].hdr"),
        ("series.0.hdr", "SGVsbG8=", r"series\[0\].hdr"),
        ("tcp", [{"direction": "inbound", "service": "w"}], r"tcp\[0\].opened"),
        ("dropped", 1.5, "dropped"),
    ],
)
def test_parse_names_the_bad_field(path: str, value: Any, named: str) -> None:
    with pytest.raises(BadReport, match=named):
        parse_report(_set(good(), path, value))


def test_parse_refuses_another_histogram_shape() -> None:
    from hdrh.histogram import HdrHistogram

    other = HdrHistogram(1, 3_600_000_000, 2)
    other.record_value(5)
    doc = _set(good(), "series.0.hdr", other.encode().decode())
    doc["series"][0]["count"] = 1
    with pytest.raises(BadReport, match=r"series\[0\].hdr .* 1 µs..60 s"):
        parse_report(doc)


def test_parse_refuses_a_non_object() -> None:
    with pytest.raises(BadReport, match="object"):
        parse_report([1, 2])
