"""HTTP/2 connections between agents (h2 under trio): streams as objects, back-pressure end to end.

Theory of operation
-------------------
One task per connection reads bytes, feeds them to the h2 state machine and routes each event
to its stream's queue.  One task writes: any task may change the state machine and then call
``flush()``, which wakes the flusher; the flusher sends everything h2 has queued in one
``send_all``, so many streams' frames share a write.  Writers wait only when more than
``HIGH_WATER`` bytes are unsent.  The reader never waits on a write: two peers whose readers
both blocked on full send buffers would never read again.

Flow control is the back-pressure.  A stream's inbound data is acknowledged to the peer only
when its consumer asks for the *next* event, i.e. after it has forwarded the previous chunk.
A slow reader downstream therefore stops acknowledging, the peer's window closes, and the peer
stops sending: no buffer grows past one window per stream (``INITIAL_WINDOW``).  Sending waits
on the peer's window the same way (``H2Stream.send_data``).

Streams queue events as tuples: ("headers", hdrs), ("info", hdrs), ("data", bytes, n),
("trailers", hdrs), ("end",), ("reset", code), ("lost", reason).  A stream is forgotten once
both sides have ended or it was reset.  A server's RST_STREAM(NO_ERROR) after its complete
response is no failure (RFC 9113 §8.1: "stop sending the request"): the response stays readable
and only our sending side ends; grpc-core sends one whenever it answers a unary call before the
request's END_STREAM arrived, which relays often split from the last DATA.  A GOAWAY stops new
streams on the connection; streams above the peer's last processed id are failed as
*unprocessed*, which is always safe to retry.  Peer misbehaviour (a protocol error) ends the
connection with GOAWAY and never raises past ``serve``.  Writes are shielded from the
cancellation of any one stream's task: they are shared, and a TLS stream whose write was
interrupted is unusable.  A connection that is lost for any reason closes its transport, so the
peer sees it end.  h2's refusals to send (after any GOAWAY h2 refuses every write) surface as
``StreamError``.

Abuse in valid framing is bounded too, and ends the connection with ENHANCE_YOUR_CALM: peer
resets beyond a token bucket (rapid reset: each reset stream costs a handler and an upstream
request, yet never counts against MAX_CONCURRENT_STREAMS), and more PING/SETTINGS ACKs queued
than a reading peer ever leaves unread (the reader never waits for the writer, so a peer that
sends without reading would otherwise grow h2's outbound buffer for as long as WRITE_TIMEOUT).
Empty DATA frames carry no flow-controlled bytes, so they are dropped on arrival, not queued.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import trio

from nodemesh import log
from nodemesh.errors import NodemeshError, ProxyError
from nodemesh.transport.edges import IO_ERRORS

# bytes, per stream and per connection: what a receiver may hold unforwarded on one connection.
INITIAL_WINDOW = 1 << 20  # an app's connection (h2c, gRPC): one per app connection
# Between agents: one connection per (peer, service) carries every tunnel, and with 1 MiB a
# tunnel's 256 KiB frames left only four in flight, so bulk through two agents stalled on
# WINDOW_UPDATEs (docs/benchmarks.md, "Bulk with a 4 MiB window").
PEER_WINDOW = 4 << 20
MAX_CONCURRENT_STREAMS = 256
MAX_HEADER_LIST = 64 * 1024  # bytes; larger heads are refused
# bytes; the largest frame we accept (the protocol's default is 16 KiB).  A tunnel reads up to
# 256 KiB from its socket at a time (``h2bridge.CHUNK``), so between agents a read's worth goes
# out as one DATA frame: h2's per-frame work on both sides is done once per read, not per 16 KiB.
MAX_FRAME = 1 << 18
READ_SIZE = 256 * 1024  # one read can hold a whole MAX_FRAME
WRITE_TIMEOUT = 30.0  # seconds a peer may leave our writes unread before the connection ends
HIGH_WATER = 1 << 20  # bytes queued for the socket before writers wait
FINAL_FLUSH = 1.0  # seconds to send a closing GOAWAY before the transport closes
RESET_BURST = 1000  # peer resets allowed at once; nghttp2's default (against rapid reset)
RESET_RATE = 33.0  # ...and per second after the burst; nghttp2's default
MAX_QUEUED_ACKS = 10_000  # PING/SETTINGS ACKs not yet written; Go's http2 server limit

PEER_STREAMS_BEFORE_SETTINGS = 100  # RFC 9113 §6.5.2's recommended minimum; Go assumes it too

CLOSED_STREAMS_KEPT = 4096  # closed streams remembered per connection (16x the concurrent limit)


class H2Protocol(h2.connection.H2Connection):
    """h2's connection, remembering fewer closed streams.

    h2 keeps the ids of the last 65,536 closed streams, so that a frame still in flight after a
    stream ended is told apart from a protocol error.  On a long-lived connection between two
    agents that is several MiB per peer agent, held for good (RSS grew 13 MiB over 40,000 h2c
    requests in the benchmark lab and had not levelled off).  With at most
    ``MAX_CONCURRENT_STREAMS`` open, frames in flight can only concern the last few hundred
    streams; one forgotten earlier would at worst be answered with a RST_STREAM."""

    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


Headers = list[tuple[bytes, bytes]]
StreamHandler = Callable[["H2Stream"], Awaitable[None]]
_log = log.get("nodemesh.h2")


def _short_data_repr(frame: hyperframe.frame.DataFrame) -> str:
    head = frame.data[:10]
    more = "..." if len(frame.data) > 10 else ""
    return f"<hex:{head.hex()}{more}>" if frame.data else "None"


# h2 formats ``repr(frame)`` for a trace log line on every frame it receives, whether or not
# anything logs it, and hyperframe's DataFrame repr copies and hex-dumps the whole payload
# before keeping 20 characters: 12% of an opaque transfer's CPU (docs/benchmarks.md).  The
# same text from the first 10 bytes only.
hyperframe.frame.DataFrame._body_repr = _short_data_repr  # type: ignore[method-assign,assignment]


class StreamError(ProxyError):
    """A stream failed.  ``unprocessed``: the peer guarantees it did nothing with it."""

    status = 502
    reason = "upstream stream failed"

    def __init__(self, detail: str, *, code: int | None = None, unprocessed: bool = False) -> None:
        super().__init__(detail)
        self.code = code
        self.unprocessed = unprocessed


class H2Stream:
    __slots__ = (
        "_arrived",
        "_conn",
        "_queue",
        "_unacked",
        "_window",
        "ended_local",
        "ended_remote",
        "failure",
        "head_ended",
        "id",
    )

    def __init__(self, conn: H2Conn, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        # The reader appends, the stream's one consumer pops: a deque and an event made only
        # when the consumer waits (a trio memory channel per stream cost ~4 us to build, and a
        # reschedule on every receive even when an event was ready).
        self._queue: deque[tuple[Any, ...]] = deque()
        self._arrived: trio.Event | None = None
        self._window = trio.Event()
        self._unacked = 0
        self.ended_local = False
        self.ended_remote = False
        # The peer's HEADERS frame itself ended the stream: a request or response without a
        # body.  Unlike ``ended_remote``, this does not depend on how many frames one read brought.
        self.head_ended = False
        self.failure: StreamError | None = None

    def __repr__(self) -> str:
        state = "failed" if self.failure else f"local={self.ended_local} remote={self.ended_remote}"
        return f"<H2Stream {self.id} on {self._conn.name} {state}>"

    # -- receiving ------------------------------------------------------------------------------

    async def next_event(self) -> tuple[Any, ...]:
        """The next event; acknowledges the previous data chunk first (it has been forwarded)."""
        if self._unacked:
            n, self._unacked = self._unacked, 0
            await self._conn.acknowledge(self.id, n)
        if self.failure is not None and not self._queue:
            raise self.failure  # reset locally: nothing more will ever arrive
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            self._arrived = trio.Event()
            await self._arrived.wait()
        ev = self._queue.popleft()
        kind = ev[0]
        if kind == "data":
            self._unacked = ev[2]
        elif kind in ("reset", "lost"):
            raise self.failure or StreamError("stream failed")
        return ev

    # -- sending --------------------------------------------------------------------------------

    async def send_headers(self, headers: Headers, *, end: bool = False) -> None:
        with self._sending():
            self._conn.h2.send_headers(self.id, headers, end_stream=end)
        if end:
            self._end_local()
        await self._conn.flush()

    async def send_data(self, data: bytes | bytearray | memoryview, *, end: bool = False) -> None:
        conn = self._conn
        view = memoryview(data)
        while True:
            with self._sending():
                window = conn.h2.local_flow_control_window(self.id)
            if window <= 0 and view:
                self._window = trio.Event()
                await self._window.wait()
                continue
            n = min(len(view), window, conn.h2.max_outbound_frame_size)
            chunk, view = view[:n], view[n:]
            last = end and not view
            with self._sending():
                conn.h2.send_data(self.id, chunk, end_stream=last)
            if last:
                self._end_local()
            await conn.flush()
            if not view:
                return

    async def end(self, trailers: Headers | None = None) -> None:
        with self._sending():
            if trailers:
                self._conn.h2.send_headers(self.id, trailers, end_stream=True)
            else:
                self._conn.h2.end_stream(self.id)
        self._end_local()
        await self._conn.flush()

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the stream (never raises; the RST goes out with the next flush)."""
        if self.failure is None and not (self.ended_local and self.ended_remote):
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.h2.reset_stream(self.id, code)
            self._conn.wake_flush()
        self.failure = self.failure or StreamError("stream cancelled", code=code)
        self._release_window()
        self._conn.forget(self)

    def _release_window(self, *, keep_heads: bool = False) -> None:
        """Acknowledge data received but never to be read.  Until acknowledged it counts against
        the *connection* window too: streams dropped unread would starve every later stream.
        ``keep_heads``: keep the heads that came before a peer's reset, so they reach the
        consumer (then the reset) whether or not it was waiting for them; the body and its end
        go, or a truncated body would read as complete."""
        n, self._unacked = self._unacked, 0
        kept: deque[tuple[Any, ...]] = deque()
        while self._queue:
            ev = self._queue.popleft()
            if ev[0] == "data":
                n += ev[2]
            elif keep_heads and ev[0] in ("headers", "info"):
                kept.append(ev)
        self._queue = kept
        if n and self._conn.alive:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._conn.h2.acknowledge_received_data(n, self.id)
            self._conn.wake_flush()

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        """h2's refusals as stream errors: after any GOAWAY, h2 refuses every write."""
        self._check()
        try:
            yield
        except h2.exceptions.H2Error as e:
            raise StreamError(f"stream {self.id} cannot send: {e}") from None

    def _end_local(self) -> None:
        self.ended_local = True
        if self.ended_remote:
            self._conn.forget(self)

    # -- called by the connection's reader ----------------------------------------------------

    def _deliver(self, ev: tuple[Any, ...]) -> None:
        if ev[0] == "end":
            self.ended_remote = True
            if self.ended_local:
                self._conn.forget(self)
        self._put(ev)

    def _fail(self, err: StreamError) -> None:
        if self.failure is None:
            self.failure = err
        self._window.set()
        self._release_window(keep_heads=True)  # the stream is dead: its data is never read
        self._put(("reset", err.code) if err.code is not None else ("lost", err.detail))

    def _put(self, ev: tuple[Any, ...]) -> None:
        self._queue.append(ev)
        if self._arrived is not None:
            self._arrived.set()

    def _stop_sending(self) -> None:
        """The peer ended its side, then reset with NO_ERROR: our side is over too.  Queued
        events stay (the whole response); h2 refuses further sends (``StreamError``)."""
        self.ended_local = True
        self._window.set()

    def _wake(self) -> None:
        self._window.set()


