"""``nodemesh check``'s I/O: read what the host looks like, change nothing.

Everything here only reads: Consul's and the admin listener's HTTP answers, one metrics query
to the controller (as ``nodemesh stat`` makes it), the nat table through ``agent/iptables``
(``iptables -t nat -S``), the kernel's socket table and extension lists under ``/proc``, and the
certificate files in the state dir.  Probes run concurrently, each under its own timeout, and
a probe that fails records why in its fact instead of raising.

Consul is asked over plain HTTP here rather than through ``discovery/consul``: the check needs
the raw status codes and the ``Date`` header (to compare clocks), which the catalog client
does not expose.  The listeners are found in ``/proc/net/tcp`` rather than by connecting, so
the check does not make the agent log a refused direct connection on every run; the socket
table also says which uid holds the outbound port, which is the uid iptables must exclude.
"""

from __future__ import annotations

import os
import platform
import pwd
import re
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import h11
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from nodemesh.agent import iptables
from nodemesh.check.facts import (
    AgentFacts,
    CertFacts,
    ControllerFacts,
    IptablesFacts,
    Owner,
    PreFacts,
    Reply,
    RootsFacts,
    Socket,
    StateDirFacts,
    listener_at,
    parse_capabilities,
    parse_catalog_node,
    parse_names,
    parse_proc_net_tcp,
    port_holders,
)
from nodemesh.config import AgentConfig
from nodemesh.discovery.snapshot import UNMESHED_SERVICES
from nodemesh.errors import ConfigError, IdentityError, NodemeshError
from nodemesh.identity import keys, spiffe
from nodemesh.telemetry import query

PROBE_TIMEOUT = 3.0  # seconds for one local HTTP answer (Consul agent, admin listener)
CONTROLLER_TIMEOUT = 5.0  # seconds for finding and asking the controller; as nodemesh stat
MAX_BODY = 4 * 1024 * 1024  # a node's checks with many services stay far below this
NODEMESH_USER = "nodemesh"
PROC = Path("/proc")
CAP_NET_ADMIN = 12
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)
T = TypeVar("T")


# --- HTTP ----------------------------------------------------------------------------------------


async def http_get(
    host: str, port: int, path: str, headers: Iterable[tuple[str, str]] = ()
) -> Reply:
    """One plain HTTP/1.1 GET; never raises for network trouble (the Reply says what went wrong).
    The timeout belongs to the caller."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as e:
        return Reply(error=connect_error(e))
    async with stream:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        try:
            req = h11.Request(
                method="GET",
                target=path,
                headers=[("host", f"{host}:{port}"), ("connection", "close"), *headers],
            )
            await stream.send_all((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            status, date, at, chunks, size = 0, None, 0.0, [], 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    at = time.time()
                    status = event.status_code
                    found = [v for k, v in event.headers if k == b"date"]
                    date = found[0].decode("latin-1") if found else None
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_BODY:
                        return Reply(error=f"answer larger than {MAX_BODY} bytes")
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Reply(status, b"".join(chunks), date, at)
                else:  # ConnectionClosed before the end
                    return Reply(error="connection closed before the answer ended")
        except (trio.BrokenResourceError, OSError) as e:
            return Reply(error=f"connection failed: {e}")
        except h11.ProtocolError as e:
            return Reply(error=f"not an HTTP answer: {e}")


def connect_error(e: OSError) -> str:
    """ "connection refused" rather than trio's "all attempts to connect ... failed"."""
    causes = getattr(e.__cause__, "exceptions", None) or [e]
    first = causes[0]
    if isinstance(first, OSError) and first.errno is not None:
        return os.strerror(first.errno).lower()
    return str(e)


async def probe(host: str, port: int, path: str, headers: Iterable[tuple[str, str]] = ()) -> Reply:
    with trio.move_on_after(PROBE_TIMEOUT):
        return await http_get(host, port, path, headers)
    return Reply(error=f"no answer within {PROBE_TIMEOUT:g}s")


