"""``nodemesh check``'s I/O: ask the host's services, read its files, change nothing.

The network probes live here: Consul's and the admin listener's HTTP answers, and one metrics
query to the controller over mTLS (as ``nodemesh stat`` makes it).  ``hostinfo`` and
``certfiles`` read the kernel's tables and the certificate files.  ``gather_agent`` and
``gather_pre`` run every probe concurrently, each under its own timeout; a probe that fails
records why in its fact instead of raising, so one broken part never hides the others.

Consul is asked over plain HTTP here rather than through ``discovery/consul``: the check needs
the raw status codes and the ``Date`` header (to compare clocks), which the catalog client
does not expose.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import h11
import trio

from nodemesh.agent import iptables
from nodemesh.check import certfiles, hostinfo
from nodemesh.check.facts import (
    AgentFacts,
    ControllerFacts,
    IptablesFacts,
    PreFacts,
    Reply,
    admin_target,
    parse_catalog_node,
)
from nodemesh.config import AgentConfig
from nodemesh.discovery.snapshot import UNMESHED_SERVICES
from nodemesh.errors import ConfigError, IdentityError, NodemeshError
from nodemesh.telemetry import query

PROBE_TIMEOUT = 3.0  # seconds for one local HTTP answer (Consul agent, admin listener)
CONTROLLER_TIMEOUT = 5.0  # seconds for finding and asking the controller; as nodemesh stat
MAX_BODY = 4 * 1024 * 1024  # a node's checks with many services stay far below this
NODEMESH_USER = "nodemesh"
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
    ahost, aport = admin_target(cfg)
    (leader, node, checks, ctl, live, ready, ipt, (sockets, owners)) = await _all(
        lambda: probe(chost, cport, "/v1/status/leader", auth),
        lambda: probe(chost, cport, f"/v1/catalog/node/{cfg.node}", auth),
        lambda: probe(chost, cport, f"/v1/health/node/{cfg.node}", auth),
        lambda: controller_facts(cfg),
        lambda: probe(ahost, aport, "/live"),
        lambda: probe(ahost, aport, "/ready"),
        lambda: _thread(hostinfo.read_iptables),
        lambda: _thread(lambda: hostinfo.read_listeners(cfg)),
    )
    names = _local_service_names(node)
    root_facts, certs = await _thread(lambda: certfiles.read_certs(cfg, names))
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


async def gather_pre(cfg: AgentConfig, config_path: Path, config_found: bool) -> PreFacts:
    path = shutil.which(iptables.IPTABLES)
    leader, ipt, (sockets, owners) = await _all(
        lambda: probe(*cfg.consul_addr, "/v1/status/leader", _consul_headers(cfg)),
        lambda: (
            _thread(hostinfo.read_iptables)
            if path
            else _none(IptablesFacts(error="iptables is not installed"))
        ),
        lambda: _thread(lambda: hostinfo.read_listeners(cfg)),
    )
    return PreFacts(
        cfg=cfg,
        config_path=config_path,
        config_found=config_found,
        now=time.time(),
        euid=os.geteuid(),
        cap_net_admin=hostinfo.has_net_admin(),
        python=(sys.version_info.major, sys.version_info.minor, sys.version_info.micro),
        user_uid=hostinfo.user_uid(NODEMESH_USER),
        user_name=NODEMESH_USER,
        iptables_path=path,
        iptables=ipt,
        matches=hostinfo.extension_names("ip_tables_matches"),
        targets=hostinfo.extension_names("ip_tables_targets"),
        modules=hostinfo.kernel_modules(("xt_owner", "xt_REDIRECT")),
        state_dir=hostinfo.state_dir(cfg.state_dir),
        sockets=sockets,
        owners=owners,
        consul_leader=leader,
    )


async def _none(value: T) -> T:
    return value
