"""Snapshot building from Consul ``/v1/health/service/<name>`` answers, including hostile ones."""

from __future__ import annotations

import copy
import socket
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.discovery.snapshot import (
    AGENT_SERVICE,
    CONTROLLER_SERVICE,
    Endpoint,
    host_address,
    parse_entry,
)
from nodemesh.discovery.snapshot import build as build_on_host

# Node name -> address, as Consul's catalog would hold them.
NODES = {"h1": "198.18.0.1", "h2": "198.18.0.2", "h3": "198.18.0.3"}
INBOUND = 4143
# These tests play host h1, whose own address is 198.18.0.1 (the guard's own tests below ask
# the kernel instead).  h1 also owns the extra addresses the address-parsing tests register.
build = partial(build_on_host, own_address={NODES["h1"], "198.18.1.7", "2001:db8::1"}.__contains__)


def entry(
    node: str,
    service: str,
    port: int | Any,
    *,
    address: Any = "",
    status: str = "passing",
    serf: str = "passing",
    meta: Any = None,
) -> dict[str, Any]:
    """One element of Consul 1.8's ``/v1/health/service/<service>`` answer, with every field."""
    sid = f"{service}-{node}-{port}"
    return {
        "Node": {
            "ID": f"00000000-0000-0000-0000-00000000000{node[-1]}",
            "Node": node,
            "Address": NODES.get(node, "198.18.0.99"),
            "Datacenter": "dc1",
            "TaggedAddresses": {"lan": NODES.get(node, ""), "wan": NODES.get(node, "")},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 10,
            "ModifyIndex": 12,
        },
        "Service": {
            "ID": sid,
            "Service": service,
            "Tags": [],
            "Address": address,
            "Meta": meta if meta is not None else {},
            "Port": port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Proxy": {"MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "CreateIndex": 20,
            "ModifyIndex": 20,
        },
        "Checks": [
            {
                "Node": node,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": serf,
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Definition": {},
                "CreateIndex": 10,
                "ModifyIndex": 10,
            },
            {
                "Node": node,
                "CheckID": f"service:{sid}",
                "Name": f"Service '{service}' check",
                "Status": status,
                "Notes": "",
                "Output": "HTTP GET http://localhost/health: 200 OK",
                "ServiceID": sid,
                "ServiceName": service,
                "ServiceTags": [],
                "Type": "http",
                "Definition": {},
                "CreateIndex": 21,
                "ModifyIndex": 21,
            },
        ],
    }


def agent(node: str, status: str = "passing", serf: str = "passing") -> dict[str, Any]:
    return entry(node, AGENT_SERVICE, INBOUND, status=status, serf=serf)


def mesh(**services: list[Any]) -> dict[str, Any]:
    """A health map with agents on h1 and h2 (h3 is not meshed) plus ``services``."""
    out: dict[str, Any] = {AGENT_SERVICE: [agent("h1"), agent("h2")]}
    out.update(services)
    return out


def peer(node: str) -> tuple[str, int]:
    return (NODES[node], INBOUND)


# --- the common case ----------------------------------------------------------------------------


def test_meshed_and_unmeshed_nodes() -> None:
    snap = build(
        mesh(web=[entry("h1", "web", 8080), entry("h2", "web", 8080), entry("h3", "web", 8080)]),
        "h1",
    )
    assert snap.rejected == ()
    assert snap.agents == {"h1": peer("h1"), "h2": peer("h2")}
    assert snap.endpoints["web"] == (
        Endpoint("web", "h1", "198.18.0.1", 8080, peer("h1")),
        Endpoint("web", "h2", "198.18.0.2", 8080, peer("h2")),
    )
    assert snap.resolve("198.18.0.1", 8080) == "web"
    assert snap.resolve("198.18.0.2", 8080) == "web"
    assert snap.resolve("198.18.0.3", 8080) is None  # h3 has no agent: egress
    assert snap.resolve("198.18.0.1", 8081) is None
    assert repr(snap) == "<Snapshot node=h1 services=1 agents=2 rejected=0>"
    assert repr(snap.endpoints["web"][1]) == "<Endpoint web 198.18.0.2:8080 via h2>"


