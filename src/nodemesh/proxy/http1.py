"""HTTP/1.1 forwarding with h11: one downstream server connection, pooled upstream connections.

Theory of operation
-------------------
``serve_http1`` reads requests from a downstream connection (an app, or a peer agent) with an h11
server state machine.  For each request a ``Route`` (outbound or inbound: same anatomy) picks an
upstream connection; ``forward`` sends the request head, then streams the request body upstream
in one task while this task streams the response downstream, event by event, so no body is ever
held whole.  Interim responses (``100 Continue``, ``103``) are relayed as they come, which is all
``Expect: 100-continue`` needs.  h11 re-frames each hop (Content-Length or chunked, with trailers);
hop-by-hop headers are dropped (``protocol/http1.py``).

Failure rules (the rescue):
* nothing sent downstream yet → answer with the error's status and an ``x-nodemesh-error``
  header (400 bad request, 502 upstream failed, 503 no endpoints, 504 timeout);
* a response already started → the downstream connection is cut: a truncated response must not
  look complete;
* a *reused* upstream connection that closes before any response byte is retried once on a fresh
  connection, only for an idempotent request without a body: nothing else may be replayed.
A request with a body that is not fully read (early response, error) ends the downstream
connection, as HTTP/1.1 requires.  Requests without a body skip the body task entirely: the fast
path is one send and one event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Protocol

import h11
import trio

from nodemesh.errors import (
    BadRequest,
    DownstreamClosed,
    NodemeshError,
    ProxyError,
    UpstreamClosed,
    UpstreamProtocolError,
)
from nodemesh.protocol.http1 import ERROR_HEADER, IDEMPOTENT, forward_headers, header
from nodemesh.proxy.pool import Upstream
from nodemesh.transport.edges import downstream_errors, upstream_errors

MAX_HEADER_BYTES = 64 * 1024  # request/response head limit; h11 answers 431 beyond it
READ_SIZE = 64 * 1024


class ServerRoute(Protocol):
    """What ``serve_http1`` needs: a way to forward each request (and maybe tunnels)."""

    async def forward(self, ds: h11.Connection, stream: trio.abc.Stream, req: h11.Request) -> bool:
        """Proxy one request; True if the downstream connection may serve another."""


class Route(Protocol):
    """Where a downstream connection's requests go (outbound: a service; inbound: a local app)."""

    authority: bytes  # Host to send when an HTTP/1.0 client sent none

    async def open(
        self, req: h11.Request, *, fresh: bool
    ) -> tuple[Upstream, list[tuple[bytes, bytes]]]:
        """An upstream connection and the extra headers to add; raises ProxyError."""

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None:
        """Give the connection back (pool or close) and feed the balancer."""

    def record(self, req: h11.Request, status: int, elapsed: float) -> None:
        """Count one finished request (status 0: cut off after the response started)."""


async def next_event(
    conn: h11.Connection,
    stream: trio.abc.ReceiveStream,
    errors: Callable[[], AbstractContextManager[None]],
) -> h11.Event | type[h11.PAUSED]:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev  # type: ignore[return-value]
        with errors():
            data = await stream.receive_some(READ_SIZE)
        conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes bytearray too


class IdleSet:
    """Cancel scopes of connections waiting for their next request; a drain cancels them all,
    so keep-alive connections end between requests instead of holding shutdown open."""

    def __init__(self) -> None:
        self.scopes: set[trio.CancelScope] = set()
        self.draining = False
        self.on_drain: list[Callable[[], None]] = []  # e.g. close idle HTTP/2 connections

    def drain(self) -> None:
        self.draining = True
        for scope in self.scopes:
            scope.cancel()
        for hook in self.on_drain:
            hook()


