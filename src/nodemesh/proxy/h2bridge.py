"""HTTP/1.1 from apps carried as HTTP/2 streams between agents, and restored on the far side.

Theory of operation
-------------------
Outbound, ``forward_over_h2`` turns one h11 request into one stream on a multiplexed connection
to the destination's agent: the request line becomes pseudo-headers, hop-by-hop headers go,
body chunks become DATA frames as they arrive, and trailers travel as trailers.  The response
comes back the other way event by event.  Inbound, ``serve_stream`` does the reverse towards
the local app over a pooled HTTP/1.1 connection (``proxy/http1.py`` conventions: the same
rescue, the same header rules).  Flow control on the stream and h11's event-by-event reads
together give end-to-end back-pressure: nothing is buffered whole.

``CONNECT ip:port`` streams carry opaque TCP (``splice_stream``): END_STREAM is a half-close in
either direction, so a client's FIN arrives at the server as a FIN, across the mesh.

Retries: a stream the peer reports as unprocessed (REFUSED_STREAM, or above a GOAWAY's last id)
is retried once on another connection when its request had no body, whatever the method.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from http import HTTPStatus
from typing import Protocol

import h2.errors
import h11
import trio

from nodemesh import log
from nodemesh.errors import (
    BadRequest,
    DownstreamClosed,
    NodemeshError,
    ProxyError,
    UpstreamClosed,
    UpstreamProtocolError,
)
from nodemesh.protocol.http1 import ERROR_HEADER, MESH_PREFIX, forward_headers, header
from nodemesh.proxy.http1 import _has_body, next_event, pump_beside_relay, respond_error
from nodemesh.proxy.pool import Upstream
from nodemesh.transport.edges import IO_ERRORS, downstream_errors, upstream_errors
from nodemesh.transport.h2conn import H2Stream, Headers, StreamError

CHUNK = 64 * 1024
_log = log.get("nodemesh.h2bridge")
# Connection-specific headers HTTP/2 forbids (RFC 9113 §8.2.2), beyond the hop-by-hop set.
H2_FORBIDDEN = frozenset({b"host", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade"})


def to_h2_request(req: h11.Request, extra: Headers, authority: bytes) -> Headers:
    hdrs = forward_headers(req.headers, extra)
    host = header(req.headers, b"host") or authority
    out = [
        (b":method", req.method),
        (b":scheme", b"http"),
        (b":authority", host),
        (b":path", req.target),
    ]
    out.extend((n, v) for n, v in hdrs if n not in H2_FORBIDDEN)
    return out


def split_pseudo(headers: Headers) -> tuple[dict[bytes, bytes], Headers]:
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for n, v in headers:
        if n[:1] == b":":
            pseudo[n] = v
        else:
            regular.append((n, v))
    return pseudo, regular


def to_h2_response(status: int, headers: Headers) -> Headers:
    out = [(b":status", str(status).encode())]
    out.extend((n, v) for n, v in forward_headers(headers) if n not in H2_FORBIDDEN)
    return out


# --- outbound: an app's HTTP/1.1 request over a mesh stream -----------------------------------


class StreamRoute(Protocol):
    authority: bytes

    async def open_stream(self, req: h11.Request, head: Headers, *, end: bool) -> H2Stream:
        """Pick an endpoint, open a stream to its agent and send ``head`` (+ its mesh headers)."""

    def done(self, *, failed: bool, rtt: float) -> None:
        """The exchange on the last opened stream ended (feeds the balancer)."""

    def record(self, req: h11.Request, status: int, elapsed: float) -> None: ...


async def forward_over_h2(
    ds: h11.Connection, dstream: trio.abc.Stream, req: h11.Request, route: StreamRoute
) -> bool:
    """Proxy one app request over HTTP/2.  True if the app connection may serve another."""
    start = time.perf_counter()
    has_body = _has_body(req)
    if not has_body:
        ev = await next_event(ds, dstream, downstream_errors)  # the EndOfMessage
        if not isinstance(ev, h11.EndOfMessage):
            return await _fail(ds, dstream, req, route, start, BadRequest("body without framing"))
    head = to_h2_request(req, [], route.authority)
    for attempt in (1, 2):
        try:
            stream = await route.open_stream(req, head, end=not has_body)
        except ProxyError as e:
            return await _fail(ds, dstream, req, route, start, e)
        sent = time.perf_counter()
        st = _State()
        try:
            if has_body:
                await pump_beside_relay(
                    partial(_pump_h1_body, ds, dstream, stream, st),
                    partial(_relay_h2_response, ds, dstream, stream, st),
                    st,
                    BadRequest,
                )
            else:
                st.request_done = True
                await _relay_h2_response(ds, dstream, stream, st)
        except StreamError as e:
            stream.reset()
            route.done(failed=True, rtt=time.perf_counter() - sent)
            if e.unprocessed and not has_body and not st.response_started and attempt == 1:
                continue
            if st.response_started:
                route.record(req, 0, time.perf_counter() - start)
                return False
            return await _fail(ds, dstream, req, route, start, e)
        except ProxyError as e:
            stream.reset()
            route.done(failed=True, rtt=time.perf_counter() - sent)
            return await _fail(ds, dstream, req, route, start, e)
        except DownstreamClosed:
            stream.reset()
            route.done(failed=False, rtt=time.perf_counter() - sent)
            route.record(req, 0, time.perf_counter() - start)
            return False
        except BaseException:
            stream.reset()
            route.done(failed=True, rtt=time.perf_counter() - sent)
            raise
        route.done(failed=st.status >= 500, rtt=time.perf_counter() - sent)
        route.record(req, st.status, time.perf_counter() - start)
        if not st.request_done:
            stream.reset()  # early response: the rest of the request body is not wanted
        return st.request_done and ds.our_state is h11.DONE and ds.their_state is h11.DONE
    raise AssertionError("unreachable")


async def _fail(
    ds: h11.Connection,
    dstream: trio.abc.Stream,
    req: h11.Request,
    route: StreamRoute,
    start: float,
    err: ProxyError,
) -> bool:
    route.record(req, err.status, time.perf_counter() - start)
    return await respond_error(ds, dstream, err)


class _State:
    __slots__ = ("chunked", "error", "request_done", "response_started", "status")

    def __init__(self) -> None:
        self.status = 0
        self.chunked = False
        self.response_started = False
        self.request_done = False
        self.error: NodemeshError | None = None


async def _pump_h1_body(
    ds: h11.Connection,
    dstream: trio.abc.Stream,
    stream: H2Stream,
    st: _State,
    scope: trio.CancelScope,
) -> None:
    try:
        while True:
            ev = await next_event(ds, dstream, downstream_errors)
            if isinstance(ev, h11.Data):
                await stream.send_data(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                await stream.end(list(ev.headers) or None)
                st.request_done = True
                return
            else:
                raise BadRequest("request body ended unexpectedly")
    except StreamError:
        return  # the response side reports what happened
    except h11.RemoteProtocolError as e:
        st.error = BadRequest(f"malformed request body: {e}")
        scope.cancel()
    except NodemeshError as e:
        st.error = e
        scope.cancel()


async def _relay_h2_response(
    ds: h11.Connection, dstream: trio.abc.Stream, stream: H2Stream, st: _State
) -> None:
    trailers: Headers = []
    while True:
        ev = await stream.next_event()
        kind = ev[0]
        if kind == "data":
            out = ds.send(h11.Data(data=ev[1]))
        elif kind == "headers":
            pseudo, regular = split_pseudo(ev[1])
            st.status = int(pseudo.get(b":status", b"502"))
            hdrs = forward_headers(regular)
            # h11 frames a response without Content-Length as chunked for an HTTP/1.1 client;
            # only then can trailers be written.
            st.chunked = header(hdrs, b"content-length") is None and ds.their_http_version == b"1.1"
            out = ds.send(
                h11.Response(status_code=st.status, headers=hdrs, reason=_phrase(st.status))
            )
            st.response_started = True
        elif kind == "info":
            pseudo, regular = split_pseudo(ev[1])
            code = int(pseudo.get(b":status", b"100"))
            if code == 101:
                continue  # never valid in HTTP/2
            out = ds.send(
                h11.InformationalResponse(
                    status_code=code, headers=forward_headers(regular), reason=_phrase(code)
                )
            )
        elif kind == "trailers":
            trailers = ev[1]
            continue
        else:  # "end"
            if not st.response_started:
                raise StreamError("peer agent ended the stream without a response")
            out = ds.send(h11.EndOfMessage(headers=trailers if st.chunked else []))
            with downstream_errors():
                await dstream.send_all(out)
            return
        with downstream_errors():
            await dstream.send_all(out)


def _phrase(status: int) -> bytes:
    """HTTP/2 carries no reason phrase; restore the standard one for HTTP/1.1 clients."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