def test_infrastructure_services_are_never_meshed() -> None:
    raw = mesh(
        consul=[entry("h1", "consul", 8300)],
        **{CONTROLLER_SERVICE: [entry("h2", CONTROLLER_SERVICE, 4190)]},
    )
    snap = build(raw, "h1")
    assert set(snap.endpoints) == set()
    assert snap.resolve("198.18.0.1", 8300) is None
    assert snap.resolve("198.18.0.1", INBOUND) is None  # the agent's own listener
    assert snap.local == {}


# --- health -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["critical", "warning", "maintenance", "", None])
def test_failing_instance_check_keeps_address_but_not_endpoint(status: Any) -> None:
    snap = build(
        mesh(web=[entry("h1", "web", 8080), entry("h2", "web", 8080, status=status)]), "h1"
    )
    assert [e.node for e in snap.endpoints["web"]] == ["h1"]
    # Still the mesh's address: traffic to it is balanced to healthy instances, not passed through.
    assert snap.resolve("198.18.0.2", 8080) == "web"


def test_failing_node_check_drops_the_instance() -> None:
    snap = build(
        mesh(web=[entry("h1", "web", 8080), entry("h2", "web", 8080, serf="critical")]), "h1"
    )
    assert [e.node for e in snap.endpoints["web"]] == ["h1"]


def test_failing_agent_check_drops_every_instance_on_that_node() -> None:
    raw = mesh(web=[entry("h1", "web", 8080), entry("h2", "web", 8080)])
    raw[AGENT_SERVICE] = [agent("h1"), agent("h2", status="critical")]
    snap = build(raw, "h1")
    assert [e.node for e in snap.endpoints["web"]] == ["h1"]
    assert snap.agents["h2"] == peer("h2")  # known, whatever its health
    assert snap.resolve("198.18.0.2", 8080) == "web"


def test_a_service_with_no_healthy_instance_is_known_and_empty() -> None:
    snap = build(mesh(web=[entry("h2", "web", 8080, status="critical")]), "h1")
    assert snap.endpoints == {"web": ()}  # known but empty (503), unlike an unknown one (egress)


def test_empty_answer() -> None:
    snap = build(mesh(web=[]), "h1")
    assert "web" not in snap.endpoints
    assert snap.rejected == ()


def test_no_agents_at_all_means_everything_is_egress() -> None:
    snap = build({"web": [entry("h1", "web", 8080)]}, "h1")
    assert snap.agents == {}
    assert snap.by_addr == {}
    assert snap.endpoints == {}
    assert snap.local == {"web": frozenset({("198.18.0.1", 8080)})}


# --- addresses ----------------------------------------------------------------------------------


def test_address_falls_back_to_node_address() -> None:
    no_key = entry("h2", "web", 8080)
    del no_key["Service"]["Address"]
    snap = build(mesh(web=[entry("h1", "web", 8080, address=""), no_key]), "h1")
    assert {(e.address, e.port) for e in snap.endpoints["web"]} == {
        ("198.18.0.1", 8080),
        ("198.18.0.2", 8080),
    }


def test_service_address_wins_over_node_address() -> None:
    snap = build(mesh(web=[entry("h1", "web", 8080, address="198.18.1.7")]), "h1")
    assert snap.resolve("198.18.1.7", 8080) == "web"
    assert snap.resolve("198.18.0.1", 8080) is None
    assert snap.endpoints["web"][0].peer == peer("h1")  # still reached through h1's agent


def test_ipv6_address_is_normalised() -> None:
    snap = build(mesh(web=[entry("h1", "web", 8080, address="2001:DB8:0::1")]), "h1")
    assert snap.resolve("2001:db8::1", 8080) == "web"


