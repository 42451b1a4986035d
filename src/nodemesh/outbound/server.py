"""Outbound: app connections redirected by iptables to 127.0.0.1:4140, sent through the mesh.

Per connection:
1. the original destination comes from ``SO_ORIGINAL_DST``;
2. the catalog snapshot maps it to a meshed service, or to nothing: egress, spliced straight to
   the destination, untouched (the agent's own uid is excluded from interception, so this
   does not loop);
3. the protocol: declared in the service's Consul ``Meta.protocol`` (``tcp``, ``http``,
   ``http2``, ``grpc``), which overrides everything; else opaque on an opaque port (server
   speaks first); else the first bytes are peeked, within the detection timeout: HTTP/1 and
   HTTP/2 go through L7 routes, anything else through an opaque tunnel.

L7: each request is balanced (P2C peak-EWMA) over the service's healthy endpoints and sent as one
HTTP/2 stream on a multiplexed mTLS connection to the endpoint's agent (``outbound/mux.py``),
naming the instance in ``x-nodemesh-dst``.  Opaque: a ``CONNECT ip:port`` stream on the same
kind of connection carries the raw bytes, END_STREAM being a half-close.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import cast

import trio

from nodemesh import log
from nodemesh.agent.state import AgentState
from nodemesh.discovery.routes import classify
from nodemesh.discovery.snapshot import Endpoint
from nodemesh.errors import (
    MethodNotAllowed,
    ProxyError,
    UpstreamConnectError,
    UpstreamProtocolError,
)
from nodemesh.identity import spiffe
from nodemesh.identity.tls import peer_identity
from nodemesh.outbound.mux import MeshPool
from nodemesh.protocol.detect import MAX_PEEK, Protocol, detect
from nodemesh.protocol.h1codec import Request, ServerConn, request_head
from nodemesh.protocol.http1 import DST_HEADER, ERROR_HEADER, Headers, RequestHead
from nodemesh.proxy.h2bridge import (
    PROTO_HEADER,
    answer_error,
    mesh_free,
    relay_streams,
    splice_stream,
    split_pseudo,
)
from nodemesh.proxy.http1 import IdleSet, respond_error, serve_http1
from nodemesh.proxy.pool import Pool, Upstream
from nodemesh.proxy.splice import splice
from nodemesh.telemetry.metrics import DEFAULT_ROUTE
from nodemesh.transport.edges import Dialer, close_quietly, open_tcp, open_tls
from nodemesh.transport.h2conn import PEER_WINDOW, H2Conn, H2Stream
from nodemesh.transport.original_dst import original_dst
from nodemesh.transport.streams import TLSIO, SocketIO

_log = log.get("nodemesh.outbound")
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds
# A pooled mesh connection's key: the peer agent's address, the service it must prove, and the
# identity (SPIFFE ID URI) this agent presented on it.
MeshKey = tuple[tuple[str, int], str, str]
CONNECT_ATTEMPTS = 3  # endpoints tried when connecting fails (nothing was sent yet)


class Outbound:
    def __init__(self, agent: AgentState, *, dial: Dialer = open_tcp) -> None:
        self.agent = agent
        self.dial = dial  # TCP in production; the component tests' mesh pair passes its own
        cfg = agent.cfg
        # HTTP/1.1 from apps: pooled keep-alive mTLS connections per (peer agent, service,
        # the identity presented): a connection speaks for the identity it was opened with,
        # so a request may ride it only while that is still the identity requests speak as.
        self.pool = Pool(
            self._connect_http1,
            max_idle_per_key=cfg.max_idle_per_peer,
            idle_timeout=cfg.outbound_idle_timeout,
        )
        # HTTP/2 and gRPC from apps, and every tunnel: multiplexed HTTP/2 connections.
        self.mux = MeshPool(  # to peer agents
            self._connect, idle_timeout=cfg.outbound_idle_timeout, window=PEER_WINDOW
        )
        self.h2apps: set[H2Conn] = set()  # apps' own HTTP/2 connections, for drains
        self.idle = IdleSet()  # the daemon shares one across servers for drains
        self.listen_addr = cfg.outbound_addr

    def __repr__(self) -> str:
        return f"<Outbound {self.listen_addr} {self.pool!r} {self.mux!r}>"

    # -- mesh connections ---------------------------------------------------------------------

    async def _connect(self, key: Hashable) -> trio.abc.Stream:
        (host, port), service, source = cast(MeshKey, key)
        tls = await self.open_mesh(host, port, service, source)
        if tls.selected_alpn_protocol() != "h2":
            await close_quietly(tls)
            raise UpstreamConnectError(f"agent at {host}:{port} does not speak HTTP/2; upgrade it")
        return tls

    async def _connect_http1(self, key: MeshKey) -> Upstream:
        (host, port), service, source = key
        tls = await self.open_mesh(host, port, service, source, http1=True)
        if tls.selected_alpn_protocol() != "http/1.1":
            await close_quietly(tls)
            raise UpstreamConnectError(f"agent at {host}:{port} refused http/1.1; upgrade it")
        return Upstream(key, tls)

    async def open_mesh(
        self, host: str, port: int, service: str, source: str, *, http1: bool = False
    ) -> TLSIO:
        """An mTLS connection to the agent at host:port that proves it serves ``service``, on
        which this agent presents ``source`` (a SPIFFE ID URI of its own)."""
        cfg = self.agent.cfg
        expected = self.agent.service_identity(service)
        ident = spiffe.parse(source)
        if ident is None:  # only ever our own presented_source()
            raise UpstreamConnectError(f"{source!r} is not an identity of this agent")
        ctx = self.agent.identities.client_context(ident, http1=http1)
        tcp = await self.dial(host, port, cfg.outbound_connect_timeout)
        tls = await open_tls(tcp, ctx, spiffe.server_name(expected), TLS_HANDSHAKE_TIMEOUT)
        got = peer_identity(tls)
        if got != expected:
            await close_quietly(tls)
            raise UpstreamConnectError(
                f"agent at {host}:{port} presented {got or 'no identity'}, expected {expected}"
            )
        return tls

    # -- per connection -------------------------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """A connection the listener accepted: an app's, redirected by iptables."""
        io = SocketIO.adopt(stream)
        try:
            dst = original_dst(io.socket)
            if dst == self.listen_addr:
                _log.warning(
                    "outbound_direct_connection_refused", reason="not redirected by iptables"
                )
                return
            await self.serve_connection(io, dst)
        finally:
            io.close()

    async def serve_connection(self, stream: trio.abc.Stream, dst: tuple[str, int]) -> None:
        """Carry one app connection that was headed for ``dst`` (ip, port).  The config in force
        when it began governs it to the end (a reload applies to new connections)."""
        agent = self.agent
        cfg = agent.cfg
        ip, port = dst
        service = agent.snapshot.resolve(ip, port)
        if service is None:
            claimed = agent.snapshot.ambiguous.get(dst)
            if claimed is not None:  # not egress either: it is some service, just not one
                _log.debug(
                    "outbound_ambiguous_refused", dst=f"{ip}:{port}", services=",".join(claimed)
                )
                return
            await self._egress(stream, ip, port)
            return
        prefix = b""
        declared = agent.snapshot.protocols.get(service)
        if declared in ("http2", "grpc"):
            proto = Protocol.HTTP2  # declared: no peeking (h2 still checks the preface)
        elif declared == "tcp" or (declared is None and port in cfg.opaque_ports):
            proto = Protocol.OPAQUE
        else:  # undeclared, or "http" (which overrides the opaque-port list): peek
            detected, prefix = await self._detect(stream, cfg.detect_timeout)
            if detected is None:
                return
            proto = detected
        if proto is Protocol.HTTP2:
            await self._serve_h2_app(stream, service, ip, port, prefix)
        elif proto is Protocol.HTTP1:
            route = OutboundRoute(self, service, ip, port)
            await serve_http1(
                stream,
                route,
                prefix=prefix,
                idle_timeout=cfg.outbound_idle_timeout,
                idle=self.idle,
            )
        else:
            await self.carry(stream, service, prefix)

    async def _serve_h2_app(
        self, stream: trio.abc.Stream, service: str, ip: str, port: int, prefix: bytes
    ) -> None:
        """An app speaking HTTP/2 (h2c, gRPC): each of its streams is balanced on its own."""
        conn = H2Conn(
            stream,
            client=False,
            name=f"app->{ip}:{port}",
            on_stream=partial(self._app_h2_stream, service, ip, port),
            prefix=prefix,
        )
        self.h2apps.add(conn)
        try:
            await conn.serve()
        finally:
            self.h2apps.discard(conn)

    async def _app_h2_stream(self, service: str, ip: str, port: int, app: H2Stream) -> None:
        start = time.perf_counter()
        ev = await app.next_event()
        head = ev[1]
        route = OutboundRoute(self, service, ip, port)
        pseudo = split_pseudo(head)[0]
        if pseudo.get(b":method") == b"CONNECT":
            err = MethodNotAllowed("CONNECT over HTTP/2 is not supported to a meshed service")
            route.record(None, err.status, time.perf_counter() - start, pseudo)
            await answer_error(app, err)
            return
        out = [*mesh_free(head), (PROTO_HEADER, b"h2")]
        try:
            mesh = await route.open_stream(out, end=app.head_ended)
        except ProxyError as e:
            route.record(None, e.status, time.perf_counter() - start, pseudo)
            await answer_error(app, e)
            return
        sent = time.perf_counter()
        status = await relay_streams(app, mesh, request_open=not app.head_ended)
        route.done(failed=status == 0 or status >= 500, rtt=time.perf_counter() - sent)
        route.record(None, status, time.perf_counter() - start, pseudo)

    async def _detect(
        self,
        stream: trio.abc.Stream,
        timeout: float,  # noqa: ASYNC109
    ) -> tuple[Protocol | None, bytes]:
        """The protocol from the first bytes; None if a drain began before the app spoke."""
        buf = b""
        if self.idle.draining:
            return None, buf
        with trio.move_on_after(timeout) as scope:
            self.idle.scopes.add(scope)  # a connection that never spoke is idle: drains end it
            try:
                while len(buf) < MAX_PEEK:
                    data = await stream.receive_some(MAX_PEEK)
                    if not data:
                        break
                    buf += data
                    proto = detect(buf)
                    if proto is not Protocol.NEED_MORE:
                        return proto, buf
            finally:
                self.idle.scopes.discard(scope)
        if self.idle.draining and not buf:
            return None, buf
        return Protocol.OPAQUE, buf  # timeout (server speaks first), EOF or long token

    async def _egress(self, stream: trio.abc.Stream, ip: str, port: int) -> None:
        # One series for all egress: its destinations are unbounded.
        with self.agent.recorder.connection("egress", "egress") as count:
            try:
                up = await self.dial(ip, port, self.agent.cfg.outbound_connect_timeout)
            except ProxyError as e:
                _log.debug("egress_connect_failed", dst=f"{ip}:{port}", error=e.detail)
                return
            try:
                await splice(stream, up, stats=count)
            finally:
                await close_quietly(up)

    async def carry(
        self,
        stream: trio.abc.Stream,
        service: str,
        first: bytes,
        refuse: Callable[[ProxyError], Awaitable[object]] | None = None,
    ) -> None:
        """Carry ``stream`` as bytes to one balanced instance of ``service`` over a CONNECT
        stream, ``first`` sent ahead (bytes already read from the app).  ``refuse`` answers the
        app when no tunnel can be opened (an upgrade request still expects an HTTP answer)."""
        with self.agent.recorder.connection("outbound", service) as count:
            balancer = self.agent.balancer(service)
            try:
                ep = balancer.pick()
            except ProxyError as e:
                _log.info("tunnel_refused", service=service, error=e.detail)
                if refuse is not None:
                    await refuse(e)
                return
            start = time.perf_counter()
            try:
                tunnel = await self._open_tunnel(ep)
            except ProxyError as e:
                balancer.done(ep, time.perf_counter() - start, failed=True)
                _log.info("tunnel_failed", service=service, endpoint=repr(ep), error=e.detail)
                if refuse is not None:
                    await refuse(e)
                return
            balancer.done(ep, time.perf_counter() - start)
            try:
                if first:
                    await tunnel.send_data(first)
                    count.bytes_in += len(first)
                await splice_stream(stream, tunnel, count)
            except ProxyError as e:
                tunnel.reset()
                _log.info("tunnel_failed", service=service, endpoint=repr(ep), error=e.detail)

    async def _open_tunnel(self, ep: Endpoint) -> H2Stream:
        """A CONNECT stream to ``ep`` through its agent, once the agent reached the app."""
        source = self.agent.presented_source()
        stream = await self.mux.open_stream((ep.peer, ep.service, source))
        target = f"{ep.address}:{ep.port}".encode()
        try:
            await stream.send_headers([(b":method", b"CONNECT"), (b":authority", target)])
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                ev = await stream.next_event()
            status = split_pseudo(ev[1])[0].get(b":status") if ev[0] == "headers" else None
            if status is None or not status.startswith(b"2"):
                raise UpstreamProtocolError(f"agent refused the tunnel (status {status!r})")
            return stream
        except trio.TooSlowError:
            stream.reset()
            raise UpstreamProtocolError("agent did not answer the tunnel request") from None
        except ProxyError:
            stream.reset()
            raise


