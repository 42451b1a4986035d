"""Two agents' data paths wired in memory, like h11's ``ConnectionPair``: no root, no sockets.

    client ──> Outbound (agent on host "a") ══ real mTLS over a memory stream ══> Inbound
    (agent on host "b") ──> App (a real h11 server, ``tests/component/test_proxy_http1``)

Both agents are the production classes with their production routes, pools, balancer,
recorder and identity stores; certificates come from a real CA.  Only the dialer differs:
instead of TCP, ``MeshPair`` hands each side one end of a ``trio.testing.memory_stream_pair``
and serves the other end with the peer's own ``serve_connection`` (an agent), or with the fake
app.  The catalog is a real ``Snapshot`` built from Consul-shaped health entries: the app
``web`` at ``198.18.0.2:8080`` on node ``b``, both agents registered as ``nodemesh``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
import trio.testing

from nodemesh.agent.state import AgentState
from nodemesh.config import agent_config_from_mapping
from nodemesh.discovery import snapshot
from nodemesh.errors import ProxyError, UpstreamConnectError
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.identity.store import IdentityStore
from nodemesh.inbound.server import Inbound, InboundRoute
from nodemesh.outbound.server import Outbound
from nodemesh.protocol.http1 import Headers, RequestHead
from nodemesh.proxy.http1 import IdleSet
from nodemesh.proxy.pool import Upstream
from nodemesh.telemetry.metrics import Recorder

TD = "mesh.test"
DC = "dc1"
A_IP, B_IP = "198.18.0.1", "198.18.0.2"
MESH_PORT = 4143
APP_PORT = 8080
APP = (B_IP, APP_PORT)  # where the client "dials" web
WEB = spiffe.service_id(TD, DC, "web")
NODE_A = spiffe.node_id(TD, DC, "a")
NODE_B = spiffe.node_id(TD, DC, "b")

AppServe = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


@functools.cache
def _ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def _issue(store: IdentityStore, ident: SpiffeId) -> None:
    ca = _ca()
    key = keys.generate_key()
    store.install(ident, ca.sign_csr(keys.make_csr(key, ident), ident, 3600), key, ca.roots_pem)


def _entry(node: str, ip: str, port: int, meta: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": ip},
        "Service": {"Address": ip, "Port": port, "Meta": meta or {}},
        "Checks": [{"Status": "passing"}],
    }


def build(raw: dict[str, Any], node: str) -> snapshot.Snapshot:
    """``snapshot.build`` on the pair's hosts: each node owns its address (the agents run in one
    process here, so the kernel cannot say; the dial override maps the addresses to loopback)."""
    own = {"a": A_IP, "b": B_IP}[node]
    return snapshot.build(raw, node, own_address={own}.__contains__)


def catalog(web_meta: dict[str, str] | None = None) -> dict[str, Any]:
    """Consul's health answers for the pair: both agents, and ``web`` on node b."""
    return {
        snapshot.AGENT_SERVICE: [_entry("a", A_IP, MESH_PORT), _entry("b", B_IP, MESH_PORT)],
        "web": [_entry("b", B_IP, APP_PORT, web_meta)],
    }


def agent(node: str, ip: str, **outbound: Any) -> AgentState:
    cfg = agent_config_from_mapping(
        {
            "agent": {"node": node, "trust_domain": TD, "datacenter": DC},
            "listen": {"inbound": f"{ip}:{MESH_PORT}"},
            "outbound": outbound,
        }
    )
    store = IdentityStore(TD, DC, node)
    _issue(store, spiffe.node_id(TD, DC, node))
    state = AgentState(cfg, store, Recorder())
    state.publish(build(catalog(), node))
    return state


class Watch:
    """What the inbound route towards the app was asked: the fake route's bookkeeping, kept by
    the production route (``WatchedInbound``) so the forwarder's tests read the same way."""

    def __init__(self, inbound: Inbound) -> None:
        self.opens: list[bool] = []  # the ``fresh`` flag of every open
        self.released: list[tuple[Upstream, bool]] = []
        self.recorded: list[tuple[bytes, int]] = []
        self.open_error: ProxyError | None = None
        self.pool = inbound.pool
        self._changed = trio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def settled(self, requests: int, timeout: float = 5.0) -> None:
        """Wait until ``requests`` requests were recorded: ``record`` runs after the reply."""
        with trio.fail_after(timeout):
            while len(self.recorded) < requests:
                await self._changed.wait()


