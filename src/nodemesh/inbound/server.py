"""Inbound: mTLS connections from peer agents on :4143, delivered to local apps.

Same anatomy as outbound.  Per connection: the TLS handshake (the client must present a
certificate from the mesh CA; the server name selects which local service identity we prove),
then HTTP/1.1 requests, each naming its target instance in ``x-nodemesh-dst``.  The target must be
an instance of the selected service *on this node* (from the Consul snapshot): the agent is
never an open relay.  The app receives the request with ``x-nodemesh-client-id`` set to the
caller's verified SPIFFE ID.  ``CONNECT ip:port`` opens an opaque tunnel to such an instance.

Failures: a handshake that fails (not TLS, no client certificate, unknown server name, wrong CA)
closes that connection with a log event; 403 for a target that is not a local instance; 502/504
if the app cannot be reached.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Hashable
from typing import cast

import h11
import trio

from nodemesh import log
from nodemesh.agent.state import AgentState
from nodemesh.discovery.routes import classify
from nodemesh.errors import BadRequest, Forbidden, ProxyError
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.identity.tls import peer_identity
from nodemesh.outbound.mux import MeshPool
from nodemesh.protocol.http1 import CLIENT_ID_HEADER, DST_HEADER, header
from nodemesh.proxy.h2bridge import (
    PROTO_HEADER,
    answer_error,
    mesh_free,
    relay_streams,
    serve_stream,
    splice_stream,
    split_pseudo,
)
from nodemesh.proxy.http1 import IdleSet, forward, respond_error, serve_http1
from nodemesh.proxy.pool import Pool, Upstream
from nodemesh.proxy.splice import splice
from nodemesh.transport.edges import IO_ERRORS, close_quietly, downstream_errors, open_tcp
from nodemesh.transport.h2conn import H2Conn, H2Stream

_log = log.get("nodemesh.inbound")
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds; a peer that never finishes must not hold a slot


class Inbound:
    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
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
        stream = await open_tcp(key[0], key[1], self.agent.cfg.inbound_connect_timeout)
        return Upstream(key, stream)

    async def _connect_h2_app(self, key: Hashable) -> trio.abc.Stream:
        ip, port = cast(tuple[str, int], key)
        return await open_tcp(ip, port, self.agent.cfg.inbound_connect_timeout)

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = _peer(stream)
        try:
            ctx = self.agent.identities.server_context()
        except Exception as e:
            _log.warning("inbound_not_ready", peer=peer, error=str(e))
            return
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except trio.TooSlowError:
            _log.info("tls_handshake_failed", peer=peer, reason="timeout")
            return
        except IO_ERRORS as e:
            _log.info("tls_handshake_failed", peer=peer, reason=_reason(e))
            return
        client = peer_identity(tls)
        served = self._served(tls.context)
        if client is None or served is None or served.kind != "svc":
            _log.info(
                "inbound_refused",
                peer=peer,
                client=str(client),
                reason="no service identity selected" if client else "peer has no mesh identity",
            )
            await close_quietly(tls)
            return
        route = InboundRoute(self, served.name, client)
        if tls.selected_alpn_protocol() == "h2":
            conn = H2Conn(tls, client=False, name=peer, on_stream=route.serve_h2_stream)
            self.h2conns.add(conn)
            try:
                await conn.serve()
            finally:
                self.h2conns.discard(conn)
                await close_quietly(tls)
            return
        try:
            await serve_http1(
                tls, route, idle_timeout=self.agent.cfg.inbound_idle_timeout, idle=self.idle
            )
        finally:
            await close_quietly(tls)

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

    __slots__ = ("_client", "_in", "authority", "service")

    def __init__(self, inbound: Inbound, service: str, client: SpiffeId) -> None:
        self._in = inbound
        self.service = service
        self._client = client
        self.authority = service.encode()

    async def forward(self, ds: h11.Connection, stream: trio.abc.Stream, req: h11.Request) -> bool:
        return await forward(ds, stream, req, self)

    def target(self, req: h11.Request) -> tuple[str, int]:
        raw = req.target if req.method == b"CONNECT" else header(req.headers, DST_HEADER)
        return self.target_of(raw)

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
        self, req: h11.Request, *, fresh: bool
    ) -> tuple[Upstream, list[tuple[bytes, bytes]]]:
        up = await self._in.pool.acquire(self.target(req), fresh=fresh)
        return up, [(CLIENT_ID_HEADER, self._client.uri.encode())]

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        if failed:
            await close_quietly(up.stream)
        else:
            await self._in.pool.release(up)

    def record(self, req: h11.Request, status: int, elapsed: float) -> None:
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
            await serve_stream(stream, self, head)

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

    async def open_app(
        self, pseudo: dict[bytes, bytes], regular: list[tuple[bytes, bytes]]
    ) -> tuple[Upstream, list[tuple[bytes, bytes]]]:
        up = await self._in.pool.acquire(self.target_of(header(regular, DST_HEADER)))
        return up, [(CLIENT_ID_HEADER, self._client.uri.encode())]

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
                app = await open_tcp(ip, port, self._in.agent.cfg.inbound_connect_timeout)
            except ProxyError as e:
                await answer_error(stream, e)
                return
            try:
                await stream.send_headers([(b":status", b"200")])
                await splice_stream(app, stream, count)
            finally:
                await close_quietly(app)

    async def tunnel(self, ds: h11.Connection, stream: trio.abc.Stream, req: h11.Request) -> None:
        """``CONNECT ip:port``: answer 200 once the app is connected, then splice bytes."""
        with self._in.agent.recorder.connection("inbound", self.service) as count:
            try:
                ip, port = self.target(req)
                app = await open_tcp(ip, port, self._in.agent.cfg.inbound_connect_timeout)
            except ProxyError as e:
                await respond_error(ds, stream, e)
                return
            try:
                with downstream_errors():
                    await stream.send_all(ds.send(h11.Response(status_code=200, headers=[])))
                leftover, _closed = ds.trailing_data
                await splice(stream, app, prefix=leftover, stats=count)
            finally:
                await close_quietly(app)