# --- both sides: opaque bytes on a CONNECT stream ---------------------------------------------


class Counter(Protocol):
    bytes_in: int
    bytes_out: int


async def splice_stream(app: trio.abc.Stream, stream: H2Stream, stats: Counter) -> None:
    """Copy bytes between a TCP stream and a CONNECT stream until both directions end.

    ``bytes_in`` counts app → mesh, ``bytes_out`` mesh → app.  EOF from the app ends the
    stream's sending side (END_STREAM); END_STREAM from the peer half-closes the app socket.
    """

    async with trio.open_nursery() as nursery:

        async def app_to_mesh() -> None:
            try:
                while True:
                    data = await app.receive_some(CHUNK)
                    if not data:
                        await stream.end()
                        return
                    await stream.send_data(data)
                    stats.bytes_in += len(data)
            except (StreamError, *IO_ERRORS):
                stream.reset()
                nursery.cancel_scope.cancel()

        async def mesh_to_app() -> None:
            try:
                while True:
                    ev = await stream.next_event()
                    if ev[0] == "data":
                        await app.send_all(ev[1])
                        stats.bytes_out += len(ev[1])
                    elif ev[0] == "end":
                        if isinstance(app, trio.abc.HalfCloseableStream):
                            await app.send_eof()
                        return
            except (StreamError, *IO_ERRORS):
                stream.reset()
                nursery.cancel_scope.cancel()

        nursery.start_soon(app_to_mesh)
        nursery.start_soon(mesh_to_app)


