"""``H2Conn`` as a server (and once as a client) against a hostile HTTP/2 peer.

The attacker writes raw frames (``frame()``; hyperframe parses what the server answers) and, where
valid framing and HPACK are needed, uses ``h2`` in client mode without ever feeding it the
server's bytes.  Every attack runs in ``attacked()``, which checks afterwards that the attacked
connection's ``serve`` returned (never raising: the nursery would re-raise it) and that a fresh,
well-behaved client/server pair in the same process still works.

Floods that rely on the attacker *not reading* use ``trio.testing.lockstep_stream_pair``: like a
full socket buffer, the server's writes then block, and whatever it keeps queueing stays in h2's
outbound buffer, which the test measures.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.settings
import hpack
import pytest
import trio
import trio.testing
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame, RstStreamFrame

from nodemesh.errors import NodemeshError
from nodemesh.outbound.mux import MeshPool
from nodemesh.transport.h2conn import (
    INITIAL_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME,
    MAX_HEADER_LIST,
    H2Conn,
    H2Stream,
    StreamError,
)
from tests.component.test_h2conn import REQ, echo

Clock = trio.testing.MockClock
Codes = h2.errors.ErrorCodes
WAIT = 10.0  # virtual seconds; with the autojump clock only a hang reaches it
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One raw frame, valid or not: the length is always the payload's."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def setting(code: int, value: int) -> bytes:
    return struct.pack(">HI", code, value)


def parse_frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        f, length = Frame.parse_frame_header(view[:9])
        if len(view) < 9 + length:
            break
        f.parse_body(view[9 : 9 + length])
        frames.append(f)
        view = view[9 + length :]
    return frames


def new_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    c.initiate_connection()
    return c


# --- the attacked server --------------------------------------------------------------------------


@dataclass
class Attack:
    server: H2Conn
    io: trio.abc.Stream  # the attacker's end
    client: h2.connection.H2Connection  # the attacker's encoder (PREFACE + SETTINGS pending)
    done: trio.Event  # set when server.serve returned
    started: list[H2Stream] = field(default_factory=list)  # one per handler started
    received: bytearray = field(default_factory=bytearray)

    async def send(self, data: bytes) -> bool:
        """Write, as an attacker would, ignoring a server that hung up.  False once it has."""
        try:
            await self.io.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def handshake(self) -> None:
        await self.send(self.client.data_to_send())

    async def flush_client(self) -> bool:
        return await self.send(self.client.data_to_send())

    async def read(self, seconds: float = 1.0) -> list[Frame]:
        """Everything the server writes until it closes, or ``seconds`` of quiet."""
        while True:
            with trio.move_on_after(seconds) as quiet:
                try:
                    data = await self.io.receive_some(1 << 20)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                self.received += data
            if quiet.cancelled_caught:
                break
        return parse_frames(bytes(self.received))

    async def closed(self) -> None:
        with trio.fail_after(WAIT):
            await self.done.wait()

    def goaways(self) -> list[int]:
        frames = parse_frames(bytes(self.received))
        return [f.error_code for f in frames if isinstance(f, GoAwayFrame)]

    def resets(self) -> dict[int, int]:
        frames = parse_frames(bytes(self.received))
        return {f.stream_id: f.error_code for f in frames if isinstance(f, RstStreamFrame)}


async def stall(stream: H2Stream) -> None:
    await stream.next_event()
    await trio.sleep_forever()


async def fresh_pair_works(nursery: trio.Nursery) -> None:
    a, b = trio.testing.memory_stream_pair()
    server = H2Conn(b, client=False, name="fresh-server", on_stream=echo)
    client = H2Conn(a, client=True, name="fresh-client")
    await nursery.start(server.serve)
    await nursery.start(client.serve)
    with trio.fail_after(WAIT):
        s = client.open_stream()
        await s.send_headers(REQ)
        await s.send_data(b"still here", end=True)
        assert await s.next_event() == ("headers", [(b":status", b"200")])
        body = b""
        while (ev := await s.next_event())[0] == "data":
            body += ev[1]
        assert (ev[0], body) == ("end", b"still here")
    await client.close()


@asynccontextmanager
async def attacked(
    handler: Callable[[H2Stream], Awaitable[None]] = echo, *, lockstep: bool = False
) -> AsyncIterator[Attack]:
    async with trio.open_nursery() as nursery:
        if lockstep:
            theirs, ours = trio.testing.lockstep_stream_pair()
        else:
            theirs, ours = trio.testing.memory_stream_pair()
        started: list[H2Stream] = []

        async def counting(stream: H2Stream) -> None:
            started.append(stream)
            await handler(stream)

        server = H2Conn(ours, client=False, name="attacked", on_stream=counting)
        done = trio.Event()

        async def run() -> None:
            try:
                await server.serve()
            finally:
                done.set()
                await trio.aclose_forcefully(ours)  # as the listeners do once serve returns

        nursery.start_soon(run)
        attack = Attack(server, theirs, new_client(), done, started)
        if lockstep:  # the server's first write waits for a reader
            with trio.fail_after(WAIT):
                attack.received += await theirs.receive_some(65536)
        yield attack
        await fresh_pair_works(nursery)
        nursery.cancel_scope.cancel()


# --- malformed prefaces ---------------------------------------------------------------------------

CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(32)

PREFACES = {
    "http1-request": (b"GET / HTTP/1.1\r\nhost: web\r\n\r\n", {Codes.PROTOCOL_ERROR}),
    "wrong-magic": (PREFACE[:-6] + b"XX\r\n\r\n" + frame(SETTINGS, 0, 0), {Codes.PROTOCOL_ERROR}),
    "tls-client-hello": (CLIENT_HELLO, {Codes.PROTOCOL_ERROR}),
    "nul-bytes": (bytes(64), {Codes.PROTOCOL_ERROR}),
    "settings-of-5-bytes": (PREFACE + frame(SETTINGS, 0, 0, bytes(5)), {Codes.FRAME_SIZE_ERROR}),
    "truncated-then-eof": (PREFACE[:10], set()),  # nothing to answer: the peer is gone
}


@pytest.mark.parametrize("name", PREFACES)
async def test_malformed_preface_ends_the_connection(autojump_clock: Clock, name: str) -> None:
    data, codes = PREFACES[name]
    async with attacked() as at:
        await at.send(data)
        if not codes:
            await at.io.send_eof()  # type: ignore[attr-defined]
        await at.read()
        await at.closed()
        assert not at.server.alive
        if codes:
            assert at.goaways(), "closed without a GOAWAY"
            assert at.goaways()[0] in codes, Codes(at.goaways()[0]).name
        assert at.started == []


# --- invalid frames -------------------------------------------------------------------------------

HPACK_REQ = hpack.Encoder().encode(REQ)

INVALID = {
    "data-on-stream-0": (frame(DATA, 0, 0, b"x"), {Codes.PROTOCOL_ERROR}),
    "headers-on-stream-0": (frame(HEADERS, END_HEADERS, 0, HPACK_REQ), {Codes.PROTOCOL_ERROR}),
    "ping-on-a-stream": (frame(PING, 0, 1, bytes(8)), {Codes.PROTOCOL_ERROR}),
    "settings-on-a-stream": (frame(SETTINGS, 0, 1), {Codes.PROTOCOL_ERROR}),
    "rst-on-stream-0": (frame(RST, 0, 0, u32(8)), {Codes.PROTOCOL_ERROR}),
    "window-update-of-0": (frame(WINDOW, 0, 0, u32(0)), {Codes.PROTOCOL_ERROR}),
    "ping-of-4-bytes": (frame(PING, 0, 0, bytes(4)), {Codes.FRAME_SIZE_ERROR}),
    "settings-ack-with-payload": (
        frame(SETTINGS, ACK, 0, setting(4, 65535)),
        {Codes.FRAME_SIZE_ERROR, Codes.PROTOCOL_ERROR},
    ),
    "frame-over-max-frame-size": (
        frame(HEADERS, END_HEADERS, 1, HPACK_REQ) + frame(DATA, 0, 1, bytes(MAX_FRAME + 1)),
        {Codes.FRAME_SIZE_ERROR},
    ),
    "data-on-an-idle-stream": (frame(DATA, 0, 5, b"hello"), {Codes.PROTOCOL_ERROR}),
    "rst-on-an-idle-stream": (frame(RST, 0, 5, u32(8)), {Codes.PROTOCOL_ERROR}),
    "headers-on-an-even-stream": (
        frame(HEADERS, END_HEADERS, 2, HPACK_REQ),
        {Codes.PROTOCOL_ERROR},
    ),
    "push-promise-from-a-client": (frame(PUSH, END_HEADERS, 1, u32(2)), {Codes.PROTOCOL_ERROR}),
    "initial-window-over-2^31-1": (
        frame(SETTINGS, 0, 0, setting(4, 1 << 31)),
        {Codes.FLOW_CONTROL_ERROR},
    ),
    "max-frame-size-under-16k": (frame(SETTINGS, 0, 0, setting(5, 100)), {Codes.PROTOCOL_ERROR}),
    "enable-push-of-2": (frame(SETTINGS, 0, 0, setting(2, 2)), {Codes.PROTOCOL_ERROR}),
    "garbage-hpack": (
        frame(HEADERS, END_HEADERS, 1, b"\xff" * 12),
        {Codes.COMPRESSION_ERROR, Codes.PROTOCOL_ERROR},
    ),  # h2 says the latter
    "window-update-overflow": (
        frame(WINDOW, 0, 0, u32((1 << 31) - 1)) * 2,
        {Codes.FLOW_CONTROL_ERROR},
    ),
    "stream-id-going-backwards": (
        frame(HEADERS, END_HEADERS | END_STREAM, 5, HPACK_REQ)
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, hpack.Encoder().encode(REQ)),
        {Codes.PROTOCOL_ERROR},
    ),
}


@pytest.mark.parametrize("name", INVALID)
async def test_invalid_frame_ends_the_connection_with_the_right_code(
    autojump_clock: Clock, name: str
) -> None:
    data, codes = INVALID[name]
    async with attacked(stall) as at:
        await at.handshake()
        await at.send(data)
        await at.read()
        await at.closed()
        goaways = at.goaways()
        assert goaways, "closed without a GOAWAY"
        assert goaways[0] in codes, Codes(goaways[0]).name


async def test_a_frame_cut_short_by_eof_ends_the_connection(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        await at.send(frame(PING, 0, 0, bytes(8))[:12])
        await at.io.send_eof()  # type: ignore[attr-defined]
        await at.read()
        await at.closed()
        assert at.started == []


async def test_one_goaway_names_the_real_error(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        await at.send(frame(WINDOW, 0, 0, u32((1 << 31) - 1)) * 2)
        await at.read()
        await at.closed()
        assert at.goaways() == [Codes.FLOW_CONTROL_ERROR]


# --- stream errors leave the connection serving ---------------------------------------------------


async def test_window_overflow_on_one_stream_resets_only_that_stream(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        at.client.send_headers(1, REQ)
        await at.flush_client()
        await at.send(frame(WINDOW, 0, 1, u32((1 << 31) - 1)))
        at.client.send_headers(3, REQ)
        at.client.send_data(3, b"other stream", end_stream=True)
        await at.flush_client()
        frames = await at.read()
        assert at.resets().get(1) == Codes.FLOW_CONTROL_ERROR
        echoed = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == 3)
        assert echoed == b"other stream"
        assert at.server.alive
        assert at.goaways() == []


async def test_a_client_that_ignores_flow_control_is_cut_off(autojump_clock: Clock) -> None:
    async with attacked(stall) as at:
        await at.handshake()
        at.client.send_headers(1, REQ)
        await at.flush_client()
        chunk = frame(DATA, 0, 1, bytes(MAX_FRAME))
        for _ in range(INITIAL_WINDOW // MAX_FRAME + 8):
            if not await at.send(chunk):
                break
        await at.read()
        await at.closed()
        assert at.goaways()[0] == Codes.FLOW_CONTROL_ERROR


# --- header lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["literal-70KiB", "hpack-bomb", "continuation-flood"])
async def test_oversized_header_lists_are_refused_before_any_handler(
    autojump_clock: Clock, kind: str
) -> None:
    async with attacked() as at:
        await at.handshake()
        if kind == "literal-70KiB":
            at.client.send_headers(1, [*REQ, (b"x-big", b"a" * (MAX_HEADER_LIST + 4096))])
            await at.flush_client()
        elif kind == "hpack-bomb":
            # One 4 KiB value indexed once, then referenced: ~2.5 KiB on the wire, 80 KiB decoded.
            at.client.send_headers(1, [*REQ] + [(b"x-big", b"a" * 4000)] * 20)
            wire = at.client.data_to_send()
            assert len(wire) < 8 * 1024
            await at.send(wire)
        else:
            # HEADERS without END_HEADERS, then CONTINUATION after CONTINUATION, never ending.
            await at.send(frame(HEADERS, 0, 1, HPACK_REQ))
            for _ in range(200):
                if not await at.send(frame(CONT, 0, 1, bytes(MAX_FRAME))):
                    break
        await at.read()
        await at.closed()
        assert at.goaways()[0] in (Codes.ENHANCE_YOUR_CALM, Codes.PROTOCOL_ERROR)
        assert at.started == []


# --- stream floods --------------------------------------------------------------------------------


async def test_a_stream_flood_never_runs_more_handlers_than_the_limit(
    autojump_clock: Clock,
) -> None:
    async with attacked(stall) as at:
        await at.handshake()
        for i in range(MAX_CONCURRENT_STREAMS + 100):
            at.client.send_headers(2 * i + 1, REQ)  # never ended: every stream stays open
        await at.flush_client()
        await at.read()
        assert len(at.started) <= MAX_CONCURRENT_STREAMS
        resets = at.resets()
        refused = [
            sid
            for sid, code in resets.items()
            if code in (Codes.REFUSED_STREAM, Codes.PROTOCOL_ERROR)
        ]
        # Either the excess streams were refused one by one, or the connection was ended.
        assert len(refused) >= 100 or (at.goaways() and not at.server.alive)


class Slow(trio.abc.Stream):
    """A link with a few milliseconds of delay, as between two hosts: what this end receives
    (the server's SETTINGS, first of all) arrives a little after it was sent."""

    def __init__(self, inner: trio.abc.Stream, delay: float = 0.005) -> None:
        self.inner = inner
        self.delay = delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        await trio.sleep(self.delay)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_burst_through_the_pool_respects_the_peers_stream_limit(
    autojump_clock: Clock,
) -> None:
    burst = MAX_CONCURRENT_STREAMS + 44

    async def busy_echo(stream: H2Stream) -> None:
        await trio.sleep(0.1)  # requests take a while: the burst's streams are open together
        await echo(stream)

    async with trio.open_nursery() as nursery:

        async def connect(key: Hashable) -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            server = H2Conn(theirs, client=False, name=f"server-{key}", on_stream=busy_echo)
            await nursery.start(server.serve)
            return Slow(ours)

        pool = MeshPool(connect, idle_timeout=60.0)
        await nursery.start(pool.serve)
        ok: list[int] = []
        failed: list[str] = []

        async def one(i: int) -> None:
            try:
                s = await pool.open_stream("peer")
                await s.send_headers(REQ)
                await s.send_data(b"%d" % i, end=True)
                await s.next_event()
                while (await s.next_event())[0] != "end":
                    pass
                ok.append(i)
            except StreamError as e:
                failed.append(str(e))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as requests:
                for i in range(burst):
                    requests.start_soon(one, i)
        assert (len(ok), failed[:3]) == (burst, [])
        nursery.cancel_scope.cancel()


# --- GOAWAY while streams are open ----------------------------------------------------------------


async def test_writes_after_the_peers_goaway_fail_as_stream_errors(autojump_clock: Clock) -> None:
    errors: list[BaseException] = []
    go = trio.Event()

    async def late_answer(stream: H2Stream) -> None:
        await stream.next_event()
        await go.wait()
        try:
            await stream.send_headers([(b":status", b"200")], end=True)
        except BaseException as e:
            errors.append(e)
            raise

    async with attacked(late_answer) as at:
        await at.handshake()
        at.client.send_headers(1, REQ, end_stream=True)
        await at.flush_client()
        with trio.fail_after(WAIT):
            while not at.started:
                await trio.sleep(0.01)
        # A client going away: no new streams, but stream 1 is still waiting for its answer.
        await at.send(frame(GOAWAY, 0, 0, u32(0) + u32(Codes.NO_ERROR)))
        await trio.sleep(0.1)
        go.set()
        await at.read()
        assert errors and all(isinstance(e, NodemeshError) for e in errors), errors


# --- control-frame floods from a client that never reads ------------------------------------------


FLOOD_FRAMES = {
    "ping": frame(PING, 0, 0, b"12345678"),
    "settings": frame(SETTINGS, 0, 0, setting(4, 65535)),
}
ACK_BUDGET = 256 * 1024  # bytes of ACKs the server may hold for a peer that does not read


@pytest.mark.parametrize("kind", FLOOD_FRAMES)
async def test_ack_flood_from_a_client_that_never_reads_is_bounded(
    autojump_clock: Clock, kind: str
) -> None:
    async with attacked(lockstep=True) as at:
        await at.handshake()
        batch = FLOOD_FRAMES[kind] * 1000
        with trio.move_on_after(WAIT):  # a server that stops reading would block us for good
            for _ in range(50):
                if not await at.send(batch):
                    break
        await trio.sleep(1)
        queued = len(at.server.h2.data_to_send())
        assert queued <= ACK_BUDGET, f"{queued} bytes of ACKs queued for a peer that never reads"
        await at.closed()  # and the connection was ended, not left to hold them


async def test_a_client_that_reads_gets_every_ping_answered(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        n = 20_000
        for i in range(0, n, 1000):
            await at.send(b"".join(frame(PING, 0, 0, u32(0) + u32(j)) for j in range(i, i + 1000)))
            await trio.sleep(0.001)
        frames = await at.read()
        acks = [f for f in frames if isinstance(f, PingFrame) and "ACK" in f.flags]
        assert len(acks) == n
        assert at.server.alive and at.goaways() == []


# --- rapid reset ----------------------------------------------------------------------------------


async def test_rapid_reset_ends_the_connection(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        for burst in range(20):
            for i in range(500):
                sid = 2 * (burst * 500 + i) + 1
                at.client.send_headers(sid, REQ)
                at.client.reset_stream(sid, Codes.CANCEL)
            if not await at.flush_client():
                break
        await at.read()
        assert len(at.started) <= 2000, f"{len(at.started)} handlers for 10000 reset streams"
        assert at.goaways()[:1] in ([Codes.ENHANCE_YOUR_CALM], [Codes.PROTOCOL_ERROR])
        await at.closed()


async def test_a_client_cancelling_now_and_then_keeps_its_connection(autojump_clock: Clock) -> None:
    async with attacked() as at:
        await at.handshake()
        for i in range(100):
            at.client.send_headers(2 * i + 1, REQ)
            await at.flush_client()
            await trio.sleep(0.05)
            at.client.reset_stream(2 * i + 1, Codes.CANCEL)
            await at.flush_client()
        at.client.send_headers(1001, REQ)
        at.client.send_data(1001, b"after the cancels", end_stream=True)
        await at.flush_client()
        frames = await at.read()
        echoed = b"".join(
            f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == 1001
        )
        assert echoed == b"after the cancels"
        assert at.server.alive and at.goaways() == []


# --- empty frames ---------------------------------------------------------------------------------


async def test_empty_data_frames_do_not_pile_up(autojump_clock: Clock) -> None:
    go = trio.Event()
    empties: list[int] = []

    async def slow_reader(stream: H2Stream) -> None:
        await stream.next_event()
        await go.wait()
        n = 0
        while (ev := await stream.next_event())[0] != "end":
            n += ev[0] == "data" and not ev[1]
        empties.append(n)
        await stream.send_headers([(b":status", b"200")], end=True)

    async with attacked(slow_reader) as at:
        await at.handshake()
        at.client.send_headers(1, REQ)
        await at.flush_client()
        for _ in range(20):
            await at.send(frame(DATA, 0, 1) * 1000)
        await at.send(frame(DATA, END_STREAM, 1))
        await trio.sleep(1)
        go.set()
        await at.read()
        # Either they were dropped on arrival, or the flood ended the connection.
        assert empties == [0] or (at.goaways() and at.goaways()[0] == Codes.ENHANCE_YOUR_CALM)
