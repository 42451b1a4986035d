"""The HTTP/1.1 data path end to end over trio memory streams, against a verified fake app.

Each test wires an h11 *client* (the app calling through the mesh) to the production path of
``tests/component/meshpair.py``: agent a's ``Outbound`` (its route, pool and balancer), real
mTLS over a memory stream, agent b's ``Inbound`` and its route towards ``App``, a small but
real h11 *server* whose handler each test chooses.  ``m.route`` is what agent b's route was
asked (opens, releases, records), kept by the production route itself.  A few tests drive
``serve_http1`` alone with a fake route (``hop``): the forwarder's contract with a route's
tunnel.  Every test runs on trio's autojump clock, so timeouts are instant and a hang shows
up as a fast ``TooSlowError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trio.testing

from nodemesh.discovery import snapshot
from nodemesh.errors import NoEndpoints, ProxyError, UpstreamConnectError, UpstreamTimeout
from nodemesh.identity import spiffe
from nodemesh.protocol.h1codec import Request, ServerConn
from nodemesh.protocol.http1 import CLIENT_ID_HEADER, DST_HEADER, ERROR_HEADER, RequestHead
from nodemesh.proxy.http1 import MAX_HEADER_BYTES, IdleSet, serve_http1
from nodemesh.proxy.pool import Pool, Upstream
from nodemesh.transport.edges import close_quietly
from tests.component.meshpair import (
    A_IP,
    APP,
    DC,
    NODE_A,
    TD,
    MeshPair,
    Resetting,
    _entry,
    _issue,
    build,
    catalog,
)

Clock = trio.testing.MockClock
DST = b"198.18.0.2:8080"
AUTHORITY = b"web.test:8080"
WAIT = 5.0  # virtual seconds; with the autojump clock only a deadlock ever reaches it


class Changes:
    """Lets a test wait for a condition on state that other tasks change."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT):
            while not predicate():
                await self._event.wait()


# --- the fake upstream app ----------------------------------------------------------------------


