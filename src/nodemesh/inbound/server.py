"""Inbound: mTLS connections from peer agents on :4143, delivered to local apps.

Same anatomy as outbound.  Per connection: the TLS handshake (the client must present a
certificate from the mesh CA; the server name selects which local service identity we prove),
then, by ALPN, either HTTP/1.1 requests (``http/1.1``: what apps' HTTP/1.1 calls travel as,
through the same forwarder as outbound, ``proxy/http1.py``) or HTTP/2 streams (``h2``: apps'
HTTP/2 and gRPC calls, and ``CONNECT ip:port`` tunnels for everything else).  Each request names
its target instance in ``x-nodemesh-dst``.  The target must be an instance of the selected
service *on this node* (from the Consul snapshot): the agent is never an open relay.  The app
receives the request with ``x-nodemesh-client-id`` set to the caller's verified SPIFFE ID.

Failures: a handshake that fails (not TLS, no client certificate, unknown server name, wrong CA)
closes that connection with a log event; 403 for a target that is not a local instance; 502/504
if the app cannot be reached.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Hashable
from typing import cast

import trio

from nodemesh import log
from nodemesh.agent.state import AgentState
from nodemesh.discovery.routes import classify
from nodemesh.errors import BadRequest, Forbidden, ProxyError
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.identity.tls import peer_identity
from nodemesh.outbound.mux import MeshPool
from nodemesh.protocol.h1codec import Request
from nodemesh.protocol.http1 import CLIENT_ID_HEADER, DST_HEADER, Headers, RequestHead, header
from nodemesh.proxy.h2bridge import (
    PROTO_HEADER,
    answer_error,
    mesh_free,
    relay_streams,
    splice_stream,
    split_pseudo,
)
from nodemesh.proxy.http1 import IdleSet, serve_http1
from nodemesh.proxy.pool import Pool, Upstream
from nodemesh.transport.edges import IO_ERRORS, Dialer, accept_tls, close_quietly, open_tcp
from nodemesh.transport.h2conn import PEER_WINDOW, H2Conn, H2Stream
from nodemesh.transport.streams import TLSIO, SocketIO

_log = log.get("nodemesh.inbound")
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds; a peer that never finishes must not hold a slot


class Inbound:
    def __init__(self, agent: AgentState, *, dial: Dialer = open_tcp) -> None:
        self.agent = agent
        self.dial = dial  # TCP in production; the component tests' mesh pair passes its own
        self.pool = Pool(
            self._connect,
            max_idle_per_key=agent.cfg.max_idle_per_peer,
            idle_timeout=agent.cfg.outbound_idle_timeout,
        )
        self.idle = IdleSet()  # the daemon shares one across servers for drains
        self.h2conns: set[H2Conn] = set()
        # HTTP/2 (prior knowledge) connections to local apps, for callers that spoke HTTP/2.
        self.h2apps = MeshPool(self._connect_h2_app, idle_timeout=agent.cfg.outbound_idle_timeout)
        self.listen_addr = agent.cfg.inbound_addr

    def __repr__(self) -> str:
        return f"<Inbound {self.listen_addr} {self.pool!r}>"

    async def _connect(self, key: tuple[str, int]) -> Upstream:
        stream = await self.dial(key[0], key[1], self.agent.cfg.inbound_connect_timeout)
        return Upstream(key, stream)

    async def _connect_h2_app(self, key: Hashable) -> trio.abc.Stream:
        ip, port = cast(tuple[str, int], key)
        return await self.dial(ip, port, self.agent.cfg.inbound_connect_timeout)

    async def handle(self, stream: trio.SocketStream) -> None:
        """A connection the listener accepted: a peer agent's, TLS not yet begun."""
        peer = _peer(stream)
        await self.serve_connection(SocketIO.adopt(stream), peer)

    async def serve_connection(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve one connection from a peer agent (``peer`` names it in the log); closes it."""
        try:
            ctx = self.agent.identities.server_context()
        except Exception as e:
            _log.warning("inbound_not_ready", peer=peer, error=str(e))
            await close_quietly(stream)
            return
        try:
            tls = await accept_tls(stream, ctx, TLS_HANDSHAKE_TIMEOUT)
        except trio.TooSlowError:
            _log.info("tls_handshake_failed", peer=peer, reason="timeout")
            return
        except IO_ERRORS as e:
            _log.info("tls_handshake_failed", peer=peer, reason=_reason(e))
            return
        try:
            await self._serve(tls, peer)
        finally:
            await close_quietly(tls)

    async def _serve(self, tls: TLSIO, peer: str) -> None:
        client = peer_identity(tls)
        served = self._served(tls.context)
        if client is None or served is None or served.kind != "svc":
            _log.info(
                "inbound_refused",
                peer=peer,
                client=str(client),
                reason="no service identity selected" if client else "peer has no mesh identity",
            )
            return
        route = self.route(served.name, client)
        if tls.selected_alpn_protocol() == "h2":
            conn = H2Conn(
                tls, client=False, name=peer, on_stream=route.serve_h2_stream, window=PEER_WINDOW
            )
            self.h2conns.add(conn)
            try:
                await conn.serve()
            finally:
                self.h2conns.discard(conn)
            return
        await serve_http1(
            tls, route, idle_timeout=self.agent.cfg.inbound_idle_timeout, idle=self.idle
        )

    def route(self, service: str, client: SpiffeId) -> InboundRoute:
        """The route for one peer connection (the component tests' mesh pair watches it)."""
        return InboundRoute(self, service, client)

    def drain(self) -> None:
        """Close each HTTP/2 connection from a peer once its in-flight streams are done."""
        for conn in list(self.h2conns):
            if conn.handlers is not None:
                conn.handlers.start_soon(conn.close_when_idle)

    def _served(self, ctx: ssl.SSLContext) -> SpiffeId | None:
        """The identity whose certificate the SNI callback put on this connection."""
        ids = self.agent.identities
        for info in ids.identities():
            if info.identity is None:
                continue
            held = ids.held(info.identity)
            if held is not None and held.server is ctx:
                return info.identity
        return None


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or cause)
    return type(cause).__name__


class InboundRoute:
    """Requests on one peer connection for one local service (``proxy.http1.Route``)."""

    __slots__ = ("_client", "_extra", "_in", "authority", "service")
    keep_headers: frozenset[bytes] = frozenset()  # an app may set no x-nodemesh-* header

    def __init__(self, inbound: Inbound, service: str, client: SpiffeId) -> None:
        self._in = inbound
        self.service = service
        self._client = client
        self.authority = service.encode()
        self._extra = [(CLIENT_ID_HEADER, client.uri.encode())]

    def target_of(self, raw: bytes | None) -> tuple[str, int]:
        """The local instance ``raw`` (ip:port) names, checked against the snapshot."""
        snap = self._in.agent.snapshot
        if raw is None:
            local = sorted(snap.local.get(self.service, ()))
            if len(local) != 1:
                raise BadRequest(f"request names no {DST_HEADER.decode()} target")
            return local[0]
        host, _, port = raw.decode("ascii", "replace").rpartition(":")
        if not port.isdigit() or not snap.is_local_instance(self.service, host, int(port)):
            shown = raw.decode("ascii", "replace")
            raise Forbidden(f"{shown} is not an instance of {self.service} on this node")
        return host, int(port)

    async def open(
        self, req: Request, head: RequestHead, *, fresh: bool
    ) -> tuple[Upstream, Headers]:
        up = await self._in.pool.acquire(self.target_of(head.dst), fresh=fresh)
        return up, self._extra

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        await self._in.pool.release(up)  # kept only if the exchange ended cleanly

    def record(self, req: Request, status: int, elapsed: float) -> None:
        agent = self._in.agent
        route = classify(agent.routes, self.service, req.method, req.target)
        agent.recorder.request("inbound", self.service, self._client.uri, status, elapsed, route)

    # -- HTTP/2 streams from peer agents (``proxy.h2bridge.AppRoute``) --------------------------

    async def serve_h2_stream(self, stream: H2Stream) -> None:
        ev = await stream.next_event()
        head = ev[1]
        pseudo, regular = split_pseudo(head)
        if pseudo.get(b":method") == b"CONNECT":
            await self.tunnel_h2(stream, pseudo.get(b":authority"))
        elif header(regular, PROTO_HEADER) == b"h2":
            await self.relay_h2_to_app(stream, head, pseudo, regular)
        else:
            # An agent from before HTTP/1.1 calls travelled as HTTP/1.1 between agents.
            err = BadRequest(
                "HTTP/1.1 calls between agents travel over ALPN http/1.1; upgrade the calling agent"
            )
            self.record_status(err.status, 0.0, pseudo)
            await answer_error(stream, err)

    async def relay_h2_to_app(
        self,
        stream: H2Stream,
        head: list[tuple[bytes, bytes]],
        pseudo: dict[bytes, bytes],
        regular: list[tuple[bytes, bytes]],
    ) -> None:
        """The caller's app spoke HTTP/2 (h2c, gRPC): speak HTTP/2 to this app too."""
        start = time.perf_counter()
        try:
            target = self.target_of(header(regular, DST_HEADER))
            app = await self._in.h2apps.open_stream(target)
            out = [*mesh_free(head), (CLIENT_ID_HEADER, self._client.uri.encode())]
            await app.send_headers(out, end=stream.head_ended)
        except ProxyError as e:
            self.record_status(e.status, time.perf_counter() - start, pseudo)
            await answer_error(stream, e)
            return
        status = await relay_streams(stream, app, request_open=not stream.head_ended)
        self.record_status(status, time.perf_counter() - start, pseudo)

    def record_status(self, status: int, elapsed: float, pseudo: dict[bytes, bytes]) -> None:
        agent = self._in.agent
        route = classify(agent.routes, self.service, pseudo.get(b":method"), pseudo.get(b":path"))
        agent.recorder.request("inbound", self.service, self._client.uri, status, elapsed, route)

    async def tunnel_h2(self, stream: H2Stream, authority: bytes | None) -> None:
        """A CONNECT stream: answer 200 once the app is connected, then carry bytes."""
        # splice_stream counts app -> mesh as "in"; for inbound the mesh is the client side.
        with self._in.agent.recorder.connection("inbound", self.service, flip=True) as count:
            try:
                ip, port = self.target_of(authority)
                app = await self._in.dial(ip, port, self._in.agent.cfg.inbound_connect_timeout)
            except ProxyError as e:
                await answer_error(stream, e)
                return
            try:
                await stream.send_headers([(b":status", b"200")])
                await splice_stream(app, stream, count)
            finally:
                await close_quietly(app)