# --- inbound: a mesh stream to the local app --------------------------------------------------


async def respond_h2_error(stream: H2Stream, err: ProxyError) -> None:
    body = f"{err.detail}\n".encode()
    await stream.send_headers(
        [
            (b":status", str(err.status).encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (ERROR_HEADER, err.reason.encode()),
        ]
    )
    await stream.send_data(body, end=True)


class AppRoute(Protocol):
    """Where an inbound stream goes: an instance of the local service, over pooled HTTP/1.1."""

    async def open_app(
        self, pseudo: dict[bytes, bytes], regular: Headers
    ) -> tuple[Upstream, Headers]:
        """A connection to the target app and extra headers for it; raises ProxyError."""

    async def release(self, up: Upstream, *, failed: bool, rtt: float) -> None: ...

    def record_status(self, status: int, elapsed: float, pseudo: dict[bytes, bytes]) -> None:
        """Count one finished stream; ``pseudo`` (method, path) names its route."""


async def serve_stream(stream: H2Stream, route: AppRoute, head: Headers) -> None:
    """Deliver one mesh stream to the local app and its response back.  Never raises."""
    start = time.perf_counter()
    pseudo, regular = split_pseudo(head)
    try:
        up, extra = await route.open_app(pseudo, regular)
    except ProxyError as e:
        route.record_status(e.status, time.perf_counter() - start, pseudo)
        await answer_error(stream, e)
        return
    # A body-less request ends the stream with its HEADERS frame.
    has_body = not stream.head_ended and header(regular, b"content-length") != b"0"
    hdrs = [(b"host", pseudo.get(b":authority", b"localhost"))]
    hdrs.extend(forward_headers(regular, extra))
    if has_body and header(hdrs, b"content-length") is None:
        hdrs.append((b"transfer-encoding", b"chunked"))
    st = _State()
    failed = True
    try:
        request = h11.Request(
            method=pseudo.get(b":method", b"GET"), target=pseudo.get(b":path", b"/"), headers=hdrs
        )
        if not has_body:
            # The common case: head and end in one write, no body task.
            st.request_done = True
            with upstream_errors():
                await up.stream.send_all(up.conn.send(request) + up.conn.send(h11.EndOfMessage()))
            try:
                await _relay_h11_response(up, stream, st)
            except h11.ProtocolError as e:
                raise UpstreamProtocolError(str(e)) from None
        else:
            with upstream_errors():
                await up.stream.send_all(up.conn.send(request))
            await pump_beside_relay(
                partial(_pump_h2_body, stream, up, st),
                partial(_relay_h11_response, up, stream, st),
                st,
                UpstreamProtocolError,
            )
        failed = not st.request_done
    except StreamError:
        route.record_status(0, time.perf_counter() - start, pseudo)  # the calling agent went away
    except ProxyError as e:
        route.record_status(
            e.status if not st.response_started else 0, time.perf_counter() - start, pseudo
        )
        if st.response_started:
            stream.reset(ERR_INTERNAL)
        else:
            await answer_error(stream, e)
    except h11.LocalProtocolError as e:
        route.record_status(0, time.perf_counter() - start, pseudo)
        await answer_error(stream, BadRequest(f"request cannot be forwarded: {e}"))
    else:
        route.record_status(st.status, time.perf_counter() - start, pseudo)
    finally:
        with trio.CancelScope(shield=True):
            await route.release(
                up, failed=failed or not up.reusable, rtt=time.perf_counter() - start
            )


ERR_INTERNAL = h2.errors.ErrorCodes.INTERNAL_ERROR


async def answer_error(stream: H2Stream, err: ProxyError) -> None:
    """Answer ``err`` on ``stream`` if the caller is still there (and say why in the log)."""
    _log.info("stream_error_answered", status=err.status, reason=err.reason, detail=err.detail)
    with contextlib.suppress(StreamError):
        await respond_h2_error(stream, err)


async def _pump_h2_body(
    stream: H2Stream, up: Upstream, st: _State, scope: trio.CancelScope
) -> None:
    trailers: Headers = []
    try:
        while True:
            ev = await stream.next_event()
            if ev[0] == "data":
                out = up.conn.send(h11.Data(data=ev[1]))
            elif ev[0] == "trailers":
                trailers = ev[1]
                continue
            elif ev[0] == "end":
                out = up.conn.send(h11.EndOfMessage(headers=trailers))
                st.request_done = True
            else:
                continue
            with upstream_errors():
                await up.stream.send_all(out)
            if st.request_done:
                return
    except UpstreamClosed:
        return  # the app may still answer (early response)
    except (NodemeshError, h11.ProtocolError) as e:
        st.error = e if isinstance(e, NodemeshError) else UpstreamProtocolError(str(e))
        scope.cancel()


async def _relay_h11_response(up: Upstream, stream: H2Stream, st: _State) -> None:
    while True:
        try:
            ev = await next_event(up.conn, up.stream, upstream_errors)
        except h11.RemoteProtocolError as e:
            raise UpstreamProtocolError(f"app sent malformed HTTP: {e}") from None
        if isinstance(ev, h11.Data):
            await stream.send_data(ev.data)
        elif isinstance(ev, h11.Response):
            st.status = ev.status_code
            await stream.send_headers(to_h2_response(ev.status_code, list(ev.headers)))
            st.response_started = True
        elif isinstance(ev, h11.InformationalResponse):
            if ev.status_code == 101:
                raise UpstreamProtocolError("app switched protocols without an upgrade request")
            await stream.send_headers(to_h2_response(ev.status_code, list(ev.headers)))
        elif isinstance(ev, h11.EndOfMessage):
            await stream.end(list(ev.headers) or None)
            return
        else:
            raise UpstreamClosed("app closed the connection before the response ended")


# --- HTTP/2 on both ends: stream to stream ----------------------------------------------------

PROTO_HEADER = b"x-nodemesh-proto"  # "h2": the caller spoke HTTP/2, so speak it to the app


def mesh_free(headers: Headers) -> Headers:
    """``headers`` without the mesh's own (an app must never set them)."""
    return [(n, v) for n, v in headers if not n.startswith(MESH_PREFIX)]


async def relay_streams(down: H2Stream, up: H2Stream, *, request_open: bool) -> int:
    """Relay a request stream ``down`` → ``up`` and its response back; the response status.

    Trailers travel as trailers (gRPC's status lives there); a reset on either side resets the
    other (cancellation in both directions).  Returns 0 if no response status was relayed.
    """
    status = 0

    async with trio.open_nursery() as nursery:

        async def request_body() -> None:
            while True:
                try:
                    ev = await down.next_event()
                except StreamError:
                    # The caller cancelled: cancel the server's side too, and stop relaying.
                    up.reset()
                    nursery.cancel_scope.cancel()
                    return
                try:
                    if ev[0] == "data":
                        await up.send_data(ev[1])
                    elif ev[0] == "trailers":
                        await up.end(ev[1])
                        return
                    elif ev[0] == "end":
                        await up.end()
                        return
                except StreamError:
                    # The server stopped reading the request (it answered early, e.g. a gRPC
                    # error): not a cancellation.  The response side relays what it sent.
                    return

        if request_open:
            nursery.start_soon(request_body)
        trailers: Headers | None = None
        try:
            while True:
                ev = await up.next_event()
                kind = ev[0]
                if kind == "data":
                    await down.send_data(ev[1])
                elif kind in ("headers", "info"):
                    pseudo, regular = split_pseudo(ev[1])
                    code = int(pseudo.get(b":status", b"502"))
                    if kind == "headers":
                        status = code
                    hdrs = [(b":status", pseudo.get(b":status", b"502")), *mesh_free(regular)]
                    if kind == "headers" and up.head_ended:
                        await down.send_headers(hdrs, end=True)  # trailers-only response
                        break
                    await down.send_headers(hdrs)
                elif kind == "trailers":
                    trailers = ev[1]
                else:  # end
                    await down.end(trailers)
                    break
        except StreamError as e:
            if status == 0 and down.failure is None:
                await answer_error(down, e)
            else:
                down.reset(ERR_INTERNAL)
            up.reset()
        nursery.cancel_scope.cancel()
    # A response that ended before its request did: stop both request halves.
    if not up.ended_local:
        up.reset()
    if not down.ended_remote:
        down.reset(h2.errors.ErrorCodes.NO_ERROR)
    return status
