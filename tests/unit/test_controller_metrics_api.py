"""The metrics endpoints' decisions, without sockets: who may report, what is refused, queries."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog.testing

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
    """Every node runs ``web`` (what the reports here are about) and nothing else."""

    async def node(self, name: str) -> NodeInfo | None:
        return NodeInfo(name, "198.18.0.1", frozenset({"web"}), alive=True)


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


async def test_a_report_from_ahead_of_the_controllers_clock_is_a_400_naming_both(
    api: ControllerApi,
) -> None:
    doc = _report()
    doc["end"] = T0 + 15 + 86400 * 365  # a year ahead of the controller's clock
    resp = await api.handle(_post(doc))
    assert resp.status == 400
    assert "ahead of the controller's clock" in _doc(resp)["error"]
    assert "NTP" in _doc(resp)["error"]
    assert _doc(await api.handle(_post(_report())))["duplicate"] is False  # seq 0 still free


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


async def test_a_query_after_a_new_report_is_fresh_and_an_unchanged_fleet_is_reused(
    api: ControllerApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are computed in a worker thread and may be reused, but never past a report
    accepted since (unless the answer was dear: REUSE_FACTOR times its computing time)."""
    planned: list[str] = []
    plan = api.fleet.plan

    def counting_plan(*args: Any) -> Any:
        planned.append(args[2])
        return plan(*args)

    monkeypatch.setattr(api.fleet, "plan", counting_plan)
    await api.handle(_post(_report(seq=0)))
    first = _doc(await api.handle(_get("window=1m&by=service")))
    again = _doc(await api.handle(_get("window=1m&by=service")))
    assert first == again and planned == ["service"]  # nothing new: reused
    await api.handle(_post(_report(seq=1, values=(2000,))))
    fresh = _doc(await api.handle(_get("window=1m&by=service")))
    assert fresh["rows"][0]["requests"] == 3 and planned == ["service", "service"]
    assert fresh["rows"][0]["latency_us"]["max"] == 2000
    await api.handle(_get("window=1m&by=edge"))  # another grouping is its own answer
    assert planned[-1] == "edge"


