"""Agents' metrics reports to a real controller over mTLS, against a real Consul.

The reporter runs as in the agent (real ``ControllerClient``, the node certificate the
controller issued); the controller is the real daemon.  It goes away and comes back while
requests are recorded: every request recorded is counted exactly once by the controller that
receives the backlog, and the fleet's percentiles equal those of the agent's own histogram.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import h11
import pytest
import trio

from nodemesh.identity import client as client_module
from nodemesh.identity import keys
from nodemesh.identity.client import ControllerClient, ControllerRefused
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.telemetry import reporter
from nodemesh.telemetry.metrics import Recorder, new_histogram
from nodemesh.telemetry.reporter import Backlog, serve_reporter
from tests.integration.devconsul import DevConsul
from tests.integration.test_controller_api import (
    TOKEN,
    Running,
    _config,
    _node_csr,
    _read_response,
    _request,
    _start,
    _tls,
)

pytestmark = pytest.mark.integration


async def _node_pair(ctl: Running) -> tuple[bytes, bytes]:
    key, csr = _node_csr()
    signed = await ctl.client().sign_node(csr)
    return signed.certificate, key


def _identity(pair: tuple[bytes, bytes]) -> SpiffeId:
    ident = keys.leaf_info(pair[0]).identity
    assert ident is not None
    return ident


async def _rows(
    client: ControllerClient, pair: tuple[bytes, bytes], by: str
) -> list[dict[str, object]]:
    with trio.fail_after(10):
        doc = await client.metrics("10m", by, *pair)
    rows: list[dict[str, object]] = doc["rows"]
    return rows


async def _wait_for(
    client: ControllerClient, pair: tuple[bytes, bytes], requests: int
) -> dict[str, object]:
    # The controller counts a slot once it has ended: wait for the slot and the delivery.
    with trio.fail_after(40):
        while True:
            try:
                rows = await _rows(client, pair, "service")
            except ControllerRefused as e:
                # A restarted controller answers 503 until its journal is replayed.
                if e.status != 503:
                    raise
                rows = []
            if rows and rows[0]["requests"] == requests:
                return rows[0]
            await trio.sleep(0.5)


async def test_reports_survive_a_controller_outage_counted_once(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporter, "BACKOFF_MAX", 1.0)
    cfg = _config(tmp_path, dev_consul.http_port)
    address = [""]
    async with trio.open_nursery() as first_life:
        ctl = await _start(first_life, cfg)
        address[0] = ctl.address
        client = ControllerClient(lambda: address[0], ctl.roots, TOKEN)
        pair = await _node_pair(ctl)
        agent = _identity(pair)
        rec = Recorder()
        backlog: Backlog = await nursery.start(
            serve_reporter, rec, client, agent.uri, lambda: pair, tmp_path / "agent", 1.0
        )
        whole = new_histogram()
        peer = "spiffe://mesh.test/dc/dc1/svc/api"

        def traffic(n: int, base_us: int) -> None:
            for i in range(n):
                us = base_us + 7 * i
                rec.request("inbound", "web", peer, 500 if i % 50 == 0 else 200, us / 1e6)
                whole.record_value(us)

        traffic(1000, 300)
        row = await _wait_for(client, pair, 1000)
        assert row["latency_us"] == {
            "p50": whole.get_value_at_percentile(50),
            "p95": whole.get_value_at_percentile(95),
            "p99": whole.get_value_at_percentile(99),
            "p999": whole.get_value_at_percentile(99.9),
            "min": whole.get_min_value(),
            "max": whole.get_max_value(),
        }
        first_life.cancel_scope.cancel()

    # The controller is gone: the next intervals queue up.
    traffic(500, 5_000)
    with trio.fail_after(10):
        while len(backlog.queue) < 3:
            await trio.sleep(0.2)

    async with trio.open_nursery() as second_life:
        ctl2 = await _start(second_life, cfg)
        address[0] = ctl2.address
        traffic(250, 40_000)
        # The restarted controller replays its journal (controller/journal.py), then sees what
        # the backlog delivered and what came after: every request exactly once.
        row = await _wait_for(client, pair, 1750)
        assert row["successes"] == 1750 - 35  # every 50th request failed with a 500
        assert row["hosts"] == 1
        assert not backlog.queue and rec.reports_dropped == 0

        # Exactness: the merged percentiles equal those of one histogram fed the same values.
        latency = row["latency_us"]
        assert isinstance(latency, dict)
        assert latency["p50"] == whole.get_value_at_percentile(50)
        assert latency["p99"] == whole.get_value_at_percentile(99)
        assert latency["max"] == whole.get_max_value()

        edges = await _rows(client, pair, "edge")
        assert [(e["key"], e["requests"]) for e in edges] == [({"src": peer, "dst": "web"}, 1750)]
        hosts = await _rows(client, pair, "host")
        assert [h["name"] for h in hosts] == [agent.name]
        second_life.cancel_scope.cancel()


async def test_report_endpoint_refusals_over_the_wire(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery
) -> None:
    ctl = await _start(nursery, _config(tmp_path, dev_consul.http_port))
    client = ctl.client()
    pair = await _node_pair(ctl)
    agent = _identity(pair)
    bad = {"agent": agent.uri, "seq": 0, "start": 1.0, "end": 2.0, "series": [{"labels": {}}]}
    with pytest.raises(ControllerRefused) as e:
        await client.report_metrics(bad, *pair)
    assert e.value.status == 400 and "series[0]" in e.value.message

    # Without a client certificate: 401.
    status, _ = await _request(ctl, "POST", "/v1/metrics/report", json.dumps(bad).encode())
    assert status == 401
    status, _ = await _request(ctl, "GET", "/v1/metrics?window=1m")
    assert status == 401

    # Over the size bound: 413 from the head alone, before a byte of the body is sent (with the
    # node's certificate: without one the head is refused 401 first).
    with trio.fail_after(10):
        stream = await _tls(ctl, pair=pair)
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "x"), ("content-length", str(8 * 1024 * 1024))]
        await stream.send_all(
            conn.send(h11.Request(method="POST", target="/v1/metrics/report", headers=head))
        )
        status, raw, _ = await _read_response(conn, stream)
        await trio.aclose_forcefully(stream)
    assert status == 413 and b"over 4194304 bytes" in raw

    with pytest.raises(ControllerRefused) as e:
        await client.metrics("2d", "service", *pair)
    assert e.value.status == 400 and "window" in e.value.message
    assert (await client.metrics("1h", "route", *pair))["rows"] == []


def _empty_report(agent: str, seq: int) -> dict[str, object]:
    end = time.time()
    return {"agent": agent, "seq": seq, "start": end - 10, "end": end, "series": [], "tcp": []}


async def _report_when_ready(
    client: ControllerClient, doc: dict[str, object], pair: tuple[bytes, bytes]
) -> bool:
    """A restarted controller answers 503 until its journal is replayed."""
    with trio.fail_after(20):
        while True:
            try:
                return await client.report_metrics(doc, *pair)
            except ControllerRefused as e:
                if e.status != 503:
                    raise
            await trio.sleep(0.1)


async def test_the_agent_keeps_its_report_connection_and_replaces_a_stale_one(
    dev_consul: DevConsul, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, dev_consul.http_port)
    async with trio.open_nursery() as first_life:
        ctl = await _start(first_life, cfg)
        client = ControllerClient(lambda: ctl.address, ctl.roots, TOKEN, keep_reports=True)
        pair = await _node_pair(ctl)
        agent = _identity(pair).uri
        assert await client.report_metrics(_empty_report(agent, 0), *pair) is False
        kept = client._kept
        assert kept is not None
        assert await client.report_metrics(_empty_report(agent, 1), *pair) is False
        assert client._kept is kept  # the second report went over the same connection
        first_life.cancel_scope.cancel()

    # The controller went away and came back at the same address: the kept connection is
    # dead, and the next report goes over a new one without an error.
    async with trio.open_nursery() as second_life:
        await _start(second_life, replace(cfg, listen=("127.0.0.1", ctl.port)))  # type: ignore[type-var]
        assert await _report_when_ready(client, _empty_report(agent, 2), pair) is False
        renewed = client._kept
        assert renewed is not None and renewed is not kept
        assert await client.report_metrics(_empty_report(agent, 1), *pair) is True  # journal

        monkeypatch.setattr(client_module, "KEEP_IDLE_S", 0.0)  # idle too long: not reused
        assert await client.report_metrics(_empty_report(agent, 3), *pair) is False
        assert client._kept is not None and client._kept is not renewed
        await client.aclose()
        assert client._kept is None
        second_life.cancel_scope.cancel()


async def test_a_client_without_keep_reports_holds_no_connection(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery
) -> None:
    ctl = await _start(nursery, _config(tmp_path, dev_consul.http_port))
    client = ctl.client()
    pair = await _node_pair(ctl)
    assert await client.report_metrics(_empty_report(_identity(pair).uri, 0), *pair) is False
    assert client._kept is None
