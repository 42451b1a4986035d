"""Fleet metrics under real load: exact counts and honest percentiles, through restarts.

    load on h1 ──> agent h1 ══ mTLS ══> agents h2/h3 ──> web (its /slow sleeps a known time)
                        └── every 10 s, interval histograms ──> controller on ctl

The load generator records every request's latency itself.  While it runs, the controller is
restarted and then frozen (SIGSTOP) long enough for the agents' reports to back up; after it,
one serving agent is restarted before its interval ends.  The controller must then count
exactly the requests sent, per route, and its percentiles must sit between the server's own
sleep and the client's figures (each request's mesh time is inside its client time).
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from nodemesh.lab.mesh import AppSpec, Lab, LabSpec

pytestmark = pytest.mark.system

SLOW_MS = 20
PRECISION = 1.001  # HDR histograms at 3 significant digits
ROUTES = {
    "routes": [
        {"name": "GET /slow", "method": "GET", "path": "/slow"},
        {"name": "GET /status/{code}", "method": "GET", "path": "/status/\\d+"},
    ]
}
LOADS = {  # route -> (path, count, rate)
    "GET /slow": (f"/slow?ms={SLOW_MS}", 400, 20.0),
    "GET /status/{code}": ("/status/201", 100, 5.0),
    "[default]": ("/", 60, 3.0),
}


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(
        servers=1,
        hosts=3,
        apps=(AppSpec("h2", "web", 8080), AppSpec("h3", "web", 8080)),
    )


def _nodemesh(lab: Lab, *args: str) -> Any:
    """A CLI command on h1 as root, with h1's agent config for certificates and controller."""
    config = str(lab.dir / "h1" / "agent.toml")
    argv = [str(lab.bin / "nodemesh"), *args, "-o", "json", "--config", config]
    out = lab.exec("h1", argv, timeout=30).stdout
    return json.loads(out)


def _inbound_web_count(lab: Lab, host: str) -> int:
    stats = json.loads(lab.curl("ctl", lab.admin_url(host, "/stats.json")).body)
    return sum(
        s["count"] for s in stats["series"] if s["direction"] == "inbound" and s["service"] == "web"
    )


def _routes(lab: Lab) -> dict[str, dict[str, Any]]:
    rows = _nodemesh(lab, "stat", "routes", "--window", "10m")
    return {r["name"]: r for r in rows if r["name"].startswith("web ")}


def test_exact_counts_and_percentiles_through_restarts_and_an_outage(lab: Lab) -> None:
    lab.consul_api("ctl", "/v1/kv/nodemesh/routes/web", method="PUT", body=ROUTES)
    time.sleep(2)  # the agents' KV watch answers within moments of a change
    # Nothing went through the mesh yet (the apps' Consul checks are local, never intercepted).
    assert _inbound_web_count(lab, "h2") == _inbound_web_count(lab, "h3") == 0

    web = lab.app_url("h2", "web")
    loads = {
        route: lab.start_load("h1", web.rstrip("/") + path, count=n, rate=rate, concurrency=4)
        for route, (path, n, rate) in LOADS.items()
    }
    assert lab.controller is not None
    time.sleep(4)
    lab.stop_controller()  # SIGTERM: the journal keeps what it accepted
    lab.start_controller()
    time.sleep(2)
    controller = lab.controller
    assert controller is not None
    controller.signal(signal.SIGSTOP)  # reports now time out and back up in every agent
    try:
        time.sleep(12)
    finally:
        controller.signal(signal.SIGCONT)
    finals = {route: load.wait(timeout=60) for route, load in loads.items()}
    for route, (_, n, _) in LOADS.items():
        assert finals[route]["sent"] == n and finals[route]["failed"] == 0, finals[route]

    # Stopped inside its interval: its last partial interval must still be counted, once.
    lab.stop_agent("h3")
    lab.start_agent("h3")

    want = {f"web {route}": n for route, (_, n, _) in LOADS.items()}
    deadline = time.monotonic() + 90
    got: dict[str, int] = {}
    while time.monotonic() < deadline:
        got = {name: r["requests"] for name, r in _routes(lab).items()}
        if got == want:
            break
        time.sleep(2)
    assert got == want, "the controller's counts never matched what was sent"

    rows = _routes(lab)
    for name in want:
        assert rows[name]["success"] == 1.0
    slow = rows["web GET /slow"]
    client = finals["GET /slow"]["latency_ms"]
    print(
        f"GET /slow: mesh p50 {slow['latency_ms_p50']:.3f} ms p99 {slow['latency_ms_p99']:.3f} "
        f"ms; client p50 {client['p50']:.3f} ms p99 {client['p99']:.3f} ms; server {SLOW_MS} ms"
    )
    # Each request's mesh time (inbound agent) lies between the server's sleep and its time as
    # the client saw it, so every percentile does too, to the histograms' precision.
    for p in ("p50", "p99"):
        assert slow[f"latency_ms_{p}"] * PRECISION >= SLOW_MS
        assert slow[f"latency_ms_{p}"] <= client[p] * PRECISION

    # The caller's side counts the same requests.
    out = _nodemesh(lab, "stat", "services", "--window", "10m", "--direction", "outbound")
    assert {r["name"]: r["requests"] for r in out}.get("web") == sum(want.values())
    # Edges: h1 (no service of its own: its node identity) to web, over mTLS.
    edges = _nodemesh(lab, "edges", "--window", "10m")
    mine = [e for e in edges if e["dst"] == "web" and e["src"] == "h1"]
    assert len(mine) == 1 and mine[0]["secured"] and mine[0]["requests"] == sum(want.values())

    # A resent or replayed report would show up as growth: counts stay exact.
    time.sleep(12)
    assert {name: r["requests"] for name, r in _routes(lab).items()} == want