async def test_a_dear_answer_is_reused_for_a_while_under_load(
    api: ControllerApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodemesh.controller import api as api_module

    monkeypatch.setattr(api_module, "DEAR_S", 0.0)  # as if computing had taken long
    monkeypatch.setattr(api_module, "REUSE_FACTOR", 1e6)
    await api.handle(_post(_report(seq=0)))
    first = _doc(await api.handle(_get("window=1m&by=service")))
    await api.handle(_post(_report(seq=1)))
    reused = _doc(await api.handle(_get("window=1m&by=service")))
    assert reused == first and reused["rows"][0]["requests"] == 2
    await api.handle(_post(_report(seq=2)))
    monkeypatch.setattr(api, "_clock", lambda: T0 + 25)  # the next slot: every window moved
    assert _doc(await api.handle(_get("window=1m&by=service")))["rows"][0]["requests"] == 6


# --- attribution: a node's report speaks for that node alone -------------------------------------

WEB_SVC = spiffe.service_id(TD, DC, "web").uri


def _series(direction: str, service: str, peer: str, values: tuple[int, ...] = (100,)) -> Any:
    h = new_histogram()
    for v in values:
        h.record_value(v)
    labels = {"direction": direction, "service": service, "peer": peer, "status": "2xx",
              "route": "", "endpoint": ""}  # fmt: skip
    return {"labels": labels, "count": len(values), "hdr": h.encode().decode()}


def _with(series: list[Any], seq: int = 0, tcp: list[Any] | None = None) -> Any:
    return _report(seq) | {"series": series, "tcp": tcp or []}


async def _rows(api: ControllerApi, direction: str = "inbound") -> dict[str, int]:
    doc = _doc(await api.handle(_get(f"window=1m&by=service&direction={direction}")))
    return {r["name"]: r["requests"] for r in doc["rows"]}


async def test_a_node_cannot_put_inbound_figures_on_a_service_it_does_not_run(
    api: ControllerApi,
) -> None:
    """host-a runs web only: its inbound series for payments (9 s, as the review's poisoned
    fleet showed) are refused, logged with the label, and counted; web's are kept."""
    doc = _with(
        [_series("inbound", "web", WEB_SVC), _series("inbound", "payments", "", (9_000_000,) * 9)]
    )
    with structlog.testing.capture_logs() as logs:
        resp = await api.handle(_post(doc))
    assert (resp.status, _doc(resp)["accepted"]) == (200, True)
    (event,) = [e for e in logs if e["event"] == "metrics_series_unattributed"]
    assert (event["service"], event["refused"]) == ("payments", 1)
    assert "no service 'payments' on node 'host-a'" in event["why"]
    assert await _rows(api) == {"web": 1}
    answer = _doc(await api.handle(_get("window=1m&by=service")))
    assert answer["overflow"]["unattributed"] == 1


@pytest.mark.parametrize(
    ("peer", "kept"),
    [
        (HOST_A.uri, True),  # the node speaking as itself
        (WEB_SVC, True),  # the node's own service
        (spiffe.service_id(TD, DC, "payments").uri, False),  # a service it does not run
        (spiffe.node_id(TD, DC, "host-b").uri, False),  # another node
        ("svc/payments", False),
    ],
)
async def test_outbound_figures_must_come_from_the_node_or_its_services(
    api: ControllerApi, peer: str, kept: bool
) -> None:
    await api.handle(_post(_with([_series("outbound", "payments", peer)])))
    assert await _rows(api, "outbound") == ({"payments": 1} if kept else {})


@pytest.mark.parametrize(
    "peer", ["spiffe://other.test/dc/dc1/svc/api", "spiffe://mesh.test/dc/dc9/svc/api", "api"]
)
async def test_an_inbound_caller_must_be_an_identity_of_this_mesh(
    api: ControllerApi, peer: str
) -> None:
    await api.handle(_post(_with([_series("inbound", "web", peer)])))
    assert await _rows(api) == {}


async def test_the_agents_overflow_series_and_outbound_tcp_are_kept(api: ControllerApi) -> None:
    tcp = [
        {"direction": d, "service": s, "opened": 1, "closed": 1, "bytes_in": 5, "bytes_out": 5}
        for d, s in (("inbound", "web"), ("outbound", "payments"), ("inbound", "payments"))
    ]
    doc = _with([_series("inbound", "overflow", "overflow")], tcp=tcp)
    with structlog.testing.capture_logs() as logs:
        assert (await api.handle(_post(doc))).status == 200
    (event,) = [e for e in logs if e["event"] == "metrics_series_unattributed"]
    assert event["service"] == "payments" and "TCP figures for 'payments'" in event["why"]
    answer = _doc(await api.handle(_get("window=1m&by=service")))
    assert {r["name"] for r in answer["rows"]} == {"overflow", "web"}
    assert answer["overflow"]["unattributed"] == 1  # inbound TCP of payments


class Changing:
    """A node whose services change, counting how often Consul is asked."""

    def __init__(self) -> None:
        self.services = frozenset({"web"})
        self.asked = 0

    async def node(self, name: str) -> NodeInfo | None:
        self.asked += 1
        return NodeInfo(name, "198.18.0.1", self.services, alive=True)


async def test_consul_is_asked_again_for_an_uncovered_label_at_most_once_per_recheck(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodemesh.controller import api as api_module

    consul = Changing()
    api = ControllerApi(ca, consul, "token", DC, 3600, clock=lambda: T0 + 15)
    await api.handle(_post(_with([_series("inbound", "web", "")], seq=0)))
    await api.handle(_post(_with([_series("inbound", "web", "")], seq=1)))
    assert consul.asked == 1  # cached
    consul.services = frozenset({"web", "shop"})  # shop registered on host-a since
    await api.handle(_post(_with([_series("inbound", "shop", "")], seq=2)))
    assert consul.asked == 1 and await _rows(api) == {"web": 2}  # within NODE_RECHECK_S
    monkeypatch.setattr(api_module, "NODE_RECHECK_S", 0.0)
    await api.handle(_post(_with([_series("inbound", "shop", "")], seq=3)))
    assert consul.asked == 2 and await _rows(api) == {"web": 2, "shop": 1}
