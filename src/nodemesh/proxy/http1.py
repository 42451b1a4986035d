"""HTTP/1.1 forwarding: the one forwarder, for both directions.

Theory of operation
-------------------
``serve_http1`` reads requests from a downstream connection with a ``ServerConn``
(``protocol/h1codec.py``: llhttp parses, this module never does): an app's connection on the
outbound side, a peer agent's mTLS connection on the inbound side.  For each request a ``Route``
(outbound: a balanced endpoint's agent over pooled mTLS; inbound: the local app over pooled TCP;
the same anatomy) lends an upstream connection, which speaks through a ``ClientConn``.
``forward`` then moves one exchange:

1. the request head, and as much of its body as has already arrived, go upstream in **one
   write**; a request that is complete by then (every GET, most small POSTs) needs no other
   task: the response is relayed by the same task;
2. a body still arriving is sent by a second task while this one relays the response, so an
   early answer (a 413, a 100 Continue) reaches the client without waiting for the body;
3. the response is relayed event by event, and written downstream whenever the codec needs
   more bytes from upstream, so a response that arrived in one read leaves in **one write**,
   and a streamed one is never held back.

No body byte is copied or re-parsed: a parsed ``Data`` goes out as it is (or as one chunk), and
heads that llhttp already validated are written on from their parsed pieces.

Failure rules (the rescue):
* nothing sent downstream yet → answer with the error's status and an ``x-nodemesh-error``
  header (400 bad request, 502 upstream failed, 503 no endpoints, 504 timeout);
* a response already started → the downstream connection is cut: a truncated response must not
  look complete;
* a *reused* upstream connection that closes before any response byte is retried once on a fresh
  connection, only for an idempotent request without a body: nothing else may be replayed.  (An
  app that closes idle keep-alives sooner than the pool forgets them is the usual cause.)
A request with a body that is not fully read (early response, error) ends the downstream
connection, as HTTP/1.1 requires.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol

import trio

from nodemesh.errors import (
    BadRequest,
    DownstreamClosed,
    MethodNotAllowed,
    NodemeshError,
    ProxyError,
    UpstreamClosed,
    UpstreamProtocolError,
    malformed_request,
)
from nodemesh.protocol.h1codec import (
    NEED_DATA,
    ClientConn,
    Data,
    EndOfMessage,
    ProtocolError,
    Request,
    Response,
    ServerConn,
)
from nodemesh.protocol.http1 import (
    ERROR_HEADER,
    IDEMPOTENT,
    MAX_HEAD_BYTES,
    Headers,
    RequestHead,
    forward_headers,
    read_request,
)
from nodemesh.proxy.pool import Upstream
from nodemesh.transport.edges import IO_ERRORS, describe, downstream_errors

MAX_HEADER_BYTES = MAX_HEAD_BYTES  # request/response head limit; 431 beyond it
READ_SIZE = 64 * 1024


class Route(Protocol):
    """Where a downstream connection's requests go (outbound: a service; inbound: a local app).

    A route may also have ``tunnel`` (for CONNECT) and ``upgrade`` (for ``Upgrade:`` requests),
    ``async (ds, stream, req) -> None``: from then on the connection carries bytes."""

    authority: bytes  # Host to send when an HTTP/1.0 client sent none
    keep_headers: frozenset[bytes]  # x-nodemesh-* response headers the upstream may set

    async def open(
        self, req: Request, head: RequestHead, *, fresh: bool
    ) -> tuple[Upstream, Headers]:
        """An upstream connection and the extra headers to add; raises ProxyError."""

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        """Give the connection back (pool or close) and feed the balancer."""

    def record(self, req: Request, status: int, elapsed: float) -> None:
        """Count one finished request (status 0: cut off after the response started)."""


class Quickack(Protocol):
    def quickack(self) -> None: ...


def _quickack(stream: object) -> None:
    if isinstance(stream, _ReadDeadline):
        stream = stream.inner
    fn = getattr(stream, "quickack", None)
    if fn is not None:
        fn()


async def next_event(conn: ServerConn, stream: trio.abc.ReceiveStream) -> object:
    """The next event from a downstream peer; its I/O errors as ``DownstreamClosed``."""
    while True:
        ev = conn.next_event()
        if ev is not NEED_DATA:
            return ev
        try:
            data = await stream.receive_some(READ_SIZE)
        except IO_ERRORS as e:
            raise DownstreamClosed(describe(e)) from None
        conn.receive_data(data)


async def _send_down(stream: trio.abc.SendStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except IO_ERRORS as e:
        raise DownstreamClosed(describe(e)) from None


async def _send_up(up: Upstream, data: bytes) -> None:
    try:
        await up.stream.send_all(data)
    except IO_ERRORS as e:
        raise UpstreamClosed(f"upstream connection failed: {describe(e)}") from None


class IdleSet:
    """Connections waiting for their next request, so they end between requests: when idle
    past their deadline, or at once when a drain begins (keep-alive connections must not hold
    shutdown open).  ``serve`` is the one task that ends them, by closing the stream the
    connection waits on; its reader then sees the close and the connection's loop returns.

    A waiting connection costs a dict entry, not a timer: a cancel scope (``move_on_after``)
    around each request's wait cost each agent 10-17 us per request, 8-11% of its CPU
    (``bench/datapath.py``, docs/benchmarks.md).  Waits that happen once per connection
    (protocol detection) still use a cancel scope in ``scopes``, which a drain cancels.
    """

    def __init__(self, tick: float = 1.0) -> None:
        self.waiting: dict[trio.abc.AsyncResource, float] = {}  # stream -> idle deadline
        self.scopes: set[trio.CancelScope] = set()
        self.draining = False
        self.on_drain: list[Callable[[], None]] = []  # e.g. close idle HTTP/2 connections
        self._tick = tick  # the longest an idle connection outlives its deadline
        self._wake = trio.Event()

    def drain(self) -> None:
        self.draining = True
        for scope in self.scopes:
            scope.cancel()
        for hook in self.on_drain:
            hook()
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End waiting connections at their deadline, and all of them when a drain begins."""
        task_status.started()
        waiting = self.waiting
        while True:
            now = trio.current_time()
            due = [s for s, deadline in waiting.items() if deadline <= now or self.draining]
            for stream in due:
                del waiting[stream]
                await trio.aclose_forcefully(stream)
            nearest = min(waiting.values(), default=math.inf)
            with trio.move_on_at(min(nearest, trio.current_time() + self._tick)):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()


