"""``nodemesh routes``' pure half: table order, missing numbers, routes no longer defined."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nodemesh.discovery.routes import parse_table
from nodemesh.telemetry.routes_cli import route_rows, routes_cmd, table

TABLE = {
    "routes": [
        {"name": "GET /users/{id}", "method": "GET", "path": "/users/[^/]+"},
        {"name": "health", "path": "/healthz"},
    ]
}


def stat(service: str, route: str, requests: int, failures: int = 0) -> dict[str, Any]:
    return {
        "key": {"service": service, "route": route},
        "name": f"{service} {route}",
        "requests": requests,
        "success_rate": (requests - failures) / requests,
        "rps": requests / 60,
        "latency_us": {"p50": 1500, "p95": 4000, "p99": 9000},
    }


def test_rows_follow_the_table_then_default_then_undefined() -> None:
    tables = {"web": parse_table("web", json.dumps(TABLE).encode())[0]}
    stats = [
        stat("web", "GET /users/{id}", 600, failures=6),
        stat("web", "[default]", 30),
        stat("web", "GET /old", 5),  # renamed since: still counted in the window
        stat("db", "", 9),  # a service with no table: its requests are all [default]
        {"key": "junk"},
        "junk",
    ]
    rows = route_rows(tables, stats)
    assert [(r.service, r.route, r.method, r.requests) for r in rows] == [
        ("db", "[default]", "*", 9),
        ("web", "GET /users/{id}", "GET", 600),
        ("web", "health", "*", None),  # defined, no traffic: shown, not missing
        ("web", "[default]", "*", 30),
        ("web", "GET /old", "", 5),
    ]
    users = rows[1]
    assert users.success == pytest.approx(0.99)
    assert (users.latency_ms_p50, users.latency_ms_p99) == (1.5, 9.0)
    assert [r.service for r in route_rows(tables, stats, "db")] == ["db"]
    text = table(rows).splitlines()
    assert text[0].split() == [
        "SERVICE", "ROUTE", "METHOD", "PATH", "SUCCESS", "RPS",
        "LATENCY_P50", "LATENCY_P95", "LATENCY_P99",
    ]  # fmt: skip
    assert "/users/[^/]+" in text[2] and "99.00%" in text[2] and "1.50ms" in text[2]


def test_check_accepts_a_good_file_and_names_every_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(TABLE))
    r = CliRunner().invoke(routes_cmd, ["web", "--check", str(good)])
    assert r.exit_code == 0, r.output
    assert "GET /users/{id}" in r.output and "/healthz" in r.output

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"routes": [{"name": "x", "path": "("}, {"name": "y"}]}))
    r = CliRunner().invoke(routes_cmd, ["web", "--check", str(bad)])
    assert r.exit_code == 64
    assert "routes[0]: path = '(' is not a regular expression" in r.stderr
    assert "routes[1]: path = None" in r.stderr
    assert "consul kv put nodemesh/routes/web" in r.stderr

    r = CliRunner().invoke(routes_cmd, ["web", "--check", str(tmp_path / "missing.json")])
    assert r.exit_code == 64 and "cannot read" in r.stderr
    r = CliRunner().invoke(routes_cmd, ["--check", str(good)])
    assert r.exit_code == 64 and "needs the SERVICE" in r.stderr
