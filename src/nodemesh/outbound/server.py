"""Outbound: app connections redirected by iptables to 127.0.0.1:4140, sent through the mesh.

Per connection:
1. the original destination comes from ``SO_ORIGINAL_DST``;
2. the catalog snapshot maps it to a meshed service, or to nothing: egress, spliced straight to
   the destination, untouched (the agent's own uid is excluded from interception, so this
   does not loop);
3. a meshed service on an opaque port (server speaks first, or declared ``tcp`` in its Consul
   ``Meta.protocol``) is tunnelled as bytes; otherwise the first bytes are peeked, within the
   detection timeout, and HTTP/1 goes through the L7 route, anything else through the tunnel.

L7: each request is balanced (P2C peak-EWMA) over the service's healthy endpoints and sent over
a pooled mTLS connection to the endpoint's agent, naming the instance in ``x-nodemesh-dst``.
Opaque: a fresh mTLS connection carries ``CONNECT ip:port`` and then the raw bytes.
"""

from __future__ import annotations

import time

import h11
import trio

from nodemesh import log
from nodemesh.agent.state import AgentState
from nodemesh.discovery.snapshot import Endpoint
from nodemesh.errors import ProxyError, UpstreamConnectError, UpstreamProtocolError
from nodemesh.identity import spiffe
from nodemesh.identity.tls import peer_identity
from nodemesh.protocol.detect import MAX_PEEK, Protocol, detect
from nodemesh.protocol.http1 import DST_HEADER
from nodemesh.proxy.http1 import IdleSet, next_event, serve_http1
from nodemesh.proxy.pool import Pool, Upstream
from nodemesh.proxy.splice import SpliceStats, splice
from nodemesh.transport.edges import close_quietly, open_tcp, open_tls, upstream_errors
from nodemesh.transport.original_dst import original_dst

_log = log.get("nodemesh.outbound")
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds
CONNECT_ATTEMPTS = 3  # endpoints tried when connecting fails (nothing was sent yet)