async def serve_http1(
    stream: trio.abc.Stream,
    route: Route,
    *,
    prefix: bytes = b"",
    idle_timeout: float,
    idle: IdleSet,
) -> None:
    """Serve requests on ``stream`` until it closes, errs, idles or drains (``idle.serve``
    must run for the last two).  Never raises for peer misbehaviour; the caller closes
    ``stream``."""
    ds = ServerConn()
    if prefix:
        ds.receive_data(prefix)
    body_stream = _ReadDeadline(stream, idle_timeout)
    waiting = idle.waiting
    try:
        while not idle.draining:
            waiting[stream] = trio.current_time() + idle_timeout  # idle.serve may close it
            try:
                ev = await next_event(ds, stream)
            except ProtocolError as e:
                detail = f"malformed HTTP/1.1 request: {e}"
                await respond_error(ds, stream, malformed_request(detail, e.error_status_hint))
                return
            finally:
                waiting.pop(stream, None)
            if type(ev) is not Request:
                return  # CLOSED
            head = read_request(ev.method, ev.target, ev.headers)
            if head.refusal is not None:
                if not await respond_error(ds, stream, head.refusal) or ev.method == b"CONNECT":
                    return
                if ev.upgrade:
                    ds.not_upgraded()  # refused, so never upgraded: parse on after its head
                ds.start_next_cycle()
                continue
            if ev.method == b"CONNECT" or (head.upgrade and hasattr(route, "upgrade")):
                await _connect(ds, stream, ev, route)
                return
            if ev.upgrade:
                ds.not_upgraded()  # served as a plain request: parse on after its head
            if not await forward(ds, body_stream, ev, head, route):
                return
            ds.start_next_cycle()
    except DownstreamClosed:
        return