def _consul_headers(cfg: AgentConfig) -> list[tuple[str, str]]:
    return [("x-consul-token", cfg.consul_token)] if cfg.consul_token else []


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


# --- controller ----------------------------------------------------------------------------------


async def controller_facts(cfg: AgentConfig) -> ControllerFacts:
    """Ask the controller for the last 10 s of service rows with the node certificate."""
    try:
        roots_file, pair = query.agent_paths(cfg)
        creds = query.load_credentials(roots_file, pair)
    except ConfigError as e:
        return ControllerFacts(error=str(e), kind="credentials")
    address = cfg.controller_address
    try:
        with trio.fail_after(CONTROLLER_TIMEOUT):
            if not address:
                found = await query.find_controller(cfg.consul_addr)
                if found is None:
                    return ControllerFacts(
                        error="Consul has no passing nodemesh-controller", kind="no-controller"
                    )
                address = found
            answer = await query.fetch_answer(address, "10s", "service", creds)
    except trio.TooSlowError:
        return ControllerFacts(
            address, f"no answer within {CONTROLLER_TIMEOUT:g}s", kind="unreachable"
        )
    except ConfigError as e:  # the controller refused our query
        return ControllerFacts(address, str(e), kind="refused")
    except IdentityError as e:  # ControllerUnavailable, or our key and certificate do not load
        kind = "unreachable" if address else "no-controller"
        return ControllerFacts(address, str(e), kind=kind)
    except NodemeshError:  # ConsulUnavailable while looking for the controller
        where = f"{cfg.consul_addr[0]}:{cfg.consul_addr[1]}"
        return ControllerFacts(
            error=f"Consul at {where} did not answer where nodemesh-controller is",
            kind="no-controller",
        )
    end = answer.get("end")
    return ControllerFacts(
        address,
        window_end=float(end) if isinstance(end, int | float) else None,
        at=time.time(),
    )


# --- kernel tables -------------------------------------------------------------------------------


def read_iptables() -> IptablesFacts:
    """The nat table, read only (``iptables -t nat -S``, twice: status and nodemesh's lines)."""
    try:
        st = iptables.status()
        lines = tuple(iptables.show().splitlines())
    except NodemeshError as e:
        return IptablesFacts(error=str(e))
    return IptablesFacts(status=st, lines=lines)


def read_sockets(proc: Path = PROC) -> tuple[Socket, ...] | None:
    out: list[Socket] = []
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            text = (proc / "net" / name).read_text()
        except OSError:
            continue
        readable = True
        out += parse_proc_net_tcp(text)
    return tuple(out) if readable else None