async def serve_http1(
    stream: trio.abc.Stream,
    route: ServerRoute,
    *,
    prefix: bytes = b"",
    idle_timeout: float,
    idle: IdleSet | None = None,
) -> None:
    """Serve requests on ``stream`` until it closes, errs, idles or drains.  Never raises for
    peer misbehaviour; the caller closes ``stream``."""
    ds = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    if prefix:
        ds.receive_data(prefix)
    idle = idle or IdleSet()
    try:
        while not idle.draining:
            ev: object = None
            with trio.move_on_after(idle_timeout) as scope:
                idle.scopes.add(scope)
                try:
                    ev = await next_event(ds, stream, downstream_errors)
                except h11.RemoteProtocolError as e:
                    err = BadRequest(f"malformed HTTP/1.1 request: {e}")
                    err.status = e.error_status_hint
                    await respond_error(ds, stream, err)
                    return
                finally:
                    idle.scopes.discard(scope)
            if not isinstance(ev, h11.Request):
                return  # idle timeout, ConnectionClosed
            refused = refuse(ev)
            if refused is not None:
                if not await respond_error(ds, stream, refused):
                    return
                ds.start_next_cycle()
                continue
            if ev.method == b"CONNECT" or (
                _wants_upgrade(ev) and getattr(route, "upgrade", None) is not None
            ):
                await _connect(ds, stream, ev, route)
                return
            if not await route.forward(ds, _ReadDeadline(stream, idle_timeout), ev):
                return
            ds.start_next_cycle()
    except DownstreamClosed:
        return


def refuse(req: h11.Request) -> BadRequest | None:
    """The error for a request h11 accepts but a proxy must not forward, else None."""
    size = len(req.method) + len(req.target) + 12 + sum(len(n) + len(v) + 4 for n, v in req.headers)
    if size > MAX_HEADER_BYTES:
        # h11 bounds only an *incomplete* head: one that completes in the read after the limit
        # would otherwise pass at up to twice the size, and the app's refusal would look like
        # the endpoint failing.
        err = BadRequest(f"request head of {size} bytes is over the {MAX_HEADER_BYTES}-byte limit")
        err.status = 431
        return err
    if header(req.headers, b"transfer-encoding") is not None and (
        header(req.headers, b"content-length") is not None
    ):
        # RFC 9112 §6.1: the two framings may disagree on where this request ends; an app that
        # trusts Content-Length would read a request the mesh never saw (request smuggling).
        return BadRequest("request has both Transfer-Encoding and Content-Length; send one")
    return None


class _ReadDeadline(trio.abc.Stream):
    """The downstream stream as ``forward`` sees it: a read that waits ``timeout`` without a byte
    fails like a reset, so a client that stalls mid-body cannot hold its connection, an upstream
    connection and the app's worker forever (slowloris).  Tunnels get the bare stream."""

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


def _wants_upgrade(req: h11.Request) -> bool:
    """``Connection: upgrade`` + ``Upgrade`` (WebSocket and friends), without a body."""
    conn = header(req.headers, b"connection")
    return (
        conn is not None
        and b"upgrade" in (t.strip().lower() for t in conn.split(b","))
        and header(req.headers, b"upgrade") is not None
        and not _has_body(req)
    )


async def _connect(
    ds: h11.Connection, stream: trio.abc.Stream, req: h11.Request, route: ServerRoute
) -> None:
    """A CONNECT or upgrade request: hand the connection to the route's tunnel, if it has one.

    After the request's end h11 pauses (it may switch protocols); what the client sent past the
    head is in ``ds.trailing_data`` for the tunnel to carry on."""
    try:
        end = await next_event(ds, stream, downstream_errors)
    except h11.RemoteProtocolError:
        end = None
    tunnel = getattr(route, "upgrade" if req.method != b"CONNECT" else "tunnel", None)
    if not isinstance(end, h11.EndOfMessage) or tunnel is None:
        err = BadRequest("CONNECT is not supported on this listener")
        err.status = 405
        await respond_error(ds, stream, err)
        return
    await tunnel(ds, stream, req)