class WatchedRoute(InboundRoute):
    __slots__ = ("watch",)

    async def open(
        self, req: h11.Request, head: RequestHead, *, fresh: bool
    ) -> tuple[Upstream, Headers]:
        self.watch.opens.append(fresh)
        if self.watch.open_error is not None:
            raise self.watch.open_error
        return await super().open(req, head, fresh=fresh)

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        assert rtt >= 0
        self.watch.released.append((up, failed))
        await super().release(up, failed=failed, rtt=rtt)

    def record(self, req: h11.Request, status: int, elapsed: float) -> None:
        assert elapsed >= 0
        super().record(req, status, elapsed)
        self.watch.recorded.append((req.method, status))
        self.watch.notify()


class WatchedInbound(Inbound):
    watch: Watch

    def route(self, service: str, client: SpiffeId) -> InboundRoute:
        r = WatchedRoute(self, service, client)
        r.watch = self.watch
        return r


class Resetting(trio.abc.HalfCloseableStream):
    """A stream on which the peer's close arrives as a reset (ECONNRESET), not as EOF."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if not data:
            raise trio.BrokenResourceError("connection reset by peer")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class MeshPair:
    def __init__(self, nursery: trio.Nursery, app: AppServe, *, resetting_app: bool = False):
        self.nursery = nursery
        self.app = app
        self.resetting_app = resetting_app
        self.a = agent("a", A_IP)
        self.b = agent("b", B_IP)
        _issue(self.b.identities, WEB)
        self.outbound = Outbound(self.a, dial=self._dial_from_a)
        self.inbound = WatchedInbound(self.b, dial=self._dial_from_b)
        self.watch = self.inbound.watch = Watch(self.inbound)
        self.agent_links = 0  # connections agent a opened to agent b
        self.app_links = 0  # connections agent b opened to the app

    async def start(self) -> None:
        await self.nursery.start(self.outbound.mux.serve)
        await self.nursery.start(self.inbound.h2apps.serve)
        await self.nursery.start(self.outbound.idle.serve)
        await self.nursery.start(self.inbound.idle.serve)

    async def _dial_from_a(self, host: str, port: int, timeout: float) -> trio.abc.Stream:
        if (host, port) != (B_IP, MESH_PORT):
            raise UpstreamConnectError(f"connect to {host}:{port} failed: nothing there")
        ours, theirs = trio.testing.memory_stream_pair()
        self.agent_links += 1
        self.nursery.start_soon(self.inbound.serve_connection, theirs, f"{A_IP}:40000")
        return ours

    async def _dial_from_b(self, host: str, port: int, timeout: float) -> trio.abc.Stream:
        if (host, port) != APP:
            raise UpstreamConnectError(f"connect to {host}:{port} failed: nothing there")
        ours, theirs = trio.testing.memory_stream_pair()
        self.app_links += 1
        self.nursery.start_soon(self.app, theirs)
        return Resetting(ours) if self.resetting_app else ours

    def statuses(self, direction: str = "outbound") -> dict[str, int]:
        """Requests agent a (outbound) or b (inbound) recorded, by status class."""
        recorder = (self.a if direction == "outbound" else self.b).recorder
        out: dict[str, int] = {}
        for s in recorder.series():
            if s.direction == direction:
                out[s.status] = out.get(s.status, 0) + s.count
        return out

    def connect(
        self,
        dst: tuple[str, int] = APP,
        *,
        idle_timeout: float | None = None,
        idle: IdleSet | None = None,
        wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
        served: trio.Event | None = None,
    ) -> trio.abc.Stream:
        """A new app connection to ``dst`` through agent a; the client's end of it."""
        if idle is not None and idle is not self.outbound.idle:
            self.outbound.idle = idle
            self.nursery.start_soon(idle.serve)
        client, proxy = trio.testing.memory_stream_pair()
        down: trio.abc.Stream = wrap(proxy) if wrap is not None else proxy

        async def run() -> None:
            try:
                if idle_timeout is not None:  # a connection keeps the config it began with
                    cfg = dataclasses.replace(self.a.cfg, outbound_idle_timeout=idle_timeout)
                    self.a.cfg = cfg
                await self.outbound.serve_connection(down, dst)
            finally:
                if served is not None:  # before the close the client may wake on
                    served.set()
                await trio.aclose_forcefully(proxy)

        self.nursery.start_soon(run)
        return client
