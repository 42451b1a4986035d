"""``nodemesh stat`` and ``edges`` against the real controller API on loopback.

Two agents (real node certificates) report known latencies over mTLS; the CLI, run as its own
process with a third node's certificate, must show exactly those counts and the percentiles of
one histogram holding every value both agents recorded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from nodemesh.controller.api import ControllerApi, serve_api
from nodemesh.controller.catalog import NodeInfo
from nodemesh.controller.daemon import OwnCertificate
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.client import ControllerClient
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.telemetry.metrics import new_histogram
from tests.fakecontroller import DC, TD, write_credentials

pytestmark = pytest.mark.integration
NODEMESH = Path(sys.executable).parent / "nodemesh"
SHOP = spiffe.service_id(TD, DC, "shop").uri


class EveryNode:
    """Consul has every node, running ``web`` (reports are checked against it)."""

    async def node(self, name: str) -> NodeInfo | None:
        return NodeInfo(name, "198.18.0.1", frozenset({"web"}), alive=True)


def _series(service: str, peer: str, status: str, values: list[int]) -> dict[str, Any]:
    h = new_histogram()
    for v in values:
        h.record_value(v)
    labels = {"direction": "inbound", "service": service, "peer": peer, "status": status}
    return {"labels": labels | {"route": ""}, "count": len(values), "hdr": h.encode().decode()}


def _report(agent: SpiffeId, end: float, series: list[dict[str, Any]]) -> dict[str, Any]:
    return {"agent": agent.uri, "seq": 0, "start": end - 10, "end": end, "series": series}


async def _node_pair(ca: CertificateAuthority, node: str) -> tuple[SpiffeId, bytes, bytes]:
    ident = spiffe.node_id(TD, DC, node)
    key = keys.generate_key()
    return ident, ca.sign_csr(keys.make_csr(key, ident), ident, 600), key


async def _nodemesh(*args: str) -> str:
    with trio.fail_after(30):
        done = await trio.run_process(
            [str(NODEMESH), *args], capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    out: str = done.stdout.decode()
    return out


async def test_stat_and_edges_show_exactly_what_agents_reported(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(TD)
    own = OwnCertificate(ca, spiffe.service_id(TD, DC, "nodemesh-controller"), "127.0.0.1", 600)
    api = ControllerApi(ca, EveryNode(), "token", DC, 3600)
    # Inside the newest finished 10 s slot, which every window includes.
    end = math.floor(time.time() / 10) * 10 - 1.0
    fast = list(range(100, 10_100, 10))  # 1000 values, 0.1 .. 10 ms
    slow = [5_001_000] * 20  # twenty 5.001 s responses: the tail other meshes get wrong
    whole = new_histogram()
    for v in fast + slow:
        whole.record_value(v)
    files = write_credentials(ca, tmp_path / "ops")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_api, api, ("127.0.0.1", 0), own.context)
        addr = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        for node, series in [
            ("h2", [_series("web", SHOP, "2xx", fast[:500]), _series("web", "", "5xx", slow)]),
            ("h3", [_series("web", SHOP, "2xx", fast[500:])]),
        ]:
            ident, chain, key = await _node_pair(ca, node)
            client = ControllerClient(lambda: addr, ca.roots_pem, "")
            with trio.fail_after(10):
                await client.report_metrics(_report(ident, end, series), chain, key)
        flags = ["--controller", addr, "--ca-file", str(files.ca), "--cert", str(files.cert)]

        (web,) = json.loads(await _nodemesh("stat", "-o", "json", "--window", "1m", *flags))
        assert web["name"] == "web" and web["meshed"] == 2 and web["requests"] == 1020
        assert web["success"] == pytest.approx(1000 / 1020)
        for p in (50, 95, 99):
            assert web[f"latency_ms_p{p}"] == whole.get_value_at_percentile(p) / 1000
        assert web["latency_ms_p99"] > 5000  # the slow tail, exact, not interpolated

        table = (await _nodemesh("stat", "hosts", *flags)).splitlines()
        assert [line.split()[0] for line in table[1:]] == ["h2", "h3"]

        edges = json.loads(await _nodemesh("edges", "-o", "json", *flags))
        assert [(e["src"], e["dst"], e["secured"], e["requests"]) for e in edges] == [
            ("shop", "web", True, 1000),
            ("unknown", "web", False, 20),
        ]
        assert edges[0]["dst_id"] == spiffe.service_id(TD, DC, "web").uri
        dot = await _nodemesh("edges", "-o", "dot", *flags)
        assert '"shop" -> "web" [label="100.00%  p99 ' in dot
        nursery.cancel_scope.cancel()