def find_owners(inodes: set[int], proc: Path = PROC) -> dict[int, Owner]:
    """Which process holds each socket inode (the ones this user may look into)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, Owner] = {}
    if not wanted:
        return found
    try:
        pids = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                found[inode] = Owner(pid, _command(proc, pid))
        if len(found) == len(wanted):
            break
    return found


def _command(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _interesting(sockets: tuple[Socket, ...] | None, cfg: AgentConfig) -> set[int]:
    if sockets is None:
        return set()
    out = set()
    for where in (cfg.outbound_addr, cfg.inbound_addr, cfg.admin_addr):
        s = listener_at(sockets, where)
        out |= {s.inode} if s is not None else {h.inode for h in port_holders(sockets, where)}
    return out


def read_listeners(cfg: AgentConfig) -> tuple[tuple[Socket, ...] | None, dict[int, Owner]]:
    sockets = read_sockets()
    return sockets, find_owners(_interesting(sockets, cfg))


# --- certificates --------------------------------------------------------------------------------


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str:
    """Empty when ``chain`` (leaf first) leads to one of ``roots`` by valid signatures, else
    what is wrong."""
    current, pool = chain[0], chain[1:]
    for _ in range(len(chain)):
        if any(_issued_by(current, r) for r in roots):
            return ""
        nxt = next((c for c in pool if _issued_by(current, c)), None)
        if nxt is None:
            break
        current = nxt
    issuer = current.issuer.rfc4514_string() or "its issuer"
    return f"no certificate in the chain or the CA file is its issuer ({issuer})"


def read_roots(ca_file: Path) -> tuple[RootsFacts, list[x509.Certificate]]:
    try:
        certs = keys.load_certificates(ca_file.read_bytes())
    except OSError as e:
        return RootsFacts(ca_file, error=(e.strerror or str(e)).lower()), []
    except IdentityError as e:
        return RootsFacts(ca_file, error=str(e)), []
    if not certs:
        return RootsFacts(ca_file, error="holds no certificate"), []
    not_after = min(c.not_valid_after_utc.timestamp() for c in certs)
    return RootsFacts(ca_file, count=len(certs), not_after=not_after), certs


def read_cert(
    what: str, expected: spiffe.SpiffeId, path: Path, roots: list[x509.Certificate]
) -> CertFacts:
    base = CertFacts(what, expected.uri, path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _with(base, error=f"no file {path}")
    except OSError as e:
        return _with(
            base,
            error=f"cannot read {path} ({(e.strerror or str(e)).lower()}); run "
            "nodemesh check as root",
        )
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    key = b"".join(b for kind, b in blocks if kind.endswith(b"PRIVATE KEY"))
    chain_pem = b"".join(b for kind, b in blocks if kind == b"CERTIFICATE")
    if not key or not chain_pem:
        return _with(base, error=f"{path} does not hold a private key and a certificate")
    try:
        info = keys.leaf_info(chain_pem)
        chain = keys.load_certificates(chain_pem)
        matches = keys.public_keys_match(chain_pem, key)
    except IdentityError as e:
        return _with(base, error=f"{path}: {e}")
    chain_error = verify_chain(chain, roots) if roots else "the mesh CA could not be read"
    return CertFacts(
        what,
        expected.uri,
        path,
        identity=info.identity.uri if info.identity is not None else None,
        not_before=info.not_before,
        not_after=info.not_after,
        chain_error=chain_error,
        key_matches=matches,
    )


def _with(base: CertFacts, *, error: str) -> CertFacts:
    return CertFacts(base.what, base.expected, base.path, error=error)


def _persisted_services(identity_dir: Path) -> set[str]:
    try:
        return {p.name[4:-4] for p in identity_dir.glob("svc-*.pem")}
    except OSError:
        return set()


def read_certs(cfg: AgentConfig, services: Iterable[str]) -> tuple[RootsFacts, list[CertFacts]]:
    """The CA file, the node's certificate and one per service (listed in Consul or on disk)."""
    root_facts, roots = read_roots(cfg.ca_file)
    ident = cfg.state_dir / "identity"
    node = spiffe.node_id(cfg.trust_domain, cfg.datacenter, cfg.node)
    out = [read_cert(f"node {cfg.node}", node, ident / f"node-{cfg.node}.pem", roots)]
    for name in sorted(set(services) | _persisted_services(ident)):
        svc = spiffe.service_id(cfg.trust_domain, cfg.datacenter, name)
        out.append(read_cert(f"service {name}", svc, ident / f"svc-{name}.pem", roots))
    return root_facts, out


def _local_service_names(node: Reply) -> set[str]:
    if not node.answered or node.status != 200:
        return set()
    try:
        parsed = parse_catalog_node(node)
    except ValueError:
        return set()
    if parsed is None:
        return set()
    return {i.service for i in parsed.instances if i.service not in UNMESHED_SERVICES}


# --- the runs ------------------------------------------------------------------------------------