def _has_body(req: h11.Request) -> bool:
    te = header(req.headers, b"transfer-encoding")
    if te is not None:
        return True
    cl = header(req.headers, b"content-length")
    return cl is not None and cl.strip() not in (b"0", b"")


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
    ds: h11.Connection, dstream: trio.abc.Stream, req: h11.Request, route: Route
) -> bool:
    """Proxy one request.  Returns True if the downstream connection may serve another."""
    start = time.perf_counter()
    has_body = _has_body(req)
    fresh = False
    while True:
        try:
            up, extra = await route.open(req, fresh=fresh)
        except ProxyError as e:
            route.record(req, e.status, time.perf_counter() - start)
            if not has_body and ds.their_state is h11.SEND_BODY:
                await next_event(ds, dstream, downstream_errors)  # the EndOfMessage: keep-alive
            return await respond_error(ds, dstream, e)
        sent = time.perf_counter()
        ex = _Exchange()
        try:
            await _exchange(ds, dstream, up, req, extra, has_body, route.authority, ex)
        except _Retry:
            await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            fresh = True
            continue
        except ProxyError as e:
            await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            if ex.response_started:
                route.record(req, 0, time.perf_counter() - start)
                return False
            route.record(req, e.status, time.perf_counter() - start)
            return await respond_error(ds, dstream, e)
        except DownstreamClosed:
            await route.release(up, failed=False, rtt=time.perf_counter() - sent)
            route.record(req, 0, time.perf_counter() - start)
            return False
        except BaseException:
            # Cancelled (shutdown) or a bug: never pool a connection in an unknown state.
            with trio.CancelScope(shield=True):
                await route.release(up, failed=True, rtt=time.perf_counter() - sent)
            raise
        await route.release(up, failed=ex.status >= 500, rtt=time.perf_counter() - sent)
        route.record(req, ex.status, time.perf_counter() - start)
        return ex.request_done and ds.our_state is h11.DONE and ds.their_state is h11.DONE


