"""trio edges: connecting, TLS handshakes, and exception mapping at the boundary.

Above this module nothing sees ``trio.BrokenResourceError``, ``ssl.SSLError`` or ``OSError``
from a peer: they become ``UpstreamConnectError`` / ``UpstreamClosed`` / ``UpstreamTimeout`` or
``DownstreamClosed``, which the rescue in each server turns into a status code.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import trio

from nodemesh.errors import (
    DownstreamClosed,
    NodemeshError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamTimeout,
)
from nodemesh.transport.streams import TLSIO, SocketIO

IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError)


@contextmanager
def upstream_errors() -> Iterator[None]:
    try:
        yield
    except IO_ERRORS as e:
        raise UpstreamClosed(f"upstream connection failed: {describe(e)}") from None


@contextmanager
def downstream_errors() -> Iterator[None]:
    try:
        yield
    except IO_ERRORS as e:
        raise DownstreamClosed(describe(e)) from None


def describe(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    cause = e.__cause__ or e.__context__
    if isinstance(e, trio.BrokenResourceError) and cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# The edges take their timeout so the boundary can name the peer in UpstreamTimeout.
async def open_tcp(host: str, port: int, timeout: float) -> SocketIO:  # noqa: ASYNC109
    """A TCP connection (TCP_NODELAY set), or UpstreamConnectError/Timeout."""
    try:
        with trio.fail_after(timeout):
            return SocketIO.adopt(await trio.open_tcp_stream(host, port))
    except trio.TooSlowError:
        raise UpstreamTimeout(f"connect to {host}:{port} timed out after {timeout:g}s") from None
    except OSError as e:
        raise UpstreamConnectError(f"connect to {host}:{port} failed: {e.strerror or e}") from None


Dialer = Callable[[str, int, float], Awaitable[trio.abc.Stream]]  # open_tcp, or a test's


async def open_tls(
    stream: trio.abc.Stream,
    ctx: ssl.SSLContext,
    server_hostname: str,
    timeout: float,  # noqa: ASYNC109
) -> TLSIO:
    """TLS as a client over ``stream``, handshake done; ``stream`` is closed on failure."""
    tls = TLSIO(stream, ctx, server_hostname=server_hostname)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except trio.TooSlowError:
        await close_quietly(tls)
        raise UpstreamTimeout(f"TLS handshake with {server_hostname} timed out") from None
    except IO_ERRORS as e:
        await close_quietly(tls)
        raise UpstreamConnectError(
            f"TLS handshake with {server_hostname} failed: {describe(e)}"
        ) from None
    return tls


async def accept_tls(
    stream: trio.abc.Stream,
    ctx: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109
) -> TLSIO:
    """TLS as a server over an accepted ``stream``.

    Raises ``trio.TooSlowError`` or one of ``IO_ERRORS``; ``stream`` is closed then."""
    tls = TLSIO(stream, ctx, server_side=True)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake()
    except BaseException:
        await close_quietly(tls)
        raise
    return tls


async def close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close without waiting on a peer that may be gone (no TLS close_notify round trip)."""
    try:
        await trio.aclose_forcefully(stream)
    except (NodemeshError, *IO_ERRORS):
        pass
