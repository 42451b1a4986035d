"""The agent's view of the catalog, built from Consul's health entries: pure, no I/O.

Theory of operation
-------------------
Watches (``discovery/watch.py``) keep the raw ``/v1/health/service/<name>`` answer of every
service.  After any change, ``build()`` turns that raw map into one immutable ``Snapshot`` which the
data path reads without locks: the proxy swaps a reference, never mutates.

* A node is *meshed* when a nodemesh agent is registered on it (service ``nodemesh``); the agent's
  registration says where its inbound listener is.
* An instance address ``ip:port`` of a service on a meshed node resolves to that service
  (``resolve``).  Everything else is egress and passes through untouched.
* A service's *endpoints* are its instances whose own checks pass and whose node's agent passes:
  a node whose agent is down cannot terminate mTLS, so it gets no traffic.

Consul data is input from outside: an entry with a missing or bad field is skipped and reported
in ``Snapshot.rejected`` instead of failing the whole snapshot.  A registration says where a
service claims to be, not that the address is safe to reach: an instance on this node counts as
local (the inbound side delivers to it) only when its address is one of this host's own, which
the kernel decides (``host_address``, the one system call here; tests pass their own).  Without
that, a service registered at 169.254.169.254 would let any mesh caller reach the metadata
endpoint through this agent.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

AGENT_SERVICE = "nodemesh"
CONTROLLER_SERVICE = "nodemesh-controller"
# Infrastructure services are never meshed: their traffic is excluded from interception anyway.
UNMESHED_SERVICES = frozenset({"consul", AGENT_SERVICE, CONTROLLER_SERVICE})
# Meta.protocol values that override detection; anything else is ignored (and detected).
DECLARED_PROTOCOLS = frozenset({"tcp", "http", "http2", "grpc"})


@dataclass(frozen=True)
class Endpoint:
    """One healthy instance of a service, and the agent that fronts it."""

    service: str
    node: str
    address: str
    port: int
    peer: tuple[str, int]  # the inbound listener of the agent on ``node``

    def __repr__(self) -> str:
        return f"<Endpoint {self.service} {self.address}:{self.port} via {self.node}>"


@dataclass(frozen=True)
class Instance:
    service: str
    node: str
    address: str
    port: int
    passing: bool
    meta: Mapping[str, str]


@dataclass(frozen=True)
class Snapshot:
    local_node: str
    # instance ip:port -> service, for instances on meshed nodes
    by_addr: Mapping[tuple[str, int], str] = field(default_factory=dict)
    # service -> its healthy, meshed endpoints
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    # node -> the inbound address of its agent (any health)
    agents: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    # service -> protocol declared in its registration's Meta.protocol (DECLARED_PROTOCOLS)
    protocols: Mapping[str, str] = field(default_factory=dict)
    # services with an instance on this node, and those instances' addresses
    local: Mapping[str, frozenset[tuple[str, int]]] = field(default_factory=dict)
    # healthy nodemesh controllers (the API address agents call)
    controllers: tuple[tuple[str, int], ...] = ()
    # instance ip:port claimed by more than one service -> those services: refused for all
    ambiguous: Mapping[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    # human-readable reasons for entries that were skipped
    rejected: tuple[str, ...] = ()

    def resolve(self, ip: str, port: int) -> str | None:
        """The meshed service listening at ``ip:port``, or None for egress."""
        return self.by_addr.get((ip, port))

    def is_local_instance(self, service: str, ip: str, port: int) -> bool:
        return (ip, port) in self.local.get(service, frozenset())

    def __repr__(self) -> str:
        return (
            f"<Snapshot node={self.local_node} services={len(self.endpoints)} "
            f"agents={len(self.agents)} rejected={len(self.rejected)}>"
        )


def parse_entry(service: str, raw: Any) -> Instance:
    """One element of ``/v1/health/service/<name>``; raises ValueError naming the bad field."""
    if not isinstance(raw, Mapping):
        raise ValueError("entry is not an object")
    node, svc, checks = raw.get("Node"), raw.get("Service"), raw.get("Checks")
    if not isinstance(node, Mapping) or not isinstance(svc, Mapping):
        raise ValueError("entry lacks Node or Service")
    node_name = node.get("Node")
    if not isinstance(node_name, str) or not node_name:
        raise ValueError(f"Node.Node = {node_name!r} is not a node name")
    address: Any = svc.get("Address") or node.get("Address")
    try:
        if not isinstance(address, str):
            raise TypeError(address)
        address = str(ipaddress.ip_address(address))
    except (TypeError, ValueError):
        raise ValueError(f"Service.Address = {address!r} is not an IP address") from None
    port = svc.get("Port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"Service.Port = {port!r} is not a port number")
    if not isinstance(checks, list):
        raise ValueError(f"Checks = {checks!r} is not a list")
    passing = all(isinstance(c, Mapping) and c.get("Status") == "passing" for c in checks)
    meta_raw = svc.get("Meta")
    meta = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, Mapping) else {}
    return Instance(service, node_name, address, port, passing, meta)


def host_address(ip: str) -> bool:
    """Whether ``ip`` is an address of this host (its network namespace): the kernel lets a
    socket bind only to those.  Multicast and broadcast addresses bind too, so they are refused
    first.  (With ``net.ipv4.ip_nonlocal_bind=1`` the kernel binds any address: see
    docs/security.md.)"""
    addr = ipaddress.ip_address(ip)
    if addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        return False
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:  # no socket at all (out of descriptors, no IPv6): not provably ours, so not local
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def build(
    raw_by_service: Mapping[str, Any],
    local_node: str,
    own_address: Callable[[str], bool] = host_address,
) -> Snapshot:
    """The snapshot of ``raw_by_service`` as seen from ``local_node``; ``own_address`` says
    whether an address belongs to this host (only such instances are delivered to)."""
    rejected: list[str] = []
    own: dict[str, bool] = {}  # each address asked once per build
    instances: dict[str, list[Instance]] = {}
    for service, entries in raw_by_service.items():
        if not isinstance(entries, list):
            rejected.append(f"{service}: health answer is not a list")
            continue
        for raw in entries:
            try:
                instances.setdefault(service, []).append(parse_entry(service, raw))
            except ValueError as e:
                rejected.append(f"{service}: {e}")

    agents: dict[str, tuple[str, int]] = {}
    agent_passing: set[str] = set()
    for inst in instances.get(AGENT_SERVICE, []):
        agents[inst.node] = (inst.address, inst.port)
        if inst.passing:
            agent_passing.add(inst.node)

    controllers = tuple(
        (i.address, i.port) for i in instances.get(CONTROLLER_SERVICE, []) if i.passing
    )
    # An ip:port that two services claim belongs to neither: which one a caller meant cannot
    # be told, and picking one lets any registration take another service's traffic.
    claims: dict[tuple[str, int], set[str]] = {}
    for service, insts in instances.items():
        if service not in UNMESHED_SERVICES:
            for inst in insts:
                claims.setdefault((inst.address, inst.port), set()).add(service)
    ambiguous = {k: tuple(sorted(v)) for k, v in claims.items() if len(v) > 1}
    for (ip, port), names in sorted(ambiguous.items()):
        rejected.append(
            f"{ip}:{port} is registered by {len(names)} services ({', '.join(names)}); "
            "calls to it are refused until only one claims it"
        )
    by_addr: dict[tuple[str, int], str] = {}
    endpoints: dict[str, list[Endpoint]] = {}
    local: dict[str, set[tuple[str, int]]] = {}
    protocols: dict[str, str] = {}
    for service in sorted(instances):
        if service in UNMESHED_SERVICES:
            continue
        for inst in instances[service]:
            if (inst.address, inst.port) in ambiguous:
                endpoints.setdefault(service, [])
                continue
            declared = inst.meta.get("protocol", "").lower()
            if declared in DECLARED_PROTOCOLS:
                protocols.setdefault(service, declared)
            if inst.node == local_node:
                if inst.address not in own:
                    own[inst.address] = own_address(inst.address)
                if own[inst.address]:
                    local.setdefault(service, set()).add((inst.address, inst.port))
                else:  # nor routed from here: this host's calls to that address stay egress
                    rejected.append(
                        f"{service}: {inst.address}:{inst.port} is registered on this node but"
                        " is not an address of this host; not delivered to"
                    )
                    continue
            peer = agents.get(inst.node)
            if peer is None:
                continue  # no agent on that node: not meshed, its traffic is egress
            by_addr[inst.address, inst.port] = service
            if inst.passing and inst.node in agent_passing:
                endpoints.setdefault(service, []).append(
                    Endpoint(service, inst.node, inst.address, inst.port, peer)
                )
            else:
                endpoints.setdefault(service, [])
    return Snapshot(
        local_node=local_node,
        by_addr=by_addr,
        endpoints={s: tuple(e) for s, e in endpoints.items()},
        agents=agents,
        protocols=protocols,
        controllers=controllers,
        local={s: frozenset(a) for s, a in local.items()},
        ambiguous=ambiguous,
        rejected=tuple(rejected),
    )