def test_an_address_two_services_claim_belongs_to_neither_and_is_reported() -> None:
    """Picking one (it was the first by name) let a registration named ``aaa`` at payments'
    address take payments' traffic; which service a caller meant cannot be told."""
    raw = mesh(
        payments=[entry("h1", "payments", 8080), entry("h2", "payments", 8080)],
        aaa=[entry("h1", "aaa", 8080)],
    )
    for node in ("h1", "h2"):  # the claimed address's own host, and a caller's
        snap = build_on_host(raw, node, own_address={NODES[node]}.__contains__)
        assert snap.ambiguous == {("198.18.0.1", 8080): ("aaa", "payments")}
        assert snap.resolve("198.18.0.1", 8080) is None
        assert not snap.is_local_instance("payments", "198.18.0.1", 8080)
        assert not snap.is_local_instance("aaa", "198.18.0.1", 8080)
        assert snap.rejected == (
            "198.18.0.1:8080 is registered by 2 services (aaa, payments); "
            "calls to it are refused until only one claims it",
        )
        # payments' other instance is untouched; aaa has no endpoint left
        assert [e.address for e in snap.endpoints["payments"]] == ["198.18.0.2"]
        assert snap.endpoints["aaa"] == ()
        assert snap.resolve("198.18.0.2", 8080) == "payments"


def test_one_service_registered_twice_at_one_address_is_not_ambiguous() -> None:
    raw = mesh(web=[entry("h1", "web", 8080), entry("h1", "web", 8080)])
    snap = build(raw, "h1")
    assert snap.ambiguous == {} and snap.resolve("198.18.0.1", 8080) == "web"


# --- local services, protocols, controllers -----------------------------------------------------


def test_local_services() -> None:
    raw = mesh(
        web=[entry("h1", "web", 8080), entry("h1", "web", 8081), entry("h2", "web", 8080)],
        db=[entry("h2", "db", 5432)],
    )
    snap = build(raw, "h1")
    assert snap.local == {"web": frozenset({("198.18.0.1", 8080), ("198.18.0.1", 8081)})}
    assert snap.is_local_instance("web", "198.18.0.1", 8081)
    assert not snap.is_local_instance("web", "198.18.0.2", 8080)
    assert not snap.is_local_instance("db", "198.18.0.2", 5432)
    assert not snap.is_local_instance("nope", "198.18.0.1", 8080)


def test_local_instance_counts_even_when_unhealthy() -> None:
    snap = build(mesh(web=[entry("h1", "web", 8080, status="critical")]), "h1")
    assert snap.is_local_instance("web", "198.18.0.1", 8080)


def test_protocols_from_meta() -> None:
    raw = mesh(
        web=[entry("h1", "web", 8080, meta={"protocol": "HTTP"})],
        db=[entry("h1", "db", 5432, meta={"protocol": "tcp", "version": 3})],
        rpc=[entry("h1", "rpc", 9090, meta={"protocol": "grpc"})],
        plain=[entry("h1", "plain", 7000)],
        odd=[entry("h1", "odd", 7001, meta=["protocol", "http"])],
        sctp=[entry("h1", "sctp", 7002, meta={"protocol": "sctp"})],  # unknown: detected
    )
    snap = build(raw, "h1")
    assert snap.protocols == {"web": "http", "db": "tcp", "rpc": "grpc"}
    assert snap.rejected == ()


def test_first_declared_protocol_wins() -> None:
    raw = mesh(
        web=[
            entry("h1", "web", 8080, meta={}),
            entry("h2", "web", 8080, meta={"protocol": "tcp"}),
            entry("h2", "web", 8081, meta={"protocol": "http"}),
        ]
    )
    assert build(raw, "h1").protocols == {"web": "tcp"}


def test_controllers_are_the_passing_ones() -> None:
    raw = mesh(
        **{
            CONTROLLER_SERVICE: [
                entry("h1", CONTROLLER_SERVICE, 4190),
                entry("h2", CONTROLLER_SERVICE, 4190, status="critical"),
                entry("h3", CONTROLLER_SERVICE, 4190, address="198.18.2.3"),
            ]
        }
    )
    assert build(raw, "h1").controllers == (("198.18.0.1", 4190), ("198.18.2.3", 4190))


# --- hostile input ------------------------------------------------------------------------------


