"""trio edges: connecting, TLS handshakes, and exception mapping at the boundary.

Above this module nothing sees ``trio.BrokenResourceError``, ``ssl.SSLError`` or ``OSError``
from a peer: they become ``UpstreamConnectError`` / ``UpstreamClosed`` / ``UpstreamTimeout`` or
``DownstreamClosed``, which the rescue in each server turns into a status code.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from nodemesh.errors import (
    DownstreamClosed,
    NodemeshError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamTimeout,
)

IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


@contextmanager
def upstream_errors() -> Iterator[None]:
    try:
        yield
    except IO_ERRORS as e:
        raise UpstreamClosed(f"upstream connection failed: {_describe(e)}") from None


@contextmanager
def downstream_errors() -> Iterator[None]:
    try:
        yield
    except IO_ERRORS as e:
        raise DownstreamClosed(_describe(e)) from None


def _describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    cause = e.__cause__ or e.__context__
    if isinstance(e, trio.BrokenResourceError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# The edges take their timeout so the boundary can name the peer in UpstreamTimeout.
async def open_tcp(host: str, port: int, timeout: float) -> trio.SocketStream:  # noqa: ASYNC109
    """A TCP connection (TCP_NODELAY is trio's default), or UpstreamConnectError/Timeout."""
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise UpstreamTimeout(f"connect to {host}:{port} timed out after {timeout:g}s") from None
    except OSError as e:
        raise UpstreamConnectError(f"connect to {host}:{port} failed: {e.strerror or e}") from None


async def open_tls(
    stream: trio.abc.Stream,
    ctx: ssl.SSLContext,
    server_hostname: str,
    timeout: float,  # noqa: ASYNC109
) -> trio.SSLStream[trio.abc.Stream]:
    tls = trio.SSLStream(stream, ctx, server_hostname=server_hostname)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await trio.aclose_forcefully(tls)
        raise UpstreamTimeout(f"TLS handshake with {server_hostname} timed out") from None
    except IO_ERRORS as e:
        await trio.aclose_forcefully(tls)
        raise UpstreamConnectError(
            f"TLS handshake with {server_hostname} failed: {_describe(e)}"
        ) from None
    return tls


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close without waiting on a peer that may be gone (no TLS close_notify round trip)."""
    try:
        await trio.aclose_forcefully(stream)
    except (NodemeshError, *IO_ERRORS):
        pass
