"""What ``nodemesh check`` gathers about a host, as plain frozen values, and the pure parsers
that turn raw text from the kernel and from HTTP into them.

``gather.py`` fills these in (all of the I/O); ``checks.py`` judges them (none of it).  A fact
that could not be read carries the reason in an ``error`` field instead of raising, so one
broken probe never hides the others.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodemesh.agent.iptables import InterceptionStatus
from nodemesh.config import AgentConfig

TCP_LISTEN = 0x0A  # the "st" column of /proc/net/tcp for a listening socket


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, or why there was none (``error`` set: refused, timed out, garbled)."""

    status: int = 0
    body: bytes = b""
    date: str | None = None  # the Date header, when the server sent one
    at: float = 0.0  # local epoch seconds when the answer's head arrived
    error: str = ""

    @property
    def answered(self) -> bool:
        return not self.error

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class Socket:
    """A listening TCP socket of this network namespace, from ``/proc/net/tcp{,6}``.

    ``uid`` is the socket's owner: the uid iptables' owner match sees on every connection the
    same process opens.
    """

    ip: str
    port: int
    uid: int
    inode: int


@dataclass(frozen=True)
class Owner:
    """A process holding a socket (found through ``/proc/<pid>/fd``).

    Under systemd socket activation pid 1 holds the agent's listeners too, and created them as
    root: the uid that iptables must exclude is the agent *process*'s, never the socket's.
    """

    pid: int
    command: str
    uid: int | None  # effective uid: what the agent's outgoing sockets carry


def agent_process(owners: Iterable[Owner]) -> Owner | None:
    """The agent among a listener's holders: not pid 1 (systemd keeps activated sockets)."""
    return next((o for o in owners if o.pid != 1), None)


@dataclass(frozen=True)
class CertFacts:
    """One persisted identity file, ``<state_dir>/identity/<kind>-<name>.pem`` (key + chain)."""

    what: str  # "node h1", "service web": how messages name it
    expected: str  # the SPIFFE URI the certificate must carry
    path: Path
    error: str = ""  # missing, unreadable or not a key and certificate: why
    identity: str | None = None  # the URI SAN the certificate carries
    not_before: float = 0.0
    not_after: float = 0.0
    chain_error: str = ""  # empty when the chain verifies against controller.ca_file
    key_matches: bool = True


@dataclass(frozen=True)
class RootsFacts:
    """The mesh CA the operator installed (``controller.ca_file``)."""

    path: Path
    error: str = ""
    count: int = 0
    not_after: float = 0.0  # the earliest expiry among the roots


@dataclass(frozen=True)
class ControllerFacts:
    """One metrics query to the controller over mTLS, as ``nodemesh stat`` makes it."""

    address: str = ""
    error: str = ""
    # "no-controller" (none in Consul), "credentials" (no node certificate to present),
    # "unreachable", "refused": what went wrong, so the hint can say what to do.
    kind: str = ""
    window_end: float | None = None  # the answer's window end: the controller's clock, to 10 s
    at: float = 0.0  # local epoch seconds when the answer arrived


@dataclass(frozen=True)
class IptablesFacts:
    """The nat table as read (never changed) through ``agent/iptables``."""

    error: str = ""
    status: InterceptionStatus | None = None
    lines: tuple[str, ...] = ()  # nodemesh's own lines of ``iptables -t nat -S``


@dataclass(frozen=True)
class AgentFacts:
    """Everything ``nodemesh check`` looks at on an agent host."""

    cfg: AgentConfig
    config_path: Path
    now: float
    consul_leader: Reply
    consul_node: Reply  # /v1/catalog/node/<node>
    consul_checks: Reply  # /v1/health/node/<node>
    controller: ControllerFacts
    roots: RootsFacts
    certs: tuple[CertFacts, ...]  # the node's first, then one per service
    iptables: IptablesFacts
    sockets: tuple[Socket, ...] | None  # None: /proc/net/tcp could not be read
    owners: Mapping[int, tuple[Owner, ...]] = field(default_factory=dict)  # inode -> holders
    live: Reply = Reply(error="not asked")
    ready: Reply = Reply(error="not asked")


@dataclass(frozen=True)
class StateDirFacts:
    path: Path
    exists: bool
    writable: bool  # the directory itself when it exists, else its nearest existing parent
    parent: Path  # the nearest existing ancestor when the directory does not exist


@dataclass(frozen=True)
class PreFacts:
    """What ``nodemesh check --pre`` looks at before the agent is installed."""

    cfg: AgentConfig
    config_path: Path
    config_found: bool
    now: float
    euid: int
    cap_net_admin: bool
    python: tuple[int, int, int]
    user_uid: int | None  # the nodemesh user's uid; None when there is no such user
    user_name: str
    iptables_path: str | None
    iptables: IptablesFacts
    matches: frozenset[str] | None  # /proc/net/ip_tables_matches; None when unreadable
    targets: frozenset[str] | None  # /proc/net/ip_tables_targets
    modules: frozenset[str]  # xt_owner / xt_REDIRECT found among the loadable modules
    state_dir: StateDirFacts
    sockets: tuple[Socket, ...] | None
    owners: Mapping[int, tuple[Owner, ...]]
    consul_leader: Reply