class H2Conn:
    """One HTTP/2 connection over ``io`` (already TLS); ``serve`` runs it until it ends."""

    def __init__(
        self,
        io: trio.abc.Stream,
        *,
        client: bool,
        name: str,
        on_stream: StreamHandler | None = None,
        prefix: bytes = b"",
        window: int = INITIAL_WINDOW,
    ) -> None:
        self.io = io
        self._window_size = window
        self._prefix = prefix  # bytes already read from ``io`` (protocol detection)
        self.name = name
        self.client = client
        self.h2 = H2Protocol(
            h2.config.H2Configuration(
                client_side=client,
                header_encoding=None,
                # Everything we send was validated on the way in (by llhttp from apps, by h2's
                # inbound checks, kept on, from peers): validating again is pure hot-path cost.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
            },
        )
        # Initial values need no ACK (the peer learns them from our first SETTINGS, before it
        # may send a frame of that size), but h2 read the frame limit at construction.
        self.h2.max_inbound_frame_size = MAX_FRAME
        self._on_stream = on_stream
        self._streams: dict[int, H2Stream] = {}
        self._flush_needed = trio.Event()
        self._drained = trio.Event()
        self._unsent = 0  # bytes taken from h2 and being written
        self._raw_out = b""  # frames written beside h2's state machine (a late GOAWAY)
        self._io_closed = trio.Event()
        self._emptied = trio.Event()
        self.alive = True
        self.goaway = False
        self.last_used = trio.current_time()
        self.handlers: trio.Nursery | None = None
        self._peer_settings = False  # the peer's first SETTINGS arrived
        self._reset_tokens = float(RESET_BURST)
        self._reset_time = trio.current_time()
        self._queued_acks = 0  # ACKs h2 queued that the flusher has not written yet
        self._abuse: str | None = None  # why the peer is about to be cut off

    def __repr__(self) -> str:
        state = "alive" if self.alive and not self.goaway else "closing"
        side = "client" if self.client else "server"
        return f"<H2Conn {self.name} {side} {state} streams={len(self._streams)}>"

    @property
    def available(self) -> bool:
        """May carry a new stream now."""
        limit = (
            self.h2.remote_settings.max_concurrent_streams
            if self._peer_settings
            else PEER_STREAMS_BEFORE_SETTINGS
        )
        # Streams handed out count before their HEADERS are written: a burst takes them all
        # first, and h2 counts only the started ones.
        opened = max(len(self._streams), self.h2.open_outbound_streams)
        return self.alive and not self.goaway and opened < limit

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # -- life cycle ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.h2.initiate_connection()
            self.h2.increment_flow_control_window(self._window_size - 65535)
            await self.flush()
        except (NodemeshError, *IO_ERRORS):
            self._lost("connection failed at start")
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            self.handlers = nursery
            nursery.start_soon(self._flusher)
            task_status.started()
            try:
                await self._read_loop()
            finally:
                # Nothing a handler does can reach the peer any more: stop them all.
                self._lost("connection closed")
                nursery.cancel_scope.cancel()

    async def close(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY (no new streams) and close the transport."""
        await self._close(code)

    async def _close(self, code: int | None) -> None:
        """``close``; ``code`` None: h2 has queued its own GOAWAY already, send no other."""
        if self.alive and code is not None:
            try:
                self.h2.close_connection(error_code=code)
            except h2.exceptions.H2Error:
                # h2 closed its state machine on the peer's error without a GOAWAY (an invalid
                # preface, say): write the frame ourselves so the peer learns why.
                goaway = hyperframe.frame.GoAwayFrame(0)
                goaway.error_code = int(code)
                goaway.last_stream_id = self.h2.highest_inbound_stream_id
                self._raw_out += goaway.serialize()
        self._lost("connection closed locally")
        # The flusher (the only writer) sends what is queued, the GOAWAY too, then closes.
        with trio.move_on_after(FINAL_FLUSH + 0.5):
            await self._io_closed.wait()
        with contextlib.suppress(*IO_ERRORS):
            await trio.aclose_forcefully(self.io)

    async def close_when_idle(self) -> None:
        """For drains: close once no stream is active (bounded by the caller's deadline)."""
        while self.alive and self._streams:
            self._emptied = trio.Event()
            await self._emptied.wait()
        await self.close()

    def open_stream(self) -> H2Stream:
        sid = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, sid)
        self._streams[sid] = stream
        self.last_used = trio.current_time()
        return stream

    def forget(self, stream: H2Stream) -> None:
        self._streams.pop(stream.id, None)
        self.last_used = trio.current_time()
        if not self._streams:
            self._emptied.set()

    # -- writing --------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Have the flusher write what h2 has queued; wait only while too much is unsent.

        Writes are coalesced: many streams' frames go out in one ``send_all`` per batch, and a
        stream task never holds the socket.  ``HIGH_WATER`` bounds the bytes queued but not yet
        written, whatever windows a peer advertises (back-pressure from a slow socket).
        """
        self._flush_needed.set()
        while self.alive and self._unsent > HIGH_WATER:
            self._drained = trio.Event()
            await self._drained.wait()
        if not self.alive:
            raise StreamError("connection to peer agent lost")

    def wake_flush(self) -> None:
        """Flush soon from the connection's own task (for callers that cannot await)."""
        self._flush_needed.set()

    def _take(self) -> bytes:
        data = self.h2.data_to_send()
        if self._raw_out:
            data, self._raw_out = data + self._raw_out, b""
        return data

    async def _write(self, data: bytes, timeout: float) -> bool:  # noqa: ASYNC109  (shielded)
        # Shielded: a TLS stream whose send_all was cancelled is broken for good.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + timeout
            try:
                await self.io.send_all(data)
            except IO_ERRORS as e:
                self._lost(f"write failed: {type(e).__name__}")
                return False
        if scope.cancelled_caught:
            self._lost("write timed out: the peer stopped reading")
            return False
        return True

    async def _flusher(self) -> None:
        try:
            while self.alive:
                await self._flush_needed.wait()
                self._flush_needed = trio.Event()
                acks = self._queued_acks
                data = self._take()
                self._unsent = len(data)
                if data and await self._write(data, WRITE_TIMEOUT):
                    self._queued_acks -= acks
                self._unsent = 0
                self._drained.set()
        finally:
            # Lost or closing: send what is still queued (a GOAWAY, say), briefly, then close
            # the transport so the reader ends and the peer sees the connection end.
            self._drained.set()
            data = self._take()
            if data:
                await self._write(data, FINAL_FLUSH)
            with trio.CancelScope(shield=True), contextlib.suppress(*IO_ERRORS):
                await trio.aclose_forcefully(self.io)
            self._io_closed.set()

    async def acknowledge(self, stream_id: int, n: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):  # the stream is gone: nothing to credit
            self.h2.acknowledge_received_data(n, stream_id)
        self.wake_flush()

    # -- reading --------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            data: bytes | bytearray
            if self._prefix:
                data, self._prefix = self._prefix, b""
            else:
                try:
                    data = await self.io.receive_some(READ_SIZE)
                except IO_ERRORS as e:
                    _log.debug("h2_read_failed", conn=self.name, error=type(e).__name__)
                    return
                if not data:
                    return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                _log.info("h2_protocol_error", conn=self.name, error=str(e))
                # For a bad frame h2 has queued a GOAWAY with the precise code (and closed its
                # state machine): a second GOAWAY would contradict it.  A bad preface fails
                # before that, and gets our PROTOCOL_ERROR.
                queued = self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED
                await self._close(None if queued else h2.errors.ErrorCodes.PROTOCOL_ERROR)
                return
            for ev in events:
                self._dispatch(ev)
            if self._abuse is not None:
                _log.info("h2_peer_cut_off", conn=self.name, reason=self._abuse)
                await self.close(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                return
            # Never wait on a write here: if both peers' readers blocked on full send buffers,
            # neither would read again.  The flusher task writes; flow control bounds reads.
            self.wake_flush()

    def _count_reset(self) -> None:
        now = trio.current_time()
        refill = (now - self._reset_time) * RESET_RATE
        self._reset_tokens = min(float(RESET_BURST), self._reset_tokens + refill) - 1
        self._reset_time = now
        if self._reset_tokens < 0:
            self._abuse = self._abuse or "stream resets over the limit"

    def _count_ack(self) -> None:
        self._queued_acks += 1
        if self._queued_acks > MAX_QUEUED_ACKS:
            self._abuse = self._abuse or "control frames from a peer that does not read"

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived) and not ev.data:
            # Nothing to deliver (END_STREAM comes as its own event); queueing it would let
            # 9-byte frames hold memory, unchecked by flow control (CVE-2019-9518).
            if ev.flow_controlled_length:  # padding only: credit it back
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.DataReceived):
            s = self._streams.get(ev.stream_id)
            if s is None:
                # Data for a stream we dropped: credit the windows so the connection lives on.
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            s._deliver(("data", ev.data, ev.flow_controlled_length))
        elif isinstance(ev, h2.events.RequestReceived):
            stream = H2Stream(self, ev.stream_id)
            stream.head_ended = ev.stream_ended is not None
            self._streams[ev.stream_id] = stream
            stream._deliver(("headers", list(ev.headers)))
            if self._on_stream is None or self.handlers is None or self.goaway or self._abuse:
                stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
            else:
                self.handlers.start_soon(self._run_handler, stream)
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self._streams.get(ev.stream_id)
            if s is not None:
                # A response whose HEADERS end the stream: gRPC's trailers-only error replies.
                s.head_ended = ev.stream_ended is not None
                s._deliver(("headers", list(ev.headers)))
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self._to(ev.stream_id, ("info", list(ev.headers)))
        elif isinstance(ev, h2.events.TrailersReceived):
            self._to(ev.stream_id, ("trailers", list(ev.headers)))
        elif isinstance(ev, h2.events.StreamEnded):
            self._to(ev.stream_id, ("end",))
        elif isinstance(ev, h2.events.StreamReset):
            if not self.client and ev.remote_reset:
                self._count_reset()
            s = self._streams.get(ev.stream_id)
            if s is not None:
                self.forget(s)
                code = ev.error_code
                if self.client and s.ended_remote and code == h2.errors.ErrorCodes.NO_ERROR:
                    # RFC 9113 §8.1: the server's response was complete before our request
                    # was, and it asks us to stop sending the request, without error (grpc-core
                    # does so whenever it answers a unary call before the request's END_STREAM
                    # arrives).  What it sent stays readable; only our sending side ends.
                    s._stop_sending()
                else:
                    unprocessed = ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    s._fail(
                        StreamError(
                            f"peer reset the stream ({code_name(ev.error_code)})",
                            code=int(ev.error_code),
                            unprocessed=unprocessed,
                        )
                    )
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                for s in self._streams.values():
                    s._wake()
            elif (one := self._streams.get(ev.stream_id)) is not None:
                one._wake()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self._peer_settings = True
            self._count_ack()
            for s in self._streams.values():
                s._wake()
        elif isinstance(ev, h2.events.PingReceived):
            self._count_ack()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            last = ev.last_stream_id if ev.last_stream_id is not None else 2**31
            for sid, s in list(self._streams.items()):
                if self.client and sid > last:
                    self._streams.pop(sid, None)
                    s._fail(StreamError("peer is going away", unprocessed=True))

    def _to(self, stream_id: int, ev: tuple[Any, ...]) -> None:
        s = self._streams.get(stream_id)
        if s is not None:
            s._deliver(ev)

    async def _run_handler(self, stream: H2Stream) -> None:
        assert self._on_stream is not None
        if stream.failure is not None:
            return  # reset by the peer in the same read that opened it: nothing to answer
        try:
            await self._on_stream(stream)
        except (NodemeshError, *IO_ERRORS) as e:
            if stream.failure is None:  # else the peer reset it first: nothing to say
                _log.info("h2_stream_reset", conn=self.name, stream=stream.id, error=str(e))
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        except Exception:
            _log.exception("h2_stream_handler_failed", conn=self.name, stream=stream.id)
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def _lost(self, reason: str) -> None:
        if not self.alive:
            return
        self.alive = False
        for s in list(self._streams.values()):
            s._fail(StreamError(f"connection to peer agent lost: {reason}"))
        self._streams.clear()
        self._emptied.set()
        self._flush_needed.set()


def code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)