class Outbound:
    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.pool = Pool(
            self._connect,
            max_idle_per_key=cfg.max_idle_per_peer,
            idle_timeout=cfg.outbound_idle_timeout,
        )
        self.idle = IdleSet()  # the daemon shares one across servers for drains
        self.listen_addr = cfg.outbound_addr

    def __repr__(self) -> str:
        return f"<Outbound {self.listen_addr} {self.pool!r}>"

    # -- mesh connections ---------------------------------------------------------------------

    async def _connect(self, key: tuple[tuple[str, int], str]) -> Upstream:
        (host, port), service = key
        stream = await self.open_mesh(host, port, service)
        return Upstream(key, stream, service)

    async def open_mesh(
        self, host: str, port: int, service: str
    ) -> trio.SSLStream[trio.abc.Stream]:
        """An mTLS connection to the agent at host:port that proves it serves ``service``."""
        cfg = self.agent.cfg
        expected = self.agent.service_identity(service)
        ctx = self.agent.identities.client_context(self.agent.source_identity())
        tcp = await open_tcp(host, port, cfg.outbound_connect_timeout)
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
        agent = self.agent
        ip, port = original_dst(stream.socket)
        if (ip, port) == self.listen_addr:
            _log.warning("outbound_direct_connection_refused", reason="not redirected by iptables")
            return
        service = agent.snapshot.resolve(ip, port)
        if service is None:
            await self._egress(stream, ip, port)
            return
        prefix = b""
        proto = Protocol.OPAQUE
        if port not in agent.cfg.opaque_ports and not self._declared_opaque(service):
            proto, prefix = await self._detect(stream)
        if proto is Protocol.HTTP1:
            route = OutboundRoute(self, service, ip, port)
            await serve_http1(
                stream,
                route,
                prefix=prefix,
                idle_timeout=agent.cfg.outbound_idle_timeout,
                idle=self.idle,
            )
        else:
            await self._tunnel(stream, service, prefix)

    def _declared_opaque(self, service: str) -> bool:
        # Consul Meta.protocol = "tcp" declares a service opaque (no detection).
        return self.agent.snapshot.protocols.get(service) == "tcp"

    async def _detect(self, stream: trio.SocketStream) -> tuple[Protocol, bytes]:
        buf = b""
        with trio.move_on_after(self.agent.cfg.detect_timeout):
            while len(buf) < MAX_PEEK:
                data = await stream.receive_some(MAX_PEEK)
                if not data:
                    break
                buf += data
                proto = detect(buf)
                if proto is not Protocol.NEED_MORE:
                    return proto, buf
        return Protocol.OPAQUE, buf  # timeout (server speaks first), EOF or long token

    async def _egress(self, stream: trio.SocketStream, ip: str, port: int) -> None:
        tcp = self.agent.recorder.tcp("egress", "egress")  # one series: destinations are unbounded
        tcp.opened += 1
        try:
            up = await open_tcp(ip, port, self.agent.cfg.outbound_connect_timeout)
        except ProxyError as e:
            _log.debug("egress_connect_failed", dst=f"{ip}:{port}", error=e.detail)
            tcp.closed += 1
            return
        stats = SpliceStats()
        try:
            await splice(stream, up, stats=stats)
        finally:
            await close_quietly(up)
            tcp.closed += 1
            tcp.bytes_in += stats.bytes_in
            tcp.bytes_out += stats.bytes_out

    async def _tunnel(self, stream: trio.SocketStream, service: str, prefix: bytes) -> None:
        tcp = self.agent.recorder.tcp("outbound", service)
        tcp.opened += 1
        balancer = self.agent.balancer(service)
        stats = SpliceStats()
        try:
            ep = balancer.pick()
        except ProxyError as e:
            tcp.closed += 1
            _log.info("tunnel_refused", service=service, error=e.detail)
            return
        start = time.perf_counter()
        failed = True
        try:
            up, leftover = await self._open_tunnel(ep)
            failed = False
            balancer.done(ep, time.perf_counter() - start)
            try:
                if leftover:  # the app's server spoke first and its greeting raced the 200
                    await stream.send_all(leftover)
                    stats.bytes_out += len(leftover)
                await splice(stream, up, prefix=prefix, stats=stats)
            finally:
                await close_quietly(up)
        except ProxyError as e:
            _log.info(
                "tunnel_failed", service=service, endpoint=f"{ep.address}:{ep.port}", error=e.detail
            )
        finally:
            if failed:
                balancer.done(ep, time.perf_counter() - start, failed=True)
            tcp.closed += 1
            tcp.bytes_in += stats.bytes_in
            tcp.bytes_out += stats.bytes_out

    async def _open_tunnel(self, ep: Endpoint) -> tuple[trio.abc.Stream, bytes]:
        """CONNECT to ``ep`` through its agent; returns the stream and bytes read past the 200."""
        tls = await self.open_mesh(ep.peer[0], ep.peer[1], ep.service)
        try:
            conn = h11.Connection(h11.CLIENT)
            target = f"{ep.address}:{ep.port}".encode()
            out = conn.send(
                h11.Request(method=b"CONNECT", target=target, headers=[(b"host", target)])
            )
            out += conn.send(h11.EndOfMessage())
            with upstream_errors():
                await tls.send_all(out)
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                ev = await next_event(conn, tls, upstream_errors)
            if not isinstance(ev, h11.Response) or not 200 <= ev.status_code < 300:
                status = getattr(ev, "status_code", None)
                raise UpstreamProtocolError(f"agent refused the tunnel (status {status})")
            return tls, conn.trailing_data[0]
        except trio.TooSlowError:
            await close_quietly(tls)
            raise UpstreamProtocolError("agent did not answer the tunnel request") from None
        except (ProxyError, h11.ProtocolError):
            await close_quietly(tls)
            raise


class OutboundRoute:
    """Requests on one app connection to one meshed service (``proxy.http1.Route``)."""

    __slots__ = ("_ep", "_out", "authority", "service")

    def __init__(self, out: Outbound, service: str, ip: str, port: int) -> None:
        self._out = out
        self.service = service
        self.authority = f"{ip}:{port}".encode()
        self._ep: Endpoint | None = None

    async def open(
        self, req: h11.Request, *, fresh: bool
    ) -> tuple[Upstream, list[tuple[bytes, bytes]]]:
        # A connection that could not be opened carried no request byte, so trying another
        # endpoint is always safe (any method).  The failed one is penalised in the balancer.
        balancer = self._out.agent.balancer(self.service)
        for attempt in range(CONNECT_ATTEMPTS):
            ep = balancer.pick()
            start = time.perf_counter()
            try:
                up = await self._out.pool.acquire((ep.peer, self.service), fresh=fresh)
            except ProxyError:
                balancer.done(ep, time.perf_counter() - start, failed=True)
                if attempt + 1 == CONNECT_ATTEMPTS or len(balancer.endpoints) < 2:
                    raise
                continue
            self._ep = ep
            return up, [(DST_HEADER, f"{ep.address}:{ep.port}".encode())]
        raise AssertionError("unreachable")

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        if self._ep is not None:
            self._out.agent.balancer(self.service).done(self._ep, rtt, failed=failed)
            self._ep = None
        if failed:
            await close_quietly(up.stream)
        else:
            await self._out.pool.release(up)

    def record(self, req: h11.Request, status: int, elapsed: float) -> None:
        agent = self._out.agent
        agent.recorder.request(
            "outbound", self.service, agent.source_identity().name, status, elapsed
        )
