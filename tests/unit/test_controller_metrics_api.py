"""The metrics endpoints' decisions, without sockets: who may report, what is refused, queries."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nodemesh.controller.api import ControllerApi, Request, Response
from nodemesh.controller.catalog import NodeInfo
from nodemesh.identity import spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.telemetry.metrics import new_histogram

TD, DC = "mesh.test", "dc1"
HOST_A = spiffe.node_id(TD, DC, "host-a")
T0 = 1_764_080_000.0


class Directory:
    async def node(self, name: str) -> NodeInfo | None:
        return None


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def api(ca: CertificateAuthority) -> ControllerApi:
    return ControllerApi(ca, Directory(), "token", DC, 3600, clock=lambda: T0 + 15)


def _report(seq: int = 0, agent: SpiffeId = HOST_A, values: tuple[int, ...] = (100, 300)) -> Any:
    h = new_histogram()
    for v in values:
        h.record_value(v)
    labels = {"direction": "inbound", "service": "web", "peer": "", "status": "2xx", "route": ""}
    return {
        "agent": agent.uri,
        "seq": seq,
        "start": T0,
        "end": T0 + 10,
        "series": [{"labels": labels, "count": len(values), "hdr": h.encode().decode()}],
        "tcp": [],
    }


def _post(doc: Any, peer: SpiffeId | None = HOST_A, raw: bytes | None = None) -> Request:
    body = raw if raw is not None else json.dumps(doc).encode()
    return Request("POST", "/v1/metrics/report", {}, body, "198.18.0.1", peer)


def _get(query: str, peer: SpiffeId | None = HOST_A) -> Request:
    return Request("GET", "/v1/metrics", {}, b"", "198.18.0.1", peer, query)


def _doc(resp: Response) -> Any:
    return json.loads(resp.body)


async def test_a_report_is_accepted_once_and_shows_in_queries(api: ControllerApi) -> None:
    first = await api.handle(_post(_report()))
    assert (first.status, _doc(first)) == (200, {"accepted": True, "duplicate": False})
    again = await api.handle(_post(_report()))
    assert _doc(again) == {"accepted": True, "duplicate": True}
    resp = await api.handle(_get("window=1m&by=service"))
    assert resp.status == 200
    (row,) = _doc(resp)["rows"]
    assert (row["name"], row["requests"], row["hosts"]) == ("web", 2, 1)
    assert row["latency_us"]["max"] == 300


@pytest.mark.parametrize(
    ("peer", "status", "says"),
    [
        (None, 401, "client cert"),
        (spiffe.service_id(TD, DC, "web"), 403, "node cert"),
        (spiffe.node_id("other.test", DC, "host-a"), 403, "datacenter"),
        (spiffe.node_id(TD, DC, "host-b"), 403, "agent = "),
    ],
)
async def test_only_the_reporting_node_itself_may_report(
    api: ControllerApi, peer: SpiffeId | None, status: int, says: str
) -> None:
    resp = await api.handle(_post(_report(), peer=peer))
    assert resp.status == status
    assert says in _doc(resp)["error"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"agent": "spiffe://mesh.test/dc/dc1/node/host-a", "seq": -4}', "seq = -4"),
    ],
)
async def test_a_malformed_report_is_a_400_naming_the_field(
    api: ControllerApi, raw: bytes, says: str
) -> None:
    resp = await api.handle(_post(None, raw=raw))
    assert resp.status == 400
    assert says in _doc(resp)["error"]


@pytest.mark.parametrize(
    ("query", "says"),
    [("window=5d", "window"), ("by=path", "by = 'path'"), ("direction=up", "direction")],
)
async def test_a_bad_query_is_a_400(api: ControllerApi, query: str, says: str) -> None:
    resp = await api.handle(_get(query))
    assert resp.status == 400
    assert says in _doc(resp)["error"]


async def test_queries_need_a_certificate_of_this_mesh(api: ControllerApi) -> None:
    assert (await api.handle(_get("", peer=None))).status == 401
    svc = spiffe.service_id(TD, DC, "web")
    assert (await api.handle(_get("by=edge", peer=svc))).status == 200
