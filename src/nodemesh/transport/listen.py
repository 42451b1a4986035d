"""Listening: every server's accept loop, with per-connection isolation.

An exception escaping one connection handler would tear down trio's ``serve_listeners`` and with
it every other connection, so each handler runs inside ``_isolated``: peer I/O errors are
debug-level, anything else is logged as a bug with its traceback, and the server keeps serving.
The stream is always closed, without waiting on a peer that may be gone.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from nodemesh import log
from nodemesh.errors import DownstreamClosed, NodemeshError
from nodemesh.transport.edges import IO_ERRORS, close_quietly

Handler = Callable[[trio.SocketStream], Awaitable[None]]
_log = log.get("nodemesh.listen")


class ListenError(NodemeshError):
    pass


async def open_listener(
    addr: tuple[str, int], name: str, inherited: dict[str, socket.socket] | None = None
) -> trio.SocketListener:
    """A listener on ``addr``: systemd's socket named ``name`` when it passed one (it keeps
    the socket open across restarts, ``sdnotify.listen_fds``), else a fresh one."""
    host, port = addr
    inherited = inherited if inherited is not None else {}
    from_systemd = bool(inherited)
    sock = inherited.pop(name, None)
    if sock is None:
        # One socket unit with several ListenStream= names every fd after the unit: match the
        # configured address instead.
        for key, candidate in list(inherited.items()):
            if _bound_to(candidate, addr):
                sock = inherited.pop(key)
                break
    if sock is not None:
        return _adopt(sock, addr, name)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
    except OSError as e:
        hint = "another process holds it; stop it or change listen." + name
        if from_systemd:
            hint = f"systemd passed sockets, none on {host}:{port}; make nodemesh.socket match"
        if e.errno == errno.EADDRNOTAVAIL:
            hint = "the address is not on this host; fix listen." + name
        raise ListenError(
            f"cannot listen on {host}:{port} for {name}: {e.strerror}; {hint}"
        ) from None
    return listeners[0]


def _bound_to(sock: socket.socket, addr: tuple[str, int]) -> bool:
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    return isinstance(bound, tuple) and bound[1] == addr[1] and bound[0] == addr[0]


def _adopt(sock: socket.socket, addr: tuple[str, int], name: str) -> trio.SocketListener:
    try:
        bound = sock.getsockname()
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        raise ListenError(f"systemd passed an unusable socket for {name}: {e.strerror}") from None
    if sock.type != socket.SOCK_STREAM or not listening:
        raise ListenError(
            f"systemd passed {name} a socket that is not a listening TCP socket; "
            "use ListenStream= in nodemesh.socket"
        )
    host, port = addr
    if (
        not isinstance(bound, tuple)
        or bound[1] != port
        or (host not in ("0.0.0.0", "::") and bound[0] != host)
    ):
        shown = f"{bound[0]}:{bound[1]}" if isinstance(bound, tuple) else repr(bound)
        raise ListenError(
            f"systemd passed {name} a socket on {shown} but listen.{name} = {host}:{port}; "
            f"make nodemesh.socket's ListenStream= for {name} match the config"
        )
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _isolated(handler: Handler, name: str, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    except (DownstreamClosed, *IO_ERRORS) as e:
        _log.debug("connection_closed", listener=name, reason=str(e) or type(e).__name__)
    except Exception:
        _log.exception("connection_handler_failed", listener=name)
    finally:
        await close_quietly(stream)


async def serve_listener(
    listener: trio.SocketListener,
    handler: Handler,
    name: str,
    *,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listener`` until cancelled; connections run in ``handler_nursery`` so a drain
    can stop accepting while in-flight connections finish."""
    sockname = listener.socket.getsockname()
    addr = (str(sockname[0]), int(sockname[1]))
    await trio.serve_listeners(
        partial(_isolated, handler, name),
        [listener],
        handler_nursery=handler_nursery,
        task_status=_Relay(task_status, addr),
    )


class _Relay:
    """Report our (host, port) instead of serve_listeners' listener list."""

    def __init__(self, inner: trio.TaskStatus[tuple[str, int]], addr: tuple[str, int]) -> None:
        self._inner = inner
        self._addr = addr

    def started(self, value: object = None) -> None:
        self._inner.started(self._addr)
