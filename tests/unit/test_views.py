"""``nodemesh stat``/``edges`` rendering from recorded controller answers; hostile rows skipped."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from nodemesh.telemetry.stat import COLUMNS
from nodemesh.telemetry.views import (
    EDGE_COLUMNS,
    edge_rows,
    edges_dot,
    edges_table,
    stat_rows,
    stat_table,
    to_json,
)
from tests.fixtures.controller import rows

TD = "spiffe://nodemesh.local/dc/dc1"


def test_stat_services_table() -> None:
    lines = stat_table(stat_rows(rows("service", "1m"))).split("\n")
    assert lines[0].split() == list(COLUMNS)
    # Sorted by name; latencies are the controller's µs shown in ms.
    assert lines[1].split() == ["idle", "1", "-", "0.0", "-", "-", "-", "-"]
    assert lines[2].split() == ["shop", "2", "100.00%", "10.0", "1.50ms", "3.10ms", "5.00ms", "4"]
    assert lines[3].split() == ["web", "2", "99.00%", "20.0", "0.81ms", "2.05ms", "4.09ms", "14"]
    assert all(line == line.rstrip() for line in lines)


def test_stat_routes_and_hosts_name_their_rows() -> None:
    assert [r.name for r in stat_rows(rows("route", "1m"))] == ["web/", "web/api"]
    assert [r.name for r in stat_rows(rows("host", "1m"))] == ["h2", "h3"]


def test_stat_json_keeps_exact_figures() -> None:
    doc = json.loads(to_json(stat_rows(rows("service", "1m"))))
    web = next(r for r in doc if r["name"] == "web")
    assert web == {
        "name": "web",
        "meshed": 2,
        "requests": 1200,
        "success": pytest.approx(0.99),
        "rps": 20.0,
        "latency_ms_p50": 0.812,
        "latency_ms_p95": 2.051,
        "latency_ms_p99": 4.095,
        "tcp_opened": 14,
    }


@pytest.mark.parametrize(
    "bad",
    [
        1,
        "web",
        None,
        {"name": ""},
        {"name": 5, "requests": 3},
    ],
    ids=repr,
)
def test_stat_rows_without_a_name_are_dropped(bad: Any) -> None:
    assert [r.name for r in stat_rows([bad, *rows("service", "1m")])] == ["idle", "shop", "web"]


@pytest.mark.parametrize(
    ("field", "value", "attr"),
    [
        ("requests", -1, "requests"),
        ("requests", True, "requests"),
        ("success_rate", 1.5, "success"),
        ("success_rate", "0.9", "success"),
        ("rps", float("nan"), "rps"),
        ("latency_us", {"p50": "fast", "p95": -3, "p99": None}, "latency_ms_p50"),
        ("latency_us", [1, 2, 3], "latency_ms_p99"),
        ("tcp", "x", "tcp_opened"),
        ("hosts", 2.5, "meshed"),
    ],
    ids=repr,
)
def test_bad_values_show_as_dashes(field: str, value: Any, attr: str) -> None:
    row = dict(rows("service", "1m")[0], **{field: value})
    (got,) = stat_rows([row])
    assert getattr(got, attr) is None
    line = stat_table([got]).split("\n")[1]
    assert line.startswith("web")
    if attr != "requests":  # the table shows no request count
        assert "-" in line.split()


def test_edges_identities_and_mtls() -> None:
    got = edge_rows(rows("edge", "1m"))
    assert [(r.src, r.dst, r.secured) for r in got] == [
        ("load", "shop", True),
        ("shop", "web", True),
        ("unknown", "web", False),  # no client identity: not mTLS
    ]
    assert got[1].src_id == f"{TD}/svc/shop"
    assert got[1].dst_id == f"{TD}/svc/web"
    assert got[2].dst_id == ""
    lines = edges_table(got).split("\n")
    assert lines[0].split() == list(EDGE_COLUMNS)
    assert lines[2].split() == ["shop", "web", f"{TD}/svc/shop", f"{TD}/svc/web", "yes"]
    assert lines[3].split() == ["unknown", "web", "-", "-", "no"]


def test_edges_json() -> None:
    doc = json.loads(to_json(edge_rows(rows("edge", "1m"))))
    assert doc[1] == {
        "src": "shop",
        "dst": "web",
        "src_id": f"{TD}/svc/shop",
        "dst_id": f"{TD}/svc/web",
        "secured": True,
        "requests": 1100,
        "success": pytest.approx(1090 / 1100),
        "latency_ms_p99": 4.095,
    }


@pytest.mark.parametrize(
    "bad",
    [{"key": "x"}, {"key": {"src": f"{TD}/svc/a"}}, {"name": "a -> b"}, 3, None],
    ids=repr,
)
def test_edge_rows_without_a_destination_are_dropped(bad: Any) -> None:
    assert len(edge_rows([bad, *rows("edge", "1m")])) == 3


def test_dot_has_every_edge_with_success_and_p99() -> None:
    dot = edges_dot(edge_rows(rows("edge", "1m")))
    assert dot.startswith("digraph nodemesh {") and dot.endswith("}\n")
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)" \[label="([^"]*)"(.*)\];$', dot, re.M)
    assert [(a, b) for a, b, _, _ in edges] == [
        ("load", "shop"),
        ("shop", "web"),
        ("unknown", "web"),
    ]
    assert edges[1][2] == "99.09%  p99 4.09ms\\n1100 req"
    assert edges[1][3] == ""  # secured: drawn plain
    assert "style=dashed" in edges[2][3]  # not secured: stands out
    nodes = re.findall(r'^  "([^"]+)";$', dot, re.M)
    assert nodes == ["load", "shop", "unknown", "web"]


def test_dot_quotes_hostile_names() -> None:
    row = {"key": {"src": 'a"b\\c\nd', "dst": 'x"; y -> z'}, "requests": 1}
    dot = edges_dot(edge_rows([row]))
    assert '"a\\"b\\\\c d" -> "x\\"; y -> z"' in dot
    assert dot.count("\n") == len(dot.splitlines())  # no raw newline inside a statement