async def _thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def _all(*fns: Callable[[], Awaitable[Any]]) -> list[Any]:
    got: list[Any] = [None] * len(fns)

    async def one(i: int, fn: Callable[[], Awaitable[Any]]) -> None:
        got[i] = await fn()

    async with trio.open_nursery() as n:
        for i, fn in enumerate(fns):
            n.start_soon(one, i, fn)
    return got


async def gather_agent(cfg: AgentConfig, config_path: Path) -> AgentFacts:
    chost, cport = cfg.consul_addr
    auth = _consul_headers(cfg)
    ahost, aport = _local(cfg.admin_addr[0]), cfg.admin_addr[1]
    (leader, node, checks, ctl, live, ready, ipt, (sockets, owners)) = await _all(
        lambda: probe(chost, cport, "/v1/status/leader", auth),
        lambda: probe(chost, cport, f"/v1/catalog/node/{cfg.node}", auth),
        lambda: probe(chost, cport, f"/v1/health/node/{cfg.node}", auth),
        lambda: controller_facts(cfg),
        lambda: probe(ahost, aport, "/live"),
        lambda: probe(ahost, aport, "/ready"),
        lambda: _thread(read_iptables),
        lambda: _thread(lambda: read_listeners(cfg)),
    )
    names = _local_service_names(node)
    root_facts, certs = await _thread(lambda: read_certs(cfg, names))
    return AgentFacts(
        cfg=cfg,
        config_path=config_path,
        now=time.time(),
        consul_leader=leader,
        consul_node=node,
        consul_checks=checks,
        controller=ctl,
        roots=root_facts,
        certs=tuple(certs),
        iptables=ipt,
        sockets=sockets,
        owners=owners,
        live=live,
        ready=ready,
    )


def _state_dir(path: Path) -> StateDirFacts:
    if path.exists():
        return StateDirFacts(path, True, os.access(path, os.W_OK | os.X_OK), path.parent)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return StateDirFacts(path, False, os.access(parent, os.W_OK | os.X_OK), parent)


def _proc_names(name: str) -> frozenset[str] | None:
    try:
        return parse_names((PROC / "net" / name).read_text())
    except OSError:
        return None


def _modules(wanted: Iterable[str]) -> frozenset[str]:
    """Which of ``wanted`` the running kernel has as loadable or built-in modules."""
    base = Path("/lib/modules") / platform.release()
    text = ""
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text += (base / listing).read_text()
        except OSError:
            continue
    return frozenset(m for m in wanted if re.search(rf"/{re.escape(m)}\.ko", text))


def _user(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _caps() -> bool:
    try:
        mask = parse_capabilities((PROC / "self" / "status").read_text())
    except OSError:
        return False
    return bool(mask >> CAP_NET_ADMIN & 1)


async def gather_pre(cfg: AgentConfig, config_path: Path, config_found: bool) -> PreFacts:
    path = shutil.which(iptables.IPTABLES)
    leader, ipt, (sockets, owners) = await _all(
        lambda: probe(*cfg.consul_addr, "/v1/status/leader", _consul_headers(cfg)),
        lambda: (
            _thread(read_iptables)
            if path
            else _none(IptablesFacts(error="iptables is not installed"))
        ),
        lambda: _thread(lambda: read_listeners(cfg)),
    )
    return PreFacts(
        cfg=cfg,
        config_path=config_path,
        config_found=config_found,
        now=time.time(),
        euid=os.geteuid(),
        cap_net_admin=_caps(),
        python=(sys.version_info.major, sys.version_info.minor, sys.version_info.micro),
        user_uid=_user(NODEMESH_USER),
        user_name=NODEMESH_USER,
        iptables_path=path,
        iptables=ipt,
        matches=_proc_names("ip_tables_matches"),
        targets=_proc_names("ip_tables_targets"),
        modules=_modules(("xt_owner", "xt_REDIRECT")),
        state_dir=_state_dir(cfg.state_dir),
        sockets=sockets,
        owners=owners,
        consul_leader=leader,
    )


async def _none(value: T) -> T:
    return value
