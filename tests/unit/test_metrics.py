"""The request recorder: label sets, status classes, latency clamping and the series bound."""

from __future__ import annotations

import pytest

from nodemesh.telemetry import metrics
from nodemesh.telemetry.metrics import HIGHEST_US, LOWEST_US, Recorder


def one(rec: Recorder) -> metrics.Series:
    (s,) = list(rec.series())
    return s


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (0, "error"),
        (99, "error"),
        (100, "1xx"),
        (101, "1xx"),
        (200, "2xx"),
        (299, "2xx"),
        (302, "3xx"),
        (404, "4xx"),
        (500, "5xx"),
        (599, "5xx"),
        (600, "error"),
        (-1, "error"),
    ],
)
def test_status_classes(status: int, cls: str) -> None:
    rec = Recorder()
    rec.request("outbound", "web", "shop", status, 0.01)
    assert one(rec).status == cls


def test_one_series_per_label_set() -> None:
    rec = Recorder()
    for _ in range(3):
        rec.request("outbound", "web", "shop", 200, 0.001)
    rec.request("outbound", "web", "shop", 201, 0.001)  # same class
    rec.request("outbound", "web", "shop", 503, 0.001)
    rec.request("inbound", "web", "shop", 200, 0.001)
    rec.request("outbound", "web", "cart", 200, 0.001)
    rec.request("outbound", "api", "shop", 200, 0.001)
    got = {(s.direction, s.service, s.peer, s.status): s.count for s in rec.series()}
    assert got == {
        ("outbound", "web", "shop", "2xx"): 4,
        ("outbound", "web", "shop", "5xx"): 1,
        ("inbound", "web", "shop", "2xx"): 1,
        ("outbound", "web", "cart", "2xx"): 1,
        ("outbound", "api", "shop", "2xx"): 1,
    }
    assert repr(rec) == "<Recorder series=5 tcp=0>"
    s = next(s for s in rec.series() if s.status == "5xx")
    assert repr(s) == "<Series outbound web shop [default]  5xx n=1>"


def test_latency_in_microseconds() -> None:
    rec = Recorder()
    rec.request("outbound", "web", "shop", 200, 0.0015)
    h = one(rec).latency
    assert h.get_total_count() == 1
    assert h.values_are_equivalent(h.get_max_value(), 1500)


@pytest.mark.parametrize(
    ("seconds", "us"),
    [(-5.0, LOWEST_US), (0.0, LOWEST_US), (1e-9, LOWEST_US), (3600.0, HIGHEST_US)],
)
def test_latency_is_clamped_to_the_histogram_range(seconds: float, us: int) -> None:
    rec = Recorder()
    rec.request("outbound", "web", "shop", 200, seconds)
    h = one(rec).latency
    assert h.get_total_count() == 1
    assert h.values_are_equivalent(h.get_max_value(), us)


def test_percentiles_are_exact_to_the_precision() -> None:
    rec = Recorder()
    for ms in range(1, 1001):
        rec.request("inbound", "web", "shop", 200, ms / 1000)
    h = one(rec).latency
    for pct, expected_us in [(50, 500_000), (90, 900_000), (99, 990_000), (100, 1_000_000)]:
        assert abs(h.get_value_at_percentile(pct) - expected_us) <= expected_us * 0.001


def test_overflow_collapses_new_label_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    rec = Recorder()
    for svc in ("a", "b", "c"):
        rec.request("outbound", svc, "shop", 200, 0.001)
    rec.request("outbound", "d", "shop", 200, 0.001)
    rec.request("outbound", "e", "shop", 200, 0.001)
    rec.request("outbound", "f", "shop", 503, 0.001)
    rec.request("outbound", "a", "shop", 200, 0.001)  # a known series still records as itself
    got = {(s.direction, s.service, s.peer, s.status): s.count for s in rec.series()}
    assert got == {
        ("outbound", "a", "shop", "2xx"): 2,
        ("outbound", "b", "shop", "2xx"): 1,
        ("outbound", "c", "shop", "2xx"): 1,
        ("outbound", "overflow", "overflow", "2xx"): 2,
        ("outbound", "overflow", "overflow", "5xx"): 1,
    }
    assert rec.overflowed == 3


def test_series_stay_bounded_under_a_flood_of_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 10)
    rec = Recorder()
    statuses = (0, 101, 200, 302, 404, 503)
    for i in range(5000):
        rec.request(("outbound", "inbound")[i % 2], f"svc-{i}", f"peer-{i}", statuses[i % 6], 0.001)
    # MAX_SERIES real ones plus at most one overflow series per direction and status class.
    assert len(list(rec.series())) <= 10 + 2 * 6
    assert sum(s.count for s in rec.series()) == 5000
    assert rec.overflowed == 5000 - 10


def test_tcp_series() -> None:
    rec = Recorder()
    t = rec.tcp("inbound", "db")
    t.opened += 2
    t.bytes_in += 100
    assert rec.tcp("inbound", "db") is t
    assert rec.tcp("egress", "db") is not t
    assert [(x.direction, x.service, x.opened, x.bytes_in) for x in rec.tcp_series()] == [
        ("inbound", "db", 2, 100),
        ("egress", "db", 0, 0),
    ]


def test_iterating_while_recording_is_safe() -> None:
    rec = Recorder()
    rec.request("outbound", "a", "p", 200, 0.001)
    rec.tcp("outbound", "a")
    for i, _ in enumerate(rec.series()):
        rec.request("outbound", f"new-{i}", "p", 200, 0.001)
    for i, _ in enumerate(rec.tcp_series()):
        rec.tcp("outbound", f"new-{i}")
    assert len(list(rec.series())) == 2
