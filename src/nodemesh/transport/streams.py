"""The data path's byte streams: a TCP socket and TLS on it, read and written directly.

Theory of operation
-------------------
``trio.SocketStream`` and ``trio.SSLStream`` are general: conflict detectors, a checkpoint on
every call, and for TLS a retry loop with locks around each OpenSSL call.  On this machine a
300-byte TLS round trip costs 223 µs through them and 106 µs through the same OpenSSL calls
made directly (``docs/benchmarks.md``, "Lean streams"), and the data path makes four such calls
per request and agent.  These two classes are the direct route, still under trio:

* ``SocketIO`` owns a non-blocking stdlib socket.  A read tries ``recv`` first and waits for
  readability (``trio.lowlevel.wait_readable``, one epoll round) only when nothing is there; a
  write tries ``send`` and waits for writability only when the kernel's buffer is full.  A call
  that completes at once does not yield; ``STREAK`` of them in a row do (a checkpoint), so one
  busy connection cannot hold the event loop.
* ``TLSIO`` runs an ``ssl.SSLObject`` over two memory BIOs on a ``SocketIO``: a read decrypts
  what the BIO holds and reads the socket only when OpenSSL wants more; a write encrypts the
  whole buffer and sends the records in one ``send``.

Both are ``trio.abc`` streams, so the h2 connection and the splices use them unchanged.  Like
trio's own, each stream takes one reader and one writer at a time; a write cancelled half-way
leaves a TLS stream unusable (the caller closes it).  Errors are trio's:
``BrokenResourceError`` (from the ``OSError`` or ``ssl.SSLError``) when the peer or the network
failed, ``ClosedResourceError`` once we closed it, so ``transport.edges`` maps them as before.
A TLS peer that closes without close_notify is ``BrokenResourceError``, as with trio's
``SSLStream`` (not ``https_compatible``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import trio

READ_SIZE = 256 * 1024  # bytes per recv when the caller names no size (bulk: fewer TLS reads)
STREAK = 32  # calls in a row that complete without waiting before one yields anyway
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class SocketIO(trio.abc.HalfCloseableStream):
    """A connected TCP socket (TCP_NODELAY set), owned by this object."""

    __slots__ = ("_closed", "_streak", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False
        self._streak = 0

    @classmethod
    def adopt(cls, stream: trio.SocketStream) -> SocketIO:
        """Take over the socket of a trio stream (an accepted or connected one)."""
        tsock = stream.socket
        family, type_, proto = tsock.family, tsock.type, tsock.proto
        return cls(socket.socket(family, type_, proto, fileno=tsock.detach()))

    def __repr__(self) -> str:
        try:
            host, port = self.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "closed" if self._closed else "?"
        return f"<SocketIO fd={self.socket.fileno()} peer={peer}>"

    async def _yield_now(self) -> None:
        self._streak = 0
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        while True:
            try:
                data = sock.recv(max_bytes or READ_SIZE)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as e:
                raise self._error(e) from e
            self._streak += 1
            if self._streak >= STREAK:
                await self._yield_now()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            raise self._error(e) from e
        if sent == len(data):
            self._streak += 1
            if self._streak >= STREAK:
                await self._yield_now()
            return
        view = memoryview(data)[sent:]
        while view:
            self._streak = 0
            await trio.lowlevel.wait_writable(sock)
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            except OSError as e:
                raise self._error(e) from e
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)

    def quickack(self) -> None:
        """ACK what has arrived now instead of after the delayed-ACK timer (up to 40 ms).

        A peer that writes a message in pieces with Nagle on (a stdlib ``http.server`` sends a
        response's head and body in two writes) holds its second piece until the first is
        ACKed; Linux delays that ACK on a kept-alive connection.  The flag is not sticky: the
        kernel clears it as it sees fit, so it is set again before each wait mid-message."""
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def idle_and_open(self) -> bool:
        """For a pooled connection between messages: True while nothing is waiting to be read.

        An idle HTTP/1.1 connection has nothing to say; readable means the peer closed it (or
        sent something unasked), so it must not carry a request.  One non-blocking peek."""
        try:
            self.socket.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def _error(self, e: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed:
            return trio.ClosedResourceError("the stream is closed")
        return trio.BrokenResourceError(f"socket error: {e}")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


class TLSIO(trio.abc.Stream):
    """TLS through memory BIOs over ``raw``: a ``SocketIO`` in production, any trio stream in
    the component tests.  ``do_handshake`` before anything else."""

    __slots__ = ("_in", "_out", "raw", "ssl_object")

    def __init__(
        self,
        raw: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )

    def __repr__(self) -> str:
        return f"<TLSIO alpn={self.selected_alpn_protocol()} {self.raw!r}>"

    # what callers ask of a TLS connection (the names ssl's and trio's objects use)
    @property
    def context(self) -> ssl.SSLContext:
        return self.ssl_object.context

    def selected_alpn_protocol(self) -> str | None:
        return self.ssl_object.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self.ssl_object.getpeercert(binary_form)

    def quickack(self) -> None:
        if isinstance(self.raw, SocketIO):
            self.raw.quickack()

    def idle_and_open(self) -> bool:
        """``SocketIO.idle_and_open``, counting decrypted bytes not yet read as readable."""
        if self._in.pending or self.ssl_object.pending():
            return False
        return not isinstance(self.raw, SocketIO) or self.raw.idle_and_open()

    async def do_handshake(self) -> None:
        obj = self.ssl_object
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError as e:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()  # the alert tells the peer why
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from e
        await self._flush()

    async def _fill(self) -> None:
        data = await self.raw.receive_some(READ_SIZE)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def _flush(self) -> None:
        if self._out.pending:
            await self.raw.send_all(self._out.read())

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        obj = self.ssl_object
        size = max_bytes or READ_SIZE
        while True:
            try:
                data = obj.read(size)
            except ssl.SSLWantReadError:
                if self._out.pending:  # a key update or ticket to answer: rare
                    await self._flush()
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                return b""  # close_notify
            except ssl.SSLError as e:
                raise trio.BrokenResourceError(f"TLS error: {e.reason or e}") from e
            # One record at a time comes out of OpenSSL; take what else is already here, so a
            # bulk transfer costs one trip through the caller per socket read, not per record.
            if len(data) < size and (self._in.pending or obj.pending()):
                parts = [data]
                left = size - len(data)
                while left > 0:
                    try:
                        more = obj.read(left)
                    except ssl.SSLError:  # WantRead, close_notify, ...: the next call says
                        break
                    if not more:
                        break
                    parts.append(more)
                    left -= len(more)
                data = b"".join(parts)
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS error: {e.reason or e}") from e
        await self.raw.send_all(self._out.read())

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close now: a close_notify goes out if the socket takes it at once, never waited for."""
        if isinstance(self.raw, SocketIO) and not self.raw.closed:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.ssl_object.unwrap()
            if self._out.pending:
                with contextlib.suppress(OSError):
                    self.raw.socket.send(self._out.read(), socket.MSG_DONTWAIT)
        await self.raw.aclose()