def _mutate(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    bad = entry("h2", "web", 8080)
    target: Any = bad
    for p in path[:-1]:
        target = target[p]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return bad


_DELETE = object()

HOSTILE = [
    pytest.param(("Node",), _DELETE, "entry lacks Node or Service", id="no-node"),
    pytest.param(("Service",), _DELETE, "entry lacks Node or Service", id="no-service"),
    pytest.param(("Node",), "h2", "entry lacks Node or Service", id="node-string"),
    pytest.param(("Service",), [1], "entry lacks Node or Service", id="service-list"),
    pytest.param(("Node", "Node"), _DELETE, "Node.Node = None is not a node name", id="no-name"),
    pytest.param(("Node", "Node"), "", "Node.Node = '' is not a node name", id="empty-name"),
    pytest.param(("Node", "Node"), 7, "Node.Node = 7 is not a node name", id="int-name"),
    pytest.param(("Service", "Address"), "web.local", "'web.local' is not an IP", id="dns-name"),
    pytest.param(("Service", "Address"), "999.1.1.1", "is not an IP address", id="bad-ip"),
    pytest.param(("Service", "Address"), ["198.18.0.2"], "is not an IP address", id="ip-list"),
    pytest.param(("Node", "Address"), "nope", "Service.Address = 'nope' is not", id="bad-node-ip"),
    pytest.param(("Node", "Address"), _DELETE, "Service.Address = None is not", id="no-address"),
    pytest.param(("Service", "Port"), 0, "Service.Port = 0 is not a port number", id="port-0"),
    pytest.param(("Service", "Port"), 70000, "Service.Port = 70000 is not", id="port-70000"),
    pytest.param(("Service", "Port"), "80", "Service.Port = '80' is not a port", id="port-str"),
    pytest.param(("Service", "Port"), True, "Service.Port = True is not a port", id="port-bool"),
    pytest.param(("Service", "Port"), -1, "Service.Port = -1 is not a port", id="port-neg"),
    pytest.param(("Service", "Port"), 8080.0, "Service.Port = 8080.0 is not", id="port-float"),
    pytest.param(("Service", "Port"), _DELETE, "Service.Port = None is not", id="no-port"),
]


@pytest.mark.parametrize(("path", "value", "reason"), HOSTILE)
def test_hostile_entry_is_rejected_and_the_rest_survive(
    path: tuple[str, ...], value: Any, reason: str
) -> None:
    bad = _mutate(path, value)
    if path == ("Node", "Address"):
        bad["Service"]["Address"] = ""  # force the fallback onto the bad node address
    snap = build(mesh(web=[entry("h1", "web", 8080), bad, entry("h2", "web", 8081)]), "h1")
    assert len(snap.rejected) == 1, snap.rejected
    assert snap.rejected[0].startswith("web: ")
    assert reason in snap.rejected[0]
    assert [(e.node, e.port) for e in snap.endpoints["web"]] == [("h1", 8080), ("h2", 8081)]


@pytest.mark.parametrize("raw", [42, "x", None, [], ["Node"], {}], ids=repr)
def test_entry_that_is_not_an_object(raw: Any) -> None:
    snap = build(mesh(web=[raw, entry("h1", "web", 8080)]), "h1")
    assert len(snap.rejected) == 1
    assert snap.rejected[0] in ("web: entry is not an object", "web: entry lacks Node or Service")
    assert len(snap.endpoints["web"]) == 1


@pytest.mark.parametrize("answer", [None, {"Node": {}}, "[]", 0], ids=repr)
def test_answer_that_is_not_a_list(answer: Any) -> None:
    snap = build(mesh(web=answer, db=[entry("h2", "db", 5432)]), "h1")
    assert snap.rejected == ("web: health answer is not a list",)
    assert "web" not in snap.endpoints
    assert [e.port for e in snap.endpoints["db"]] == [5432]


def test_hostile_agent_entry_unmeshes_only_its_node() -> None:
    raw = mesh(web=[entry("h1", "web", 8080), entry("h2", "web", 8080)])
    raw[AGENT_SERVICE][1]["Service"]["Port"] = "4143"
    snap = build(raw, "h1")
    assert snap.rejected == ("nodemesh: Service.Port = '4143' is not a port number",)
    assert list(snap.agents) == ["h1"]
    assert snap.resolve("198.18.0.2", 8080) is None


def test_odd_meta_and_checks_values_do_not_break_parsing() -> None:
    e = entry("h1", "web", 8080, meta={"protocol": None, 3: ["x"]})
    inst = parse_entry("web", e)
    assert inst.meta == {"protocol": "None", "3": "['x']"}
    e["Checks"].append("garbage")
    assert parse_entry("web", e).passing is False  # a check we cannot read is not passing


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
_FIELDS = [
    ("Node",),
    ("Service",),
    ("Checks",),
    ("Node", "Node"),
    ("Node", "Address"),
    ("Service", "Address"),
    ("Service", "Port"),
    ("Service", "Meta"),
]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(_FIELDS), value=_json, whole=st.none() | _json)
def test_build_never_raises_and_keeps_the_good_entry(
    field: tuple[str, ...], value: Any, whole: Any
) -> None:
    good = entry("h1", "web", 8080)
    bad = _mutate(field, copy.deepcopy(value))
    raw = mesh(web=[bad, good] + ([whole] if whole is not None else []))
    snap = build(raw, "h1")
    assert Endpoint("web", "h1", "198.18.0.1", 8080, peer("h1")) in snap.endpoints["web"]