class Exchange:
    """One request as the upstream app sees it, and the means to answer it."""

    def __init__(
        self, app: App, conn: h11.Connection, stream: trio.abc.Stream, req: h11.Request, nth: int
    ) -> None:
        self.app = app
        self.conn = conn
        self.stream = stream
        self.request = req
        self.nth = nth  # 0 for the first request on its connection
        self.body = bytearray()
        self.trailers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.then: str | None = None  # after the handler: None (keep alive), "close", "fin"

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.request.headers if n == name), None)

    def headers(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.request.headers if n == name]

    async def read_body(self) -> bytes:
        while not self.complete:
            ev = await receive_event(self.conn, self.stream)
            if isinstance(ev, h11.Data):
                self.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.trailers = list(ev.headers)
                self.complete = True
            else:
                raise AssertionError(f"unexpected {ev!r} in a request body")
            self.app.changes.notify()
        return bytes(self.body)

    async def send(self, *events: h11.Event) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                await self.stream.send_all(data)

    async def respond(
        self, status: int = 200, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        hs = [(b"content-length", str(len(body)).encode())] if headers is None else headers
        await self.send(h11.Response(status_code=status, headers=hs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())


Handler = Callable[[Exchange], Awaitable[None]]


async def echo(ex: Exchange) -> None:
    """200 with the request body, or ``METHOD target`` when there is none."""
    body = await ex.read_body()
    await ex.respond(200, body or ex.request.method + b" " + ex.request.target)


async def receive_event(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> object:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(bytes(await stream.receive_some(65536)))


class App:
    def __init__(self, handler: Handler = echo) -> None:
        self.handler = handler
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self.ended = 0  # connections this app has finished with
        self.fins = 0  # connections half-closed by the app ("fin")
        self.changes = Changes()

    async def serve(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        nth = 0
        then: str | None = None
        try:
            while True:
                ev = await receive_event(conn, stream)
                if not isinstance(ev, h11.Request):
                    return
                ex = Exchange(self, conn, stream, ev, nth)
                self.exchanges.append(ex)
                self.changes.notify()
                await self.handler(ex)
                then = ex.then
                if then or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                nth += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            if then == "fin":
                # Like a server's idle close on TCP: our FIN goes out, and writes from the proxy
                # still succeed until it reads the end of the stream.
                await stream.send_eof()
                self.fins += 1
                self.changes.notify()
                with trio.move_on_after(WAIT):
                    while await stream.receive_some(65536):
                        pass
            await trio.aclose_forcefully(stream)
            self.ended += 1
            self.changes.notify()


# --- the route: where serve_http1 sends requests ------------------------------------------------


class Route:
    """A fake ``Route`` for ``hop``: a real Pool of upstream connections to ``App``."""

    keep_headers: frozenset[bytes] = frozenset()

    authority = AUTHORITY

    def __init__(self, app: App, nursery: trio.Nursery, *, resetting: bool = False) -> None:
        self.app = app
        self.nursery = nursery
        self.resetting = resetting
        self.pool = Pool(
            self._connect, max_idle_per_key=4, idle_timeout=60.0, clock=trio.current_time
        )
        self.opens: list[bool] = []  # the ``fresh`` flag of every open
        self.released: list[tuple[Upstream, bool]] = []
        self.recorded: list[tuple[bytes, int]] = []
        self.open_error: ProxyError | None = None
        self.changes = Changes()

    async def settled(self, requests: int) -> None:
        """Wait until ``requests`` requests were recorded: ``record`` runs after the reply."""
        await self.changes.until(lambda: len(self.recorded) >= requests)

    async def _connect(self, key: Hashable) -> Upstream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.app.serve, theirs)
        return Upstream(key, Resetting(ours) if self.resetting else ours)

    async def open(
        self, req: Request, head: RequestHead, *, fresh: bool
    ) -> tuple[Upstream, list[tuple[bytes, bytes]]]:
        self.opens.append(fresh)
        if self.open_error is not None:
            raise self.open_error
        up = await self.pool.acquire("web", fresh=fresh)
        return up, [(DST_HEADER, DST)]

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        assert rtt >= 0
        self.released.append((up, failed))
        if failed:
            await close_quietly(up.stream)
        else:
            await self.pool.release(up)

    def record(self, req: Request, status: int, elapsed: float) -> None:
        assert elapsed >= 0
        self.recorded.append((req.method, status))
        self.changes.notify()


# --- the downstream client ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class Client:
    def __init__(self, stream: trio.abc.Stream, served: trio.Event) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.served = served  # set when serve_http1 returned for this connection

    async def send(self, *events: h11.Event) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                await self.stream.send_all(data)

    async def event(self) -> object:
        with trio.fail_after(WAIT):
            return await receive_event(self.conn, self.stream)

    async def reply(self) -> Reply:
        interim: list[int] = []
        while True:
            ev = await self.event()
            if isinstance(ev, h11.InformationalResponse):
                interim.append(ev.status_code)
            elif isinstance(ev, h11.Response):
                break
            else:
                raise AssertionError(f"expected a response, got {ev!r}")
        r = Reply(ev.status_code, list(ev.headers), b"", interim=interim)
        body = bytearray()
        while True:
            ev = await self.event()
            if isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                r.body, r.trailers = bytes(body), list(ev.headers)
                break
            else:
                raise AssertionError(f"expected a body, got {ev!r}")
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return r

    async def request(
        self,
        method: bytes = b"GET",
        target: bytes = b"/",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        hs = [(b"host", b"web")] if headers is None else headers
        if body and not any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in hs):
            hs = [*hs, (b"content-length", str(len(body)).encode())]
        await self.send(h11.Request(method=method, target=target, headers=hs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.reply()

    async def raw_until_eof(self) -> bytes:
        out = bytearray()
        with trio.fail_after(WAIT):
            while data := await self.stream.receive_some(65536):
                out += data
        return bytes(out)

    async def wait_served(self) -> None:
        with trio.fail_after(WAIT):
            await self.served.wait()


class Mesh:
    """The mesh pair serving ``app``; ``route`` is what agent b's route towards it was asked."""

    def __init__(self, pair: MeshPair, app: App) -> None:
        self.pair = pair
        self.app = app
        self.route = pair.watch

    async def connect(
        self,
        *,
        idle_timeout: float = 30.0,
        idle: IdleSet | None = None,
        resetting: bool = False,
    ) -> Client:
        """A new app connection to web through agent a; the caller closes the stream."""
        served = trio.Event()
        stream = self.pair.connect(
            idle_timeout=idle_timeout,
            idle=idle,
            wrap=Resetting if resetting else None,  # type: ignore[arg-type]
            served=served,
        )
        return Client(stream, served)


@asynccontextmanager
async def mesh(
    handler: Handler = echo, *, resetting_upstreams: bool = False
) -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        app = App(handler)
        pair = MeshPair(nursery, app.serve, resetting_app=resetting_upstreams)
        await pair.start()
        yield Mesh(pair, app)
        nursery.cancel_scope.cancel()


class Hop:
    """``serve_http1`` alone, with a fake route."""

    def __init__(self, nursery: trio.Nursery, app: App, route: Route) -> None:
        self.nursery = nursery
        self.app = app
        self.route = route
        self.idle = IdleSet()
        nursery.start_soon(self.idle.serve)

    async def connect(self, *, idle_timeout: float = 30.0) -> Client:
        client_side, proxy_side = trio.testing.memory_stream_pair()
        served = trio.Event()

        async def run() -> None:
            try:
                await serve_http1(proxy_side, self.route, idle_timeout=idle_timeout, idle=self.idle)
            finally:
                served.set()
                await trio.aclose_forcefully(proxy_side)

        self.nursery.start_soon(run)
        return Client(client_side, served)


@asynccontextmanager
async def hop(route: type[Route] = Route) -> AsyncIterator[Hop]:
    async with trio.open_nursery() as nursery:
        app = App(echo)
        yield Hop(nursery, app, route(app, nursery))
        nursery.cancel_scope.cancel()


# --- keep-alive and streaming -------------------------------------------------------------------


async def test_get_keep_alive_reuses_one_upstream(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        for i in range(3):
            r = await c.request(target=f"/n/{i}".encode())
            assert (r.status, r.body) == (200, f"GET /n/{i}".encode())
        await m.route.settled(3)
        assert m.app.connections == 1
        assert [ex.nth for ex in m.app.exchanges] == [0, 1, 2]
        assert m.route.opens == [False, False, False]
        assert [failed for _, failed in m.route.released] == [False, False, False]
        assert m.route.recorded == [(b"GET", 200)] * 3
        assert m.route.pool.opened == 1
        assert m.pair.agent_links == 1  # one pooled mTLS connection between the agents
        ex = m.app.exchanges[0]
        assert ex.headers(DST_HEADER) == []  # the mesh's own: for agent b, not for the app
        assert ex.headers(CLIENT_ID_HEADER) == [NODE_A.uri.encode()]
        assert ex.header(b"host") == b"web"
        assert not c.served.is_set()


async def test_pipelined_requests_are_answered_in_order(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(
            b"GET /a HTTP/1.1\r\nhost: web\r\n\r\nGET /b HTTP/1.1\r\nhost: web\r\n\r\n"
        )
        raw = bytearray()
        with trio.fail_after(WAIT):
            while not raw.endswith(b"GET /b"):
                raw += await c.stream.receive_some(65536)
        assert raw.count(b"HTTP/1.1 200 ") == 2
        assert raw.index(b"GET /a") < raw.index(b"HTTP/1.1 200 ", 1)  # in order
        assert m.app.connections == 1


async def test_post_with_content_length_is_streamed(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.send(
            h11.Request(
                method="POST", target="/up", headers=[("host", "web"), ("content-length", "10")]
            ),
            h11.Data(data=b"0123"),
        )
        await m.app.changes.until(lambda: len(m.app.exchanges) == 1)
        ex = m.app.exchanges[0]
        # The app sees the first bytes while the client has not sent the rest: nothing buffers.
        await m.app.changes.until(lambda: bytes(ex.body) == b"0123")
        assert not ex.complete
        await c.send(h11.Data(data=b"456789"), h11.EndOfMessage())
        r = await c.reply()
        assert (r.status, r.body) == (200, b"0123456789")
        assert ex.header(b"content-length") == b"10"
        await m.route.settled(1)
        assert m.route.recorded == [(b"POST", 200)]


async def test_post_chunked_is_streamed_with_trailers(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.send(
            h11.Request(
                method="POST",
                target="/up",
                headers=[("host", "web"), ("transfer-encoding", "chunked"), ("trailer", "x-sum")],
            ),
            h11.Data(data=b"first-"),
        )
        await m.app.changes.until(
            lambda: bool(m.app.exchanges) and m.app.exchanges[0].body == b"first-"
        )
        ex = m.app.exchanges[0]
        assert ex.header(b"transfer-encoding") == b"chunked"
        assert not ex.complete
        await c.send(h11.Data(data=b"second"), h11.EndOfMessage(headers=[("x-sum", "42")]))
        r = await c.reply()
        assert (r.status, r.body) == (200, b"first-second")
        assert ex.trailers == [(b"x-sum", b"42")]


async def test_response_is_streamed_in_chunks_with_trailers(autojump_clock: Clock) -> None:
    go = trio.Event()

    async def slow(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(
            h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]),
            h11.Data(data=b"part one;"),
        )
        await go.wait()
        await ex.send(h11.Data(data=b"part two"), h11.EndOfMessage(headers=[("x-checksum", "abc")]))

    async with mesh(slow) as m:
        c = await m.connect()
        await c.send(
            h11.Request(method="GET", target="/", headers=[("host", "web")]), h11.EndOfMessage()
        )
        head = await c.event()
        assert isinstance(head, h11.Response)
        assert head.status_code == 200
        first = await c.event()
        assert isinstance(first, h11.Data)
        assert first.data == b"part one;"  # arrived while the app still holds the rest
        go.set()
        second = await c.event()
        assert isinstance(second, h11.Data)
        assert second.data == b"part two"
        end = await c.event()
        assert isinstance(end, h11.EndOfMessage)
        assert list(end.headers) == [(b"x-checksum", b"abc")]


async def test_head(autojump_clock: Clock) -> None:
    async def head(ex: Exchange) -> None:
        await ex.read_body()
        if ex.request.method == b"HEAD":
            await ex.send(
                h11.Response(status_code=200, headers=[("content-length", "1234")]),
                h11.EndOfMessage(),
            )
        else:
            await ex.respond(200, b"after head")

    async with mesh(head) as m:
        c = await m.connect()
        r = await c.request(b"HEAD", b"/big")
        assert (r.status, r.header(b"content-length"), r.body) == (200, b"1234", b"")
        r = await c.request(b"GET", b"/next")  # the connection is still in sync
        assert r.body == b"after head"
        assert m.app.connections == 1


async def test_expect_100_continue(autojump_clock: Clock) -> None:
    async def continue_(ex: Exchange) -> None:
        assert ex.conn.they_are_waiting_for_100_continue
        await ex.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        await ex.respond(201, await ex.read_body())

    async with mesh(continue_) as m:
        c = await m.connect()
        await c.send(
            h11.Request(
                method="PUT",
                target="/obj",
                headers=[("host", "web"), ("content-length", "5"), ("expect", "100-continue")],
            )
        )
        interim = await c.event()  # before any body byte was sent
        assert isinstance(interim, h11.InformationalResponse)
        assert (interim.status_code, interim.reason) == (100, b"Continue")
        await c.send(h11.Data(data=b"hello"), h11.EndOfMessage())
        r = await c.reply()
        assert (r.status, r.body) == (201, b"hello")
        assert m.app.exchanges[0].header(b"expect") == b"100-continue"


# --- headers ------------------------------------------------------------------------------------


async def test_hop_by_hop_and_mesh_headers_are_removed_both_ways(autojump_clock: Clock) -> None:
    async def leaky(ex: Exchange) -> None:
        await ex.read_body()
        await ex.respond(
            200,
            b"ok",
            headers=[
                (b"content-length", b"2"),
                (b"connection", b"x-internal"),
                (b"x-internal", b"secret"),
                (b"keep-alive", b"timeout=5"),
                (b"x-nodemesh-client-id", b"spiffe://leak"),
                (b"x-app", b"kept"),
            ],
        )

    async with mesh(leaky) as m:
        c = await m.connect()
        r = await c.request(
            headers=[
                (b"host", b"web"),
                (b"connection", b"keep-alive, x-secret"),
                (b"x-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authorization", b"Basic eA=="),
                (b"te", b"trailers"),
                (b"x-nodemesh-dst", b"198.18.0.9:22"),
                (b"x-nodemesh-client-id", b"spiffe://forged"),
                (b"x-app", b"kept"),
            ]
        )
        ex = m.app.exchanges[0]
        assert {n for n, _ in ex.request.headers} == {b"host", b"x-app", CLIENT_ID_HEADER}
        # The caller's verified identity, not the forged one; the forged target went nowhere.
        assert ex.headers(CLIENT_ID_HEADER) == [NODE_A.uri.encode()]
        assert {n for n, _ in r.headers} == {b"content-length", b"x-app"}
        assert r.body == b"ok"


async def test_http10_client_without_host_gets_the_route_authority(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(b"GET /old HTTP/1.0\r\n\r\n")
        raw = await c.raw_until_eof()  # HTTP/1.0 without keep-alive: one request, then close
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b"\r\n\r\nGET /old")
        ex = m.app.exchanges[0]
        assert ex.header(b"host") == b"198.18.0.2:8080"  # the address the client dialled
        assert ex.request.http_version == b"1.1"
        await c.wait_served()


async def test_http10_client_keeps_its_own_host(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(b"GET / HTTP/1.0\r\nHost: given\r\n\r\n")
        await c.raw_until_eof()
        assert m.app.exchanges[0].headers(b"host") == [b"given"]


async def test_an_upgrade_request_with_a_body_cannot_smuggle_a_request(
    autojump_clock: Clock,
) -> None:
    # llhttp hands everything after an upgrade request's head to the new protocol, its body
    # included.  Not upgraded (it has a body), the request must be served with that body; parsed
    # on as HTTP, the body would reach the app as a second request the mesh never vetted.
    smuggled = b"GET /admin HTTP/1.1\r\nhost: web\r\n\r\n"
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(
            b"POST /form HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
            b"content-length: %d\r\n\r\n%b"
            % (len(smuggled), smuggled)
            + b"GET /next HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
        )
        raw = await c.raw_until_eof()
        assert raw.count(b"HTTP/1.1 200 ") == 2
        seen = [(ex.request.method, ex.request.target, ex.body) for ex in m.app.exchanges]
        assert seen == [(b"POST", b"/form", smuggled), (b"GET", b"/next", b"")]


async def test_a_refused_upgrade_request_leaves_the_connection_serving(
    autojump_clock: Clock,
) -> None:
    # The codec holds what follows an upgrade request's head for a tunnel; a refused one is
    # never upgraded, so the next request on the connection must still be read.
    pad = b"x" * (MAX_HEADER_BYTES + 100 - 120)
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(
            b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
            b"x-pad: " + pad + b"\r\n\r\n"
            b"GET /next HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
        )
        raw = await c.raw_until_eof()
        assert raw.startswith(b"HTTP/1.1 431 ")
        assert b"HTTP/1.1 200 " in raw
        assert [ex.request.target for ex in m.app.exchanges] == [b"/next"]


# --- the rescue: errors before and after the response started -----------------------------------


async def test_malformed_request_ends_only_its_own_connection(autojump_clock: Clock) -> None:
    async with mesh() as m:
        good = await m.connect()
        assert (await good.request(target=b"/1")).status == 200
        bad = await m.connect()
        await bad.stream.send_all(b"GET / HTTP/1.1 junk\r\nhost: web\r\n\r\n")
        await bad.raw_until_eof()
        await bad.wait_served()
        assert (await good.request(target=b"/2")).status == 200  # unharmed, same upstream
        assert m.route.opens == [False, False]  # the bad one never reached the route
        assert m.app.connections == 1
        assert not good.served.is_set()


async def test_malformed_request_line_gets_400(autojump_clock: Clock) -> None:
    async with mesh() as m:
        bad = await m.connect()
        await bad.stream.send_all(b"GET / HTTP/1.1 junk\r\nhost: web\r\n\r\n")
        raw = await bad.raw_until_eof()
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert b"\r\nx-nodemesh-error: bad request\r\n" in raw


async def test_oversized_head_never_reaches_the_upstream(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(b"GET / HTTP/1.1\r\nhost: web\r\nx-big: " + b"a" * MAX_HEADER_BYTES)
        await c.raw_until_eof()
        await c.wait_served()
        assert m.route.opens == []


async def test_oversized_head_gets_431(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.stream.send_all(b"GET / HTTP/1.1\r\nhost: web\r\nx-big: " + b"a" * MAX_HEADER_BYTES)
        raw = await c.raw_until_eof()
        assert raw.startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (NoEndpoints("service web has no healthy endpoints"), 503, b"no healthy endpoints"),
        (
            UpstreamConnectError("connect to 198.18.0.2:4143 failed"),
            502,
            b"upstream connect failed",
        ),
        (UpstreamTimeout("connect to 198.18.0.2:4143 timed out"), 504, b"upstream timeout"),
    ],
    ids=["no-endpoints", "connect-error", "timeout"],
)
async def test_route_open_errors_are_answered(
    autojump_clock: Clock, error: ProxyError, status: int, reason: bytes
) -> None:
    async with mesh() as m:
        m.route.open_error = error
        c = await m.connect()
        r = await c.request()
        assert r.status == status
        assert r.header(ERROR_HEADER) == reason
        assert r.body == error.detail.encode() + b"\n"
        assert r.header(b"content-type") == b"text/plain; charset=utf-8"
        await m.route.settled(1)
        assert m.route.recorded == [(b"GET", status)]
        assert m.app.connections == 0


async def test_keep_alive_survives_a_503_for_a_get(autojump_clock: Clock) -> None:
    async with mesh() as m:
        m.route.open_error = NoEndpoints("service web has no healthy endpoints")
        c = await m.connect()
        r = await c.request()
        assert (r.status, r.header(b"connection")) == (503, None)
        m.route.open_error = None
        assert (await c.request()).status == 200


async def test_upstream_that_closes_before_responding_gives_502(autojump_clock: Clock) -> None:
    async def hang_up(ex: Exchange) -> None:
        await ex.read_body()
        ex.then = "close"

    async with mesh(hang_up) as m:
        c = await m.connect()
        r = await c.request()
        assert r.status == 502
        assert r.header(ERROR_HEADER) is not None
        await m.route.settled(1)
        assert m.route.recorded == [(b"GET", 502)]
        assert [failed for _, failed in m.route.released] == [True]
        assert m.route.opens == [False]  # a fresh connection is not retried


async def test_malformed_upstream_response_gives_502(autojump_clock: Clock) -> None:
    async def garbage(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(b"HTTP/1.1 OK maybe\r\n\r\n")
        ex.then = "close"

    async with mesh(garbage) as m:
        c = await m.connect()
        r = await c.request()
        assert r.status == 502
        assert r.header(ERROR_HEADER) == b"upstream protocol error"


async def test_upstream_switching_protocols_unasked_gives_502(autojump_clock: Clock) -> None:
    async def switch(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n")
        ex.then = "close"

    async with mesh(switch) as m:
        r = await (await m.connect()).request()
        assert (r.status, r.header(ERROR_HEADER)) == (502, b"upstream protocol error")


@pytest.mark.parametrize(
    "framing",
    [[("content-length", "100")], [("transfer-encoding", "chunked")]],
    ids=["content-length", "chunked"],
)
async def test_upstream_closing_mid_response_cuts_the_downstream(
    autojump_clock: Clock, framing: list[tuple[str, str]]
) -> None:
    async def cut(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(h11.Response(status_code=200, headers=framing), h11.Data(data=b"x" * 10))
        ex.then = "close"

    async with mesh(cut) as m:
        c = await m.connect()
        await c.send(
            h11.Request(method="GET", target="/", headers=[("host", "web")]), h11.EndOfMessage()
        )
        assert isinstance(await c.event(), h11.Response)
        data = await c.event()
        assert isinstance(data, h11.Data)
        assert data.data == b"x" * 10
        with pytest.raises(h11.RemoteProtocolError):  # EOF, never a complete-looking response
            await c.event()
        await c.wait_served()
        await m.route.settled(1)
        assert m.route.recorded == [(b"GET", 0)]
        assert [failed for _, failed in m.route.released] == [True]


async def test_upstream_5xx_is_relayed_and_counted_failed_on_a_kept_connection(
    autojump_clock: Clock,
) -> None:
    async def sick(ex: Exchange) -> None:
        await ex.read_body()
        await ex.respond(503 if ex.request.target == b"/sick" else 200, b"app says")

    async with mesh(sick) as m:
        c = await m.connect()
        r = await c.request(target=b"/sick")
        assert (r.status, r.body, r.header(ERROR_HEADER)) == (503, b"app says", None)
        assert (await c.request(target=b"/ok")).status == 200
        await m.route.settled(2)
        assert [failed for _, failed in m.route.released] == [True, False]
        # A complete 5xx is a failure for the balancer, not a broken connection: kept alive.
        assert m.app.connections == 1
        assert m.route.recorded == [(b"GET", 503), (b"GET", 200)]


async def test_upstream_connection_close_keeps_the_downstream_alive(autojump_clock: Clock) -> None:
    async def closing(ex: Exchange) -> None:
        await ex.read_body()
        await ex.respond(200, b"bye", [(b"content-length", b"3"), (b"connection", b"close")])

    async with mesh(closing) as m:
        c = await m.connect()
        for _ in range(2):
            r = await c.request()
            assert r.body == b"bye"
            assert r.header(b"connection") is None  # hop-by-hop: not relayed
        assert m.app.connections == 2
        assert not c.served.is_set()


async def test_early_response_ends_the_downstream_connection(autojump_clock: Clock) -> None:
    async def refuse(ex: Exchange) -> None:
        await ex.respond(413, b"too big")  # without reading the body

    async with mesh(refuse) as m:
        c = await m.connect()
        await c.send(
            h11.Request(
                method="POST", target="/", headers=[("host", "web"), ("content-length", "100000")]
            ),
            h11.Data(data=b"x" * 1000),
        )
        r = await c.reply()
        assert (r.status, r.body) == (413, b"too big")
        await c.wait_served()  # the rest of the body was never read: the connection must end
        await m.route.settled(1)
        assert m.route.pool.idle_count() == 0


# --- stale pooled connections -------------------------------------------------------------------


async def answer_then(ex: Exchange, then: str) -> None:
    await echo(ex)
    ex.then = then


async def test_stale_reused_upstream_is_retried_once_for_get(autojump_clock: Clock) -> None:
    async with mesh(lambda ex: answer_then(ex, "close")) as m:
        c = await m.connect()
        assert (await c.request(target=b"/1")).status == 200
        await m.app.changes.until(lambda: m.app.ended == 1)  # the app closed it while pooled
        r = await c.request(target=b"/2")
        assert (r.status, r.body) == (200, b"GET /2")
        await m.route.settled(2)
        assert m.route.opens == [False, False, True]  # the retry asks for a fresh connection
        assert [failed for _, failed in m.route.released] == [False, True, False]
        assert m.route.released[1][0].reused
        assert m.route.recorded == [(b"GET", 200), (b"GET", 200)]
        assert m.app.connections == 2


async def test_stale_reused_upstream_is_not_retried_for_post(autojump_clock: Clock) -> None:
    async with mesh(lambda ex: answer_then(ex, "close")) as m:
        c = await m.connect()
        assert (await c.request(target=b"/1")).status == 200
        await m.app.changes.until(lambda: m.app.ended == 1)
        r = await c.request(b"POST", b"/2", body=b"not twice")
        assert r.status == 502
        assert r.header(ERROR_HEADER) == b"upstream closed connection"
        await m.route.settled(2)
        assert m.route.opens == [False, False]
        assert len(m.app.exchanges) == 1
        assert m.app.connections == 1


async def test_stale_upstream_closed_with_fin_is_retried_for_get(autojump_clock: Clock) -> None:
    async with mesh(lambda ex: answer_then(ex, "fin")) as m:
        c = await m.connect()
        assert (await c.request(target=b"/1")).status == 200
        await m.app.changes.until(lambda: m.app.fins == 1)
        r = await c.request(target=b"/2")  # the head is written fine; the read sees EOF
        assert (r.status, r.body) == (200, b"GET /2")


async def test_stale_upstream_reset_after_the_request_is_retried(autojump_clock: Clock) -> None:
    async def second_request_resets(ex: Exchange) -> None:
        await ex.read_body()
        if ex.nth == 0:
            await ex.respond(200, b"first")
        else:
            ex.then = "close"  # seen by the proxy as ECONNRESET on read (a Resetting stream)

    async with mesh(second_request_resets, resetting_upstreams=True) as m:
        c = await m.connect()
        assert (await c.request(target=b"/1")).body == b"first"
        r = await c.request(target=b"/2")
        assert (r.status, r.body) == (200, b"first")
        assert m.route.opens == [False, False, True]


# --- the client going away ----------------------------------------------------------------------


async def test_client_closing_mid_request_releases_the_upstream_as_failed(
    autojump_clock: Clock,
) -> None:
    async with mesh() as m:
        c = await m.connect()
        await c.send(
            h11.Request(
                method="POST", target="/", headers=[("host", "web"), ("content-length", "10")]
            ),
            h11.Data(data=b"0123"),
        )
        await m.app.changes.until(
            lambda: bool(m.app.exchanges) and m.app.exchanges[0].body == b"0123"
        )
        await c.stream.aclose()
        await c.wait_served()  # no exception escaped serve_http1 (the nursery would re-raise it)
        await m.route.settled(1)
        # Agent a cut its link mid-request (a truncated body is the client's error, a 400 it
        # cannot read); agent b saw its caller go away: the app is not to blame, and its
        # half-fed connection is closed, never pooled.
        assert [failed for _, failed in m.route.released] == [False]
        assert m.route.recorded == [(b"POST", 0)]
        await m.app.changes.until(lambda: m.app.ended == 1)
        assert not m.app.exchanges[0].complete


async def test_client_reset_mid_request_closes_the_upstream(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect(resetting=True)
        await c.send(
            h11.Request(
                method="POST", target="/", headers=[("host", "web"), ("content-length", "10")]
            ),
            h11.Data(data=b"0123"),
        )
        await m.app.changes.until(
            lambda: bool(m.app.exchanges) and m.app.exchanges[0].body == b"0123"
        )
        await c.stream.aclose()  # arrives at the proxy as ECONNRESET
        await c.wait_served()
        await m.route.settled(1)
        assert m.route.recorded == [(b"POST", 0)]
        # Released as not failed (the endpoint did nothing wrong), yet never pooled half-sent.
        assert [failed for _, failed in m.route.released] == [False]
        assert m.route.pool.idle_count() == 0
        await m.app.changes.until(lambda: m.app.ended == 1)


async def test_client_reset_while_waiting_for_the_response(autojump_clock: Clock) -> None:
    release = trio.Event()

    async def slow(ex: Exchange) -> None:
        await ex.read_body()
        await release.wait()
        await ex.respond(200, b"late")

    async with mesh(slow) as m:
        c = await m.connect(resetting=True)
        await c.send(
            h11.Request(method="GET", target="/", headers=[("host", "web")]), h11.EndOfMessage()
        )
        await m.app.changes.until(lambda: len(m.app.exchanges) == 1)
        await c.stream.aclose()
        release.set()
        await c.wait_served()
        await m.route.settled(1)
        # Agent a could not deliver the response: cut off (status 0, class "error").  Agent b
        # may have delivered it to agent a first, or seen the link close: either is true.
        assert m.pair.statuses("outbound") == {"error": 1}
        assert m.route.recorded in ([(b"GET", 200)], [(b"GET", 0)])


# --- idle, drain, CONNECT -----------------------------------------------------------------------


async def test_idle_timeout_ends_a_keep_alive_connection(autojump_clock: Clock) -> None:
    async with mesh() as m:
        c = await m.connect(idle_timeout=2.0)
        assert (await c.request()).status == 200
        start = trio.current_time()
        await c.wait_served()
        assert trio.current_time() - start == pytest.approx(2.0)
        assert await c.raw_until_eof() == b""


async def test_drain_ends_an_idle_keep_alive_connection(autojump_clock: Clock) -> None:
    idle = IdleSet()
    async with mesh() as m:
        c = await m.connect(idle=idle)
        other = await m.connect(idle=idle)
        assert (await c.request()).status == 200
        start = trio.current_time()
        idle.drain()
        await c.wait_served()
        await other.wait_served()  # never sent anything: ends too
        assert trio.current_time() == start  # at once, not at the idle timeout
        assert idle.scopes == set()


async def test_drain_lets_the_request_in_flight_finish(autojump_clock: Clock) -> None:
    idle = IdleSet()
    go = trio.Event()

    async def slow(ex: Exchange) -> None:
        await ex.read_body()
        await go.wait()
        await ex.respond(200, b"finished")

    async with mesh(slow) as m:
        c = await m.connect(idle=idle)
        await c.send(
            h11.Request(method="GET", target="/", headers=[("host", "web")]), h11.EndOfMessage()
        )
        await m.app.changes.until(lambda: len(m.app.exchanges) == 1)
        idle.drain()
        go.set()
        r = await c.reply()
        assert (r.status, r.body) == (200, b"finished")
        await c.wait_served()


async def test_a_connection_opened_while_draining_is_not_served(autojump_clock: Clock) -> None:
    idle = IdleSet()
    idle.drain()
    async with mesh() as m:
        c = await m.connect(idle=idle)
        await c.wait_served()
        assert m.route.opens == []


async def test_connect_without_a_tunnel_gets_405(autojump_clock: Clock) -> None:
    async with hop() as m:
        c = await m.connect()
        await c.stream.send_all(b"CONNECT 198.18.0.2:443 HTTP/1.1\r\nhost: 198.18.0.2:443\r\n\r\n")
        raw = await c.raw_until_eof()
        assert raw.startswith(b"HTTP/1.1 405 ")
        assert b"\r\nx-nodemesh-error: method not allowed\r\n" in raw
        await c.wait_served()
        assert m.route.opens == []
        assert m.app.connections == 0


class TunnelRoute(Route):
    """A route with a ``tunnel``, as the inbound route has for ``CONNECT ip:port``."""

    def __init__(self, app: App, nursery: trio.Nursery, *, resetting: bool = False) -> None:
        super().__init__(app, nursery, resetting=resetting)
        self.tunnelled: list[bytes] = []

    async def tunnel(self, ds: ServerConn, stream: trio.abc.Stream, req: Request) -> None:
        self.tunnelled.append(req.target)
        await stream.send_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await stream.send_all(b"raw bytes now")


async def test_connect_is_handed_to_the_route_tunnel(autojump_clock: Clock) -> None:
    async with hop(route=TunnelRoute) as m:
        assert isinstance(m.route, TunnelRoute)
        c = await m.connect()
        await c.stream.send_all(b"CONNECT 198.18.0.2:443 HTTP/1.1\r\nhost: 198.18.0.2:443\r\n\r\n")
        raw = await c.raw_until_eof()
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b"\r\n\r\nraw bytes now")
        assert m.route.tunnelled == [b"198.18.0.2:443"]
        assert m.app.connections == 0


# --- framing headers named in Connection --------------------------------------------------------


async def test_connection_naming_content_length_does_not_blame_the_endpoint(
    autojump_clock: Clock,
) -> None:
    async with mesh() as m:
        c = await m.connect()
        r = await c.request(
            b"POST",
            b"/",
            headers=[
                (b"host", b"web"),
                (b"connection", b"content-length"),
                (b"content-length", b"5"),
            ],
            body=b"hello",
        )
        await m.route.settled(1)
        assert [failed for _, failed in m.route.released] == [False]
        assert (r.status, r.body) == (200, b"hello")


# --- upgrades hand the connection to the route's tunnel --------------------------------------


class UpgradeRoute:
    """A route whose tunnel records what it was handed: the request and the bytes after it."""

    authority = AUTHORITY

    def __init__(self) -> None:
        self.handed: list[tuple[bytes, bytes, bytes]] = []

    async def open(self, req: Request, head: RequestHead, *, fresh: bool) -> object:
        raise AssertionError("an upgrade request must not be forwarded as a plain request")

    async def upgrade(self, ds: ServerConn, stream: trio.abc.Stream, req: Request) -> None:
        self.handed.append((req.method, req.target, ds.trailing_data))
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")

    tunnel = upgrade


async def test_upgrade_request_goes_to_the_tunnel_with_the_bytes_after_it() -> None:
    route = UpgradeRoute()
    down, up = trio.testing.memory_stream_pair()
    head = (
        b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_http1, up, route, idle_timeout=5, idle=IdleSet()))
        await down.send_all(head + b"\x81\x05early")
        with trio.fail_after(5):
            got = await down.receive_some(1000)
    assert got.startswith(b"HTTP/1.1 101")
    assert route.handed == [(b"GET", b"/chat", b"\x81\x05early")]


async def test_inbound_does_not_deliver_to_an_address_its_host_does_not_own(
    autojump_clock: Clock,
) -> None:
    """A service registered on b's node at 169.254.169.254 (the cloud's metadata endpoint): a
    resolves it and sends the call to b as the catalog says, and b answers 403 without dialing
    anything, because the kernel says b's host does not own that address.  Before the check, b
    dialed it (here: a 502 from the dial override, and one app link)."""
    metadata = ("169.254.169.254", 80)
    raw = catalog()
    raw["metadata"] = [_entry("b", *metadata)]
    async with mesh() as m:
        _issue(m.pair.b.identities, spiffe.service_id(TD, DC, "metadata"))
        m.pair.a.publish(build(raw, "a"))
        m.pair.b.publish(snapshot.build(raw, "b"))  # the real check: this host's own addresses
        served = trio.Event()
        c = Client(m.pair.connect(metadata, served=served), served)
        r = await c.request(target=b"/latest/meta-data/", headers=[(b"host", b"metadata")])
        assert r.status == 403, (r.status, r.body)
        assert m.pair.app_links == 0
        await c.stream.aclose()


async def test_an_address_two_services_claim_is_refused_not_given_to_either(
    autojump_clock: Clock,
) -> None:
    """``aaa`` registered on b at web's address.  Before, the first name took the address: a's
    calls for web went to b as ``aaa``.  Now a ends the connection without a byte or a dial."""
    raw = catalog()
    raw["aaa"] = [_entry("b", *APP)]
    async with mesh() as m:
        _issue(m.pair.b.identities, spiffe.service_id(TD, DC, "aaa"))
        m.pair.a.publish(build(raw, "a"))
        m.pair.b.publish(build(raw, "b"))
        dialed: list[tuple[str, int]] = []
        dial = m.pair.outbound.dial

        async def recording_dial(host: str, port: int, timeout: float) -> trio.abc.Stream:
            dialed.append((host, port))
            return await dial(host, port, timeout)

        m.pair.outbound.dial = recording_dial
        served = trio.Event()
        stream = m.pair.connect(APP, served=served)
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""
        await served.wait()
        # Refused as ambiguous: not sent to b, nor dialed as egress (plain, to whoever listens).
        assert dialed == []
        assert (m.pair.agent_links, m.pair.app_links) == (0, 0)


# --- the identity a request speaks as ----------------------------------------------------------

SHOP = spiffe.service_id(TD, DC, "shop")


def _outbound_peers(m: Mesh) -> dict[str, int]:
    return {s.peer: s.count for s in m.pair.a.recorder.series() if s.direction == "outbound"}


async def test_a_pooled_connection_never_carries_a_request_for_another_identity(
    autojump_clock: Clock,
) -> None:
    """Host a runs one meshed service, ``shop``, so a speaks as shop; then ``cart`` is
    registered on a too, and a speaks as its node.  Before, the connection pooled as shop
    carried the next calls, so web saw shop while a's metrics said node/a.  Now a request
    rides only a connection opened as the identity it is counted under; and back again."""
    raw = catalog()
    raw["shop"] = [_entry("a", A_IP, 9000)]
    async with mesh() as m:
        _issue(m.pair.a.identities, SHOP)
        m.pair.a.publish(build(raw, "a"))
        c = await m.connect()
        expected = []
        for step in ("shop", "shop and cart", "shop again"):
            if step == "shop and cart":
                raw["cart"] = [_entry("a", A_IP, 9001)]
            elif step == "shop again":
                del raw["cart"]
            m.pair.a.publish(build(raw, "a"))
            r = await c.request(target=b"/" + step.encode().replace(b" ", b"-"))
            assert r.status == 200, r.body
            expected.append([(NODE_A if step == "shop and cart" else SHOP).uri.encode()])
        await m.route.settled(3)
        assert [ex.headers(CLIENT_ID_HEADER) for ex in m.app.exchanges] == expected
        assert _outbound_peers(m) == {SHOP.uri: 2, NODE_A.uri: 1}
        assert m.pair.agent_links == 2  # one per identity; shop's was pooled and reused


async def test_a_source_without_its_certificate_yet_speaks_and_counts_as_the_node(
    autojump_clock: Clock,
) -> None:
    """``shop`` is a's only service but its certificate has not arrived: the connection
    presents the node's, and the request is counted as the node's (before: counted as shop)."""
    raw = catalog()
    raw["shop"] = [_entry("a", A_IP, 9000)]
    async with mesh() as m:
        m.pair.a.publish(build(raw, "a"))
        assert m.pair.a.source_identity() == SHOP
        c = await m.connect()
        assert (await c.request()).status == 200
        await m.route.settled(1)
        assert m.app.exchanges[0].headers(CLIENT_ID_HEADER) == [NODE_A.uri.encode()]
        assert _outbound_peers(m) == {NODE_A.uri: 1}