@dataclass(frozen=True)
class Instance:
    """A service instance Consul's catalog has on this node."""

    id: str
    service: str
    port: int
    address: str = ""  # the service's own Address, else the node's


@dataclass(frozen=True)
class NodeCheck:
    """One health check on this node (``serfHealth`` for the node itself, else a service's)."""

    check_id: str
    name: str
    status: str  # passing, warning, critical
    output: str
    service_id: str  # empty for node checks


@dataclass(frozen=True)
class CatalogNode:
    """``/v1/catalog/node/<node>``: the node's address and the instances registered on it."""

    address: str
    instances: tuple[Instance, ...]


# --- pure parsers --------------------------------------------------------------------------------


def parse_catalog_node(reply: Reply) -> CatalogNode | None:
    """The node from Consul's answer; None when Consul does not know it.  ValueError when the
    answer is not what Consul sends."""
    doc = reply.json()
    if doc is None:
        return None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("Node"), Mapping):
        raise ValueError("the answer has no Node object")
    address = doc["Node"].get("Address")
    services = doc.get("Services") or {}
    if not isinstance(services, Mapping):
        raise ValueError("Services is not an object")
    out = []
    for sid, svc in sorted(services.items()):
        if not isinstance(svc, Mapping):
            continue
        name, port = svc.get("Service"), svc.get("Port")
        where = svc.get("Address") or address
        if isinstance(name, str) and name and isinstance(port, int):
            out.append(Instance(str(sid), name, port, where if isinstance(where, str) else ""))
    return CatalogNode(address if isinstance(address, str) else "", tuple(out))


def parse_node_checks(reply: Reply) -> list[NodeCheck]:
    """``/v1/health/node/<node>``; ValueError when the answer is not a list of checks."""
    doc = reply.json()
    if not isinstance(doc, list):
        raise ValueError("the answer is not a list of checks")
    out = []
    for c in doc:
        if not isinstance(c, Mapping):
            continue
        out.append(
            NodeCheck(
                check_id=str(c.get("CheckID") or ""),
                name=str(c.get("Name") or c.get("CheckID") or ""),
                status=str(c.get("Status") or "unknown"),
                output=str(c.get("Output") or ""),
                service_id=str(c.get("ServiceID") or ""),
            )
        )
    return out


def _hex_ip(text: str) -> str:
    """A /proc/net/tcp address: 32-bit words in host byte order, printed as hex."""
    words = [int(text[i : i + 8], 16) for i in range(0, len(text), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    return str(ipaddress.ip_address(raw))


def parse_proc_net_tcp(text: str) -> list[Socket]:
    """The listening sockets in ``/proc/net/tcp`` or ``/proc/net/tcp6``; odd lines are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            local, state, uid, inode = cols[1], int(cols[3], 16), int(cols[7]), int(cols[9])
            if state != TCP_LISTEN:
                continue
            host, _, port = local.partition(":")
            out.append(Socket(_hex_ip(host), int(port, 16), uid, inode))
        except ValueError:
            continue
    return out


def listener_at(sockets: tuple[Socket, ...], addr: tuple[str, int]) -> Socket | None:
    """The listening socket bound exactly to ``addr``."""
    want = str(ipaddress.ip_address(addr[0]))
    return next((s for s in sockets if s.port == addr[1] and s.ip == want), None)


def port_holders(sockets: tuple[Socket, ...], addr: tuple[str, int]) -> list[Socket]:
    """Listening sockets that would stop a bind to ``addr`` (same port, and the same address or
    a wildcard on either side)."""
    ip = ipaddress.ip_address(addr[0])
    out = []
    for s in sockets:
        other = ipaddress.ip_address(s.ip)
        if s.port != addr[1]:
            continue
        if other == ip or other.is_unspecified or ip.is_unspecified:
            out.append(s)
    return out


def parse_http_date(value: str | None) -> float | None:
    """Epoch seconds of an HTTP ``Date`` header, or None when absent or not a date."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_names(text: str) -> frozenset[str]:
    """``/proc/net/ip_tables_matches`` and ``_targets``: one extension name per line."""
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def parse_effective_uid(status_text: str) -> int | None:
    """The effective uid from ``/proc/<pid>/status`` (``Uid: real effective saved fs``)."""
    for line in status_text.splitlines():
        if line.startswith("Uid:"):
            try:
                return int(line.split()[2])
            except (IndexError, ValueError):
                return None
    return None


def admin_target(cfg: AgentConfig) -> tuple[str, int]:
    """Where to reach the admin listener from this host (a wildcard means loopback)."""
    host, port = cfg.admin_addr
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), port


def parse_capabilities(status_text: str) -> int:
    """The effective capability mask from ``/proc/self/status`` (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return 0
    return 0