async def _exchange(
    ds: h11.Connection,
    dstream: trio.abc.Stream,
    up: Upstream,
    req: h11.Request,
    extra: list[tuple[bytes, bytes]],
    has_body: bool,
    authority: bytes,
    ex: _Exchange,
) -> None:
    headers = forward_headers(req.headers, extra)
    if header(headers, b"host") is None:
        headers.append((b"host", authority))
    try:
        head = up.conn.send(h11.Request(method=req.method, target=req.target, headers=headers))
    except h11.LocalProtocolError as e:
        raise BadRequest(f"request cannot be forwarded: {e}") from None
    try:
        with upstream_errors():
            await up.stream.send_all(head)
        if not has_body:
            if ds.their_state is not h11.DONE:  # a retry: the first attempt already read it
                ev = await next_event(ds, dstream, downstream_errors)
                if not isinstance(ev, h11.EndOfMessage):
                    raise BadRequest("request body without framing")
            ex.request_done = True
            with upstream_errors():
                await up.stream.send_all(up.conn.send(h11.EndOfMessage()))
            await _relay_response(ds, dstream, up, ex)
            return
    except UpstreamClosed:
        if up.reused and not ex.response_started and not has_body and req.method in IDEMPOTENT:
            raise _Retry() from None
        raise
    except h11.RemoteProtocolError as e:
        raise BadRequest(f"malformed request body: {e}") from None

    await pump_beside_relay(
        partial(_pump_body, ds, dstream, up, ex),
        partial(_relay_response, ds, dstream, up, ex),
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
    """Send a request body (``pump``) while its response comes back (``relay``).

    The pump records its own failure in ``state.error`` and cancels the scope it is handed; a
    relay failure lands there too (an h11 protocol error as ``protocol_error``).  When the
    response has finished (or failed), a body still being sent is abandoned.  Then the recorded
    error, if any, is raised.  Every proxy direction (h11 to h11, h11 to h2, h2 to h11) runs its
    exchange through here.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, nursery.cancel_scope)
        try:
            await relay()
        except (NodemeshError, h11.ProtocolError) as e:
            state.error = e if isinstance(e, NodemeshError) else protocol_error(str(e))
        nursery.cancel_scope.cancel()
    if state.error is not None:
        raise state.error


async def _pump_body(
    ds: h11.Connection,
    dstream: trio.abc.Stream,
    up: Upstream,
    ex: _Exchange,
    scope: trio.CancelScope,
) -> None:
    try:
        while True:
            ev = await next_event(ds, dstream, downstream_errors)
            if isinstance(ev, h11.Data):
                out = up.conn.send(ev)
            elif isinstance(ev, h11.EndOfMessage):
                out = up.conn.send(h11.EndOfMessage(headers=ev.headers))
                ex.request_done = True
            else:
                raise BadRequest("request body ended unexpectedly")
            with upstream_errors():
                await up.stream.send_all(out)
            if ex.request_done:
                return
    except UpstreamClosed:
        return  # the upstream may still answer (early response); the relay decides
    except h11.RemoteProtocolError as e:
        ex.error = BadRequest(f"malformed request body: {e}")
        scope.cancel()
    except (NodemeshError, h11.LocalProtocolError) as e:
        ex.error = e if isinstance(e, NodemeshError) else UpstreamProtocolError(str(e))
        scope.cancel()


async def _relay_response(
    ds: h11.Connection, dstream: trio.abc.Stream, up: Upstream, ex: _Exchange
) -> None:
    while True:
        try:
            ev = await next_event(up.conn, up.stream, upstream_errors)
        except h11.RemoteProtocolError as e:
            if not ex.response_started and up.conn.trailing_data == (b"", True):
                raise UpstreamClosed("upstream closed the connection before responding") from None
            raise UpstreamProtocolError(f"upstream sent malformed HTTP: {e}") from None
        if isinstance(ev, h11.Data):
            out = ds.send(ev)
        elif isinstance(ev, h11.Response):
            ex.status = ev.status_code
            out = ds.send(
                h11.Response(
                    status_code=ev.status_code,
                    headers=forward_headers(ev.headers),
                    reason=ev.reason,
                )
            )
            ex.response_started = True
        elif isinstance(ev, h11.InformationalResponse):
            if ev.status_code == 101:
                raise UpstreamProtocolError(
                    "upstream switched protocols without an upgrade request"
                )
            out = ds.send(
                h11.InformationalResponse(
                    status_code=ev.status_code,
                    headers=forward_headers(ev.headers),
                    reason=ev.reason,
                )
            )
        elif isinstance(ev, h11.EndOfMessage):
            out = ds.send(h11.EndOfMessage(headers=ev.headers))
            with downstream_errors():
                await dstream.send_all(out)
            return
        else:  # ConnectionClosed mid-response
            raise UpstreamClosed("upstream closed the connection before the response ended")
        with downstream_errors():
            await dstream.send_all(out)


async def respond_error(ds: h11.Connection, dstream: trio.abc.Stream, err: ProxyError) -> bool:
    """Answer ``err`` if no response has started.  True if the connection may continue.

    Our side is IDLE when the request head itself was malformed: h11 still lets us answer."""
    if ds.our_state is not h11.SEND_RESPONSE and ds.our_state is not h11.IDLE:
        return False
    body = f"{err.detail}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (ERROR_HEADER, err.reason.encode()),
    ]
    if ds.their_state is not h11.DONE:
        headers.append((b"connection", b"close"))
    try:
        out = ds.send(h11.Response(status_code=err.status, headers=headers))
    except h11.LocalProtocolError:
        return False
    # h11 refuses a body only in answer to HEAD, for which the head is the whole answer; h11 is
    # in its ERROR state then, so the connection ends after this response.
    with contextlib.suppress(h11.LocalProtocolError):
        out += ds.send(h11.Data(data=body)) + ds.send(h11.EndOfMessage())
    try:
        with downstream_errors():
            await dstream.send_all(out)
    except DownstreamClosed:
        return False
    return ds.our_state is h11.DONE and ds.their_state is h11.DONE  # type: ignore[comparison-overlap]
