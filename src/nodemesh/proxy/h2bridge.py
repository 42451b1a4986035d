"""HTTP/2 between agents: apps' HTTP/2 and gRPC streams, and CONNECT tunnels for raw bytes.

Theory of operation
-------------------
An app that speaks HTTP/2 (h2c, gRPC) has each of its streams relayed to a stream on a
multiplexed mTLS connection to the destination's agent, and from there to a stream on an
HTTP/2 connection to the app (``relay_streams``): headers, data, trailers and resets cross both
ways, so gRPC's status (in trailers) and cancellations arrive as sent.  Flow control on each
stream gives end-to-end back-pressure: data is acknowledged only once forwarded.

``CONNECT ip:port`` streams carry opaque TCP and upgraded connections (``splice_stream``):
END_STREAM is a half-close in either direction, so a client's FIN arrives at the server as a
FIN, across the mesh.

HTTP/1.1 calls do not come here: they travel as HTTP/1.1 on pooled connections between agents
(``proxy/http1.py``), which costs each agent less than any re-framing into HTTP/2.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import h2.errors
import trio

from nodemesh import log
from nodemesh.errors import ProxyError
from nodemesh.protocol.http1 import ERROR_HEADER, MESH_PREFIX
from nodemesh.transport.edges import IO_ERRORS
from nodemesh.transport.h2conn import H2Stream, Headers, StreamError, code_name

CHUNK = 256 * 1024  # bytes per tunnel read; each goes out as one DATA frame (h2conn.MAX_FRAME)
_log = log.get("nodemesh.h2bridge")


def split_pseudo(headers: Headers) -> tuple[dict[bytes, bytes], Headers]:
    pseudo: dict[bytes, bytes] = {}
    regular: Headers = []
    for n, v in headers:
        if n[:1] == b":":
            pseudo[n] = v
        else:
            regular.append((n, v))
    return pseudo, regular


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


# --- errors on a stream --------------------------------------------------------------------


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


ERR_INTERNAL = h2.errors.ErrorCodes.INTERNAL_ERROR


async def answer_error(stream: H2Stream, err: ProxyError) -> None:
    """Answer ``err`` on ``stream`` if the caller is still there (and say why in the log)."""
    _log.info("stream_error_answered", status=err.status, reason=err.reason, detail=err.detail)
    with contextlib.suppress(StreamError):
        await respond_h2_error(stream, err)


# --- HTTP/2 on both ends: stream to stream ----------------------------------------------------

PROTO_HEADER = b"x-nodemesh-proto"  # "h2": the caller spoke HTTP/2, so speak it to the app


def mesh_free(headers: Headers) -> Headers:
    """``headers`` without the mesh's own (an app must never set them)."""
    return [(n, v) for n, v in headers if not n.startswith(MESH_PREFIX)]


async def relay_streams(down: H2Stream, up: H2Stream, *, request_open: bool) -> int:
    """Relay a request stream ``down`` → ``up`` and its response back; the response status.

    Trailers travel as trailers (gRPC's status lives there); a reset on either side resets the
    other (cancellation in both directions).  Returns 0 if no response status was relayed.
    A request without a body (its HEADERS ended it) needs no second task.
    """
    if request_open:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_relay_request_body, down, up, nursery.cancel_scope)
            status = await _relay_response(down, up)
            nursery.cancel_scope.cancel()
    else:
        status = await _relay_response(down, up)
    # A response that ended before its request did: stop both request halves.
    if not up.ended_local:
        up.reset()
    if not down.ended_remote:
        down.reset(h2.errors.ErrorCodes.NO_ERROR)
    return status


async def _relay_request_body(down: H2Stream, up: H2Stream, relay: trio.CancelScope) -> None:
    while True:
        try:
            ev = await down.next_event()
        except StreamError:
            # The caller cancelled: cancel the server's side too, and stop relaying.
            up.reset()
            relay.cancel()
            return
        try:
            if ev[0] == "data":
                await up.send_data(ev[1])
            elif ev[0] == "trailers":
                await up.end(mesh_free(ev[1]))
                return
            elif ev[0] == "end":
                await up.end()
                return
        except StreamError:
            # The server stopped reading the request (it answered early, e.g. a gRPC
            # error): not a cancellation.  The response side relays what it sent.
            return


async def _relay_response(down: H2Stream, up: H2Stream) -> int:
    status = 0
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
                trailers = mesh_free(ev[1])
            else:  # end
                await down.end(trailers)
                break
    except StreamError as e:
        if status == 0 and down.failure is None:
            await answer_error(down, e)
        elif down.failure is None:
            # The response broke after its head went out: only a reset can say so.  A
            # peer's own reset passes on with its code (CANCEL stays a cancellation).
            code = ERR_INTERNAL if e.code is None else e.code
            _log.info("stream_reset", stream=repr(down), code=code_name(code), error=e.detail)
            down.reset(code)
        up.reset()
    return status