# --- values that slip through -------------------------------------------------------------------


@pytest.mark.parametrize("address", [3232235777, True], ids=repr)
def test_non_string_address_is_rejected(address: Any) -> None:
    snap = build(mesh(web=[entry("h2", "web", 8080, address=address)]), "h1")
    assert snap.rejected == (f"web: Service.Address = {address!r} is not an IP address",)


@pytest.mark.parametrize("checks", [None, "passing", {"Status": "critical"}], ids=repr)
def test_unreadable_checks_are_rejected(checks: Any) -> None:
    bad = entry("h2", "web", 8080, status="critical")
    bad["Checks"] = checks
    snap = build(mesh(web=[entry("h1", "web", 8080), bad]), "h1")
    assert [e.node for e in snap.endpoints["web"]] == ["h1"]
    assert len(snap.rejected) == 1


# --- only this host's own addresses are delivered to ---------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("169.254.169.254", id="metadata-endpoint"),
        pytest.param("198.18.0.2", id="another-host"),
        pytest.param("224.0.0.1", id="multicast"),
        pytest.param("255.255.255.255", id="broadcast"),
    ],
)
def test_instance_at_an_address_not_of_this_host_is_not_local(address: str) -> None:
    """A service registered on this node at an address the host does not own (the cloud's
    metadata endpoint, another host) is not a local instance, so the inbound side refuses to
    deliver there; other nodes still see it where it claims to be."""
    snap = build_on_host(mesh(meta=[entry("h1", "meta", 80, address=address)]), "h1")
    assert snap.local == {}
    assert not snap.is_local_instance("meta", address, 80)
    assert snap.resolve(address, 80) is None  # this host's own calls there pass as egress
    assert snap.endpoints.get("meta", ()) == ()
    assert snap.rejected == (
        f"meta: {address}:80 is registered on this node but is not an address of this host;"
        " not delivered to",
    )


def test_loopback_and_own_interface_addresses_are_local() -> None:
    snap = build_on_host(
        mesh(
            web=[
                entry("h1", "web", 8080, address="127.0.0.1"),
                entry("h1", "web", 8081, address="::1"),
            ]
        ),
        "h1",
    )
    assert snap.local == {"web": frozenset({("127.0.0.1", 8080), ("::1", 8081)})}
    assert snap.rejected == ()


def test_host_address_asks_the_kernel() -> None:
    assert host_address("127.0.0.1")
    assert host_address("127.0.0.2")  # all of 127/8 is this host's on Linux
    assert not host_address("169.254.169.254")
    assert not host_address("198.18.250.250")  # no test creates this one
    with socket.socket() as s:  # an address in use still counts: the probe binds port 0
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert host_address("127.0.0.1")


def test_host_address_without_a_socket_is_not_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors, the probe cannot ask the kernel: the answer is "not ours", never an
    exception out of the snapshot build (which would stop the catalog watch)."""

    def no_socket(*args: Any, **kwargs: Any) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert not host_address("127.0.0.1")