class OutboundRoute:
    """Requests on one app connection to one meshed service.

    HTTP/1.1 (``proxy.http1.Route``): each request is balanced on its own and lent a pooled
    HTTP/1.1 mTLS connection to the chosen endpoint's agent.  HTTP/2 (``open_stream``): each
    stream goes on a multiplexed connection the same way."""

    __slots__ = ("_ep", "_host", "_out", "_source", "authority", "service")
    # The peer agent's own error header says why it answered an error: the app may see it.
    keep_headers = frozenset({ERROR_HEADER})

    def __init__(self, out: Outbound, service: str, ip: str, port: int) -> None:
        self._out = out
        self.service = service
        self.authority = f"{ip}:{port}".encode()
        self._ep: Endpoint | None = None
        self._host = ""  # the node that served the last exchange, until it is recorded
        self._source = ""  # the identity the last exchange's connection presented, likewise

    async def open(
        self, req: Request, head: RequestHead, *, fresh: bool
    ) -> tuple[Upstream, Headers]:
        # A connection that could not be opened carried no request byte, so trying another
        # endpoint is always safe (any method).  The failed one is penalised in the balancer.
        out = self._out
        balancer = out.agent.balancer(self.service)
        self._source = source = out.agent.presented_source()
        for attempt in range(CONNECT_ATTEMPTS):
            ep = balancer.pick()
            start = time.perf_counter()
            try:
                up = await out.pool.acquire((ep.peer, self.service, source), fresh=fresh)
            except ProxyError:
                balancer.done(ep, time.perf_counter() - start, failed=True)
                if attempt + 1 == CONNECT_ATTEMPTS or len(balancer.endpoints) < 2:
                    raise
                continue
            self._ep = ep
            return up, [(DST_HEADER, f"{ep.address}:{ep.port}".encode())]
        raise AssertionError("unreachable")

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        self.done(failed=failed, rtt=rtt)
        await self._out.pool.release(up)  # kept only if the exchange ended cleanly

    async def open_stream(self, head: Headers, *, end: bool) -> H2Stream:
        # A stream that could not be opened carried no request byte, so trying another
        # endpoint is always safe (any method).  The failed one is penalised in the balancer.
        balancer = self._out.agent.balancer(self.service)
        self._source = source = self._out.agent.presented_source()
        for attempt in range(CONNECT_ATTEMPTS):
            ep = balancer.pick()
            start = time.perf_counter()
            try:
                stream = await self._out.mux.open_stream((ep.peer, self.service, source))
                dst = (DST_HEADER, f"{ep.address}:{ep.port}".encode())
                await stream.send_headers([*head, dst], end=end)
            except ProxyError:
                balancer.done(ep, time.perf_counter() - start, failed=True)
                if attempt + 1 == CONNECT_ATTEMPTS or len(balancer.endpoints) < 2:
                    raise
                continue
            self._ep = ep
            return stream
        raise AssertionError("unreachable")

    async def tunnel(self, ds: ServerConn, stream: trio.abc.Stream, req: Request) -> None:
        """An upgrade (WebSocket) or the app's own CONNECT: from here on, bytes.

        The request head goes to one balanced instance through a CONNECT stream exactly as the
        app wrote it (hop-by-hop headers included: they are the point), then both directions
        are spliced; the server's 101 and everything after reach the app untouched."""
        head = request_head(req.method, req.target, mesh_free(req.headers))
        await self._out.carry(
            stream, self.service, head + ds.trailing_data, partial(respond_error, ds, stream)
        )

    upgrade = tunnel

    def done(self, *, failed: bool, rtt: float) -> None:
        if self._ep is not None:
            self._out.agent.balancer(self.service).done(self._ep, rtt, failed=failed)
            self._host = self._ep.node  # the request is recorded next, against this host
            self._ep = None

    def record(
        self,
        req: Request | None,
        status: int,
        elapsed: float,
        pseudo: dict[bytes, bytes] | None = None,
    ) -> None:
        """Count one request; ``pseudo`` stands in for ``req`` on an app's HTTP/2 stream."""
        agent = self._out.agent
        if req is not None:
            route = classify(agent.routes, self.service, req.method, req.target)
        elif pseudo is not None:
            route = classify(
                agent.routes, self.service, pseudo.get(b":method"), pseudo.get(b":path")
            )
        else:
            route = DEFAULT_ROUTE
        # The identity the request's connection presented, which is what the peer saw; before
        # any connection (refused up front), the one requests speak as now.
        agent.recorder.request(
            "outbound",
            self.service,
            self._source or agent.presented_source(),
            status,
            elapsed,
            route,
            self._host,
        )
        self._host = self._source = ""