class _ReadDeadline(trio.abc.Stream):
    """The downstream stream as a request body's reader sees it: a read that waits ``timeout``
    without a byte fails like a reset, so a client that stalls mid-body cannot hold its
    connection, an upstream connection and the app's worker forever (slowloris).  Tunnels get
    the bare stream."""

    __slots__ = ("inner", "timeout")

    def __init__(self, inner: trio.abc.Stream, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        with trio.move_on_after(self.timeout):
            return await self.inner.receive_some(max_bytes)
        raise trio.BrokenResourceError(f"no request bytes for {self.timeout:g}s")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _connect(ds: ServerConn, stream: trio.abc.Stream, req: Request, route: Route) -> None:
    """A CONNECT or upgrade request: hand the connection to the route's tunnel, if it has one.

    What the client sent past the head is in ``ds.trailing_data`` for the tunnel to carry on."""
    tunnel = getattr(route, "upgrade" if req.method != b"CONNECT" else "tunnel", None)
    if not ds.request_done or tunnel is None:
        await respond_error(
            ds, stream, MethodNotAllowed("CONNECT is not supported on this listener")
        )
        return
    await tunnel(ds, stream, req)


class _Exchange:
    """State of one request/response exchange shared by the body pump and the relay."""

    __slots__ = ("error", "request_done", "response_started", "status")

    def __init__(self) -> None:
        self.status = 0
        self.response_started = False
        self.request_done = False
        self.error: NodemeshError | None = None


class _Retry(Exception):
    """A reused upstream closed before answering an idempotent, body-less request."""


async def forward(
    ds: ServerConn, dstream: trio.abc.Stream, req: Request, head: RequestHead, route: Route
) -> bool:
    """Proxy one request.  Returns True if the downstream connection may serve another."""
    start = time.perf_counter()
    fresh = False
    while True:
        try:
            up, extra = await route.open(req, head, fresh=fresh)
        except ProxyError as e:
            route.record(req, e.status, time.perf_counter() - start)
            return await respond_error(ds, dstream, e)
        sent = time.perf_counter()
        ex = _Exchange()
        try:
            await _exchange(ds, dstream, up, req, head, extra, route, ex)
        except _Retry:
            await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            fresh = True
            continue
        except ProxyError as e:
            up.conn.mark_spent()
            await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            if ex.response_started:
                route.record(req, 0, time.perf_counter() - start)
                return False
            route.record(req, e.status, time.perf_counter() - start)
            return await respond_error(ds, dstream, e)
        except DownstreamClosed:
            up.conn.mark_spent()
            await route.release(up, failed=False, rtt=time.perf_counter() - sent)
            route.record(req, 0, time.perf_counter() - start)
            return False
        except BaseException:
            # Cancelled (shutdown) or a bug: never pool a connection in an unknown state.
            up.conn.mark_spent()
            with trio.CancelScope(shield=True):
                await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            raise
        await route.release(up, failed=ex.status >= 500, rtt=time.perf_counter() - sent)
        route.record(req, ex.status, time.perf_counter() - start)
        return ex.request_done and ds.reusable


def _trailers(headers: Headers) -> Headers:
    return forward_headers(headers) if headers else headers


def _body_at_hand(ds: ServerConn, conn: ClientConn, out: list[bytes]) -> bool:
    """Re-frame for ``conn`` the request body events ``ds`` already holds, into ``out``.

    True once the request has ended.  The codec raises ``ProtocolError`` for a malformed body."""
    while True:
        ev = ds.next_event()
        t = type(ev)
        if t is Data:
            out.append(conn.send_data(ev.data))  # type: ignore[union-attr]
        elif t is EndOfMessage:
            out.append(conn.send_end(_trailers(ev.headers)))  # type: ignore[union-attr]
            return True
        elif ev is NEED_DATA:
            return False
        else:
            raise BadRequest("request body ended unexpectedly")


async def _exchange(
    ds: ServerConn,
    dstream: trio.abc.Stream,
    up: Upstream,
    req: Request,
    head: RequestHead,
    extra: Headers,
    route: Route,
    ex: _Exchange,
) -> None:
    headers = head.headers + extra
    if not head.has_host:
        headers.append((b"host", route.authority))
    conn = up.conn
    try:
        # Validated by llhttp on the way in (the route's own extras are checked where made).
        out = [conn.send_request(req.method, req.target, headers, req.framing)]
        if ds.request_done:  # no body, or a retry: the first attempt already read the request
            out.append(conn.send_end())
            ex.request_done = True
        else:
            ex.request_done = _body_at_hand(ds, conn, out)
    except ProtocolError as e:
        raise BadRequest(f"malformed request body: {e}") from None
    try:
        await _send_up(up, b"".join(out))
        if ex.request_done:
            await _relay_response(ds, dstream, up, ex, route.keep_headers)
            return
    except UpstreamClosed:
        if up.reused and not ex.response_started and not head.has_body and req.method in IDEMPOTENT:
            raise _Retry() from None
        raise
    await pump_beside_relay(
        partial(_pump_body, ds, dstream, up, ex),
        partial(_relay_response, ds, dstream, up, ex, route.keep_headers),
        ex,
        UpstreamProtocolError,
    )


class ErrorSlot(Protocol):
    error: NodemeshError | None


async def pump_beside_relay(
    pump: Callable[[trio.CancelScope], Awaitable[None]],
    relay: Callable[[], Awaitable[None]],
    state: ErrorSlot,
    protocol_error: Callable[[str], NodemeshError],
) -> None:
    """Send the rest of a request body (``pump``) while its response comes back (``relay``).

    The pump records its own failure in ``state.error`` and cancels the scope it is handed; a
    relay failure lands there too (a codec protocol error as ``protocol_error``).  When the
    response has finished (or failed), a body still being sent is abandoned.  Then the recorded
    error, if any, is raised.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, nursery.cancel_scope)
        try:
            await relay()
        except (NodemeshError, ProtocolError) as e:
            state.error = e if isinstance(e, NodemeshError) else protocol_error(str(e))
        nursery.cancel_scope.cancel()
    if state.error is not None:
        raise state.error


async def _pump_body(
    ds: ServerConn,
    dstream: trio.abc.Stream,
    up: Upstream,
    ex: _Exchange,
    scope: trio.CancelScope,
) -> None:
    conn = up.conn
    try:
        while True:
            _quickack(dstream)  # the client may be waiting on our ACK to send the rest
            try:
                data = await dstream.receive_some(READ_SIZE)
            except IO_ERRORS as e:
                raise DownstreamClosed(describe(e)) from None
            if not data:
                raise BadRequest("request body ended unexpectedly")
            ds.receive_data(data)
            out: list[bytes] = []
            ex.request_done = _body_at_hand(ds, conn, out)
            if out:
                await _send_up(up, b"".join(out))
            if ex.request_done:
                return
    except UpstreamClosed:
        return  # the upstream may still answer (early response); the relay decides
    except ProtocolError as e:
        ex.error = BadRequest(f"malformed request body: {e}")
        scope.cancel()
    except NodemeshError as e:
        ex.error = e
        scope.cancel()


async def _relay_response(
    ds: ServerConn,
    dstream: trio.abc.Stream,
    up: Upstream,
    ex: _Exchange,
    keep: frozenset[bytes],
) -> None:
    conn = up.conn
    out: list[bytes] = []
    received = False
    while True:
        try:
            ev = conn.next_event()
        except ProtocolError as e:
            raise UpstreamProtocolError(f"upstream sent malformed HTTP: {e}") from None
        t = type(ev)
        if t is Data:
            out.append(ds.send_data(ev.data))  # type: ignore[union-attr]
        elif ev is NEED_DATA:
            if out:
                await _send_down(dstream, b"".join(out))
                out = []
            if received:
                # Mid-message: an upstream writing in pieces with Nagle on waits for our ACK.
                _quickack(up.stream)
            try:
                data = await up.stream.receive_some(READ_SIZE)
            except IO_ERRORS as e:
                raise UpstreamClosed(f"upstream connection failed: {describe(e)}") from None
            conn.receive_data(data)
            received = True
        elif t is Response:
            status = ev.status_code  # type: ignore[union-attr]
            if status >= 200:
                ex.status = status
                hdrs = forward_headers(ev.headers, keep=keep)  # type: ignore[union-attr]
                out.append(ds.send_response(ev, hdrs))  # type: ignore[arg-type]
                ex.response_started = True
            elif status == 101:
                raise UpstreamProtocolError(
                    "upstream switched protocols without an upgrade request"
                )
            else:
                hdrs = forward_headers(ev.headers)  # type: ignore[union-attr]
                out.append(ds.send_response(ev, hdrs))  # type: ignore[arg-type]
        elif t is EndOfMessage:
            out.append(ds.send_end(_trailers(ev.headers)))  # type: ignore[union-attr]
            await _send_down(dstream, b"".join(out))
            return
        elif ex.response_started:  # CLOSED mid-response
            raise UpstreamClosed("upstream closed the connection before the response ended")
        else:
            raise UpstreamClosed("upstream closed the connection before responding")


async def respond_error(ds: ServerConn, dstream: trio.abc.Stream, err: ProxyError) -> bool:
    """Answer ``err`` if no response has started.  True if the connection may continue."""
    body = f"{err.detail}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (ERROR_HEADER, err.reason.encode()),
    ]
    out = ds.send_error(err.status, headers, body)
    if out is None:
        return False
    try:
        with downstream_errors():
            await dstream.send_all(out)
    except DownstreamClosed:
        return False
    return ds.reusable
