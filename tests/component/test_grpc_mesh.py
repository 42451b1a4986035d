"""gRPC's stream shapes through both agents, as frames: no grpcio, no sockets.

A gRPC server answers a unary call as soon as it holds the request message, whether or not the
client's END_STREAM has arrived yet (the agents relay a request's last DATA and its END_STREAM
as separate frames, so it often has not).  Its response is then complete before the request
is, and, as RFC 9113 §8.1 allows, it follows the trailers with ``RST_STREAM(NO_ERROR)``: "stop
sending the request; nothing is wrong".  grpc-core does exactly this (seen in bench/mesh_http.py
runs against grpcio 1.85, 1-3% of calls).  The relay must deliver that response whole, not
turn the reset into an error: ``App`` below is a sans-IO h2 server that behaves the same way,
and the client is a raw h2 client that holds back its END_STREAM to make the order certain.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import structlog.testing
import trio
import trio.testing

from nodemesh.transport.h2conn import H2Conn, H2Stream, StreamError
from tests.component.meshpair import MeshPair, build, catalog
from tests.component.test_h2conn import REQ, _body

Clock = trio.testing.MockClock
Codes = h2.errors.ErrorCodes
WAIT = 5.0  # virtual seconds; with the autojump clock only a hang reaches it
CALL = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"198.18.0.2:8080"),
    (b":path", b"/bench.Echo/Echo"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
OK_TRAILERS = [(b"grpc-status", b"0")]
END_EVENTS = (h2.events.StreamEnded, h2.events.StreamReset)


def message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\0" + struct.pack(">I", len(payload)) + payload


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


# --- one connection: the reset after a complete response ---------------------------------------


async def test_reset_no_error_after_complete_response_keeps_the_response(
    nursery: trio.Nursery, autojump_clock: Clock
) -> None:
    async def answer_early(stream: H2Stream) -> None:
        await stream.next_event()  # the request head; its body is never waited for
        await stream.send_headers([(b":status", b"200")])
        await stream.send_data(b"reply")
        await stream.end(OK_TRAILERS)
        stream.reset(Codes.NO_ERROR)  # all four frames go out in one write

    a, b = trio.testing.memory_stream_pair()
    client = H2Conn(a, client=True, name="client")
    server = H2Conn(b, client=False, name="server", on_stream=answer_early)
    await nursery.start(server.serve)
    await nursery.start(client.serve)
    s = client.open_stream()
    await s.send_headers(REQ)
    await s.send_data(b"request, not yet ended")
    with trio.fail_after(WAIT):
        assert await s.next_event() == ("headers", [(b":status", b"200")])
        assert await _body(s) == (b"reply", OK_TRAILERS)
    assert s.failure is None
    assert s.ended_local  # the peer asked us to stop sending: the request is over
    with pytest.raises(StreamError):
        await s.send_data(b"more")
    assert client.active_streams == 0


# --- through both agents: a gRPC-like app behind agent b ----------------------------------------


class App:
    """A sans-IO h2 server answering like grpc-core: on the whole request message, reply (echo),
    and reset with NO_ERROR if the client's END_STREAM has not arrived by then."""

    def __init__(
        self,
        *,
        cancel_mid_response: bool = False,
        trailers: list[tuple[bytes, bytes]] = OK_TRAILERS,
        wait_for_end: bool = False,
    ) -> None:
        self.cancel_mid_response = cancel_mid_response  # head, then RST_STREAM(CANCEL)
        self.trailers = trailers  # the response's
        self.wait_for_end = wait_for_end  # answer only once the request ended (its trailers)
        self.request_trailers: list[list[tuple[bytes, bytes]]] = []
        self.resets_sent = 0
        self.calls = 0

    async def serve(self, io: trio.abc.HalfCloseableStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        await io.send_all(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        ended: set[int] = set()
        while data := await io.receive_some(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    bodies[ev.stream_id] = b""
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    bodies[ev.stream_id] += ev.data
                elif isinstance(ev, h2.events.TrailersReceived):
                    self.request_trailers.append(list(ev.headers))
                elif isinstance(ev, h2.events.StreamEnded):
                    ended.add(ev.stream_id)
            for sid, body in list(bodies.items()):  # what this read completed
                if self.wait_for_end and sid not in ended:
                    continue
                if len(body) >= 5 and len(body) >= 5 + struct.unpack(">I", body[1:5])[0]:
                    del bodies[sid]
                    self._reply(conn, sid, body, sid in ended)
            await io.send_all(conn.data_to_send())

    def _reply(self, conn: h2.connection.H2Connection, sid: int, body: bytes, ended: bool) -> None:
        self.calls += 1
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        if self.cancel_mid_response:
            conn.reset_stream(sid, Codes.CANCEL)
            return
        conn.send_data(sid, body)
        conn.send_headers(sid, self.trailers, end_stream=True)
        if not ended:
            conn.reset_stream(sid, Codes.NO_ERROR)  # RFC 9113 §8.1: stop sending, no error
            self.resets_sent += 1


class Client:
    """The calling app: a sans-IO h2 client on its connection to agent a."""

    def __init__(self, io: trio.abc.Stream) -> None:
        self.io = io
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.events: dict[int, list[h2.events.Event]] = {}

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.io.send_all(self.conn.data_to_send())

    async def call(
        self,
        payload: bytes,
        *,
        end_request: bool,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> list[h2.events.Event]:
        """One unary call; ``end_request`` False holds the request's END_STREAM back until the
        response ended (so the app surely answers first); ``trailers`` end the request with
        them instead.  The stream's events, in order."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, CALL)
        self.conn.send_data(sid, message(payload), end_stream=end_request and not trailers)
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
        await self.io.send_all(self.conn.data_to_send())
        got = self.events.setdefault(sid, [])
        with trio.fail_after(WAIT):
            while not any(isinstance(e, END_EVENTS) for e in got):
                data = await self.io.receive_some(65536)
                assert data, "agent a closed the app's connection"
                for ev in self.conn.receive_data(data):
                    if (sid_of := getattr(ev, "stream_id", 0)) and sid_of in self.events:
                        self.events[sid_of].append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, sid_of)
                await self.io.send_all(self.conn.data_to_send())
            # Whatever follows the end in the same read (agent a's own reset, say) counts too.
            await trio.testing.wait_all_tasks_blocked()
        return got


def _grpc_pair(nursery: trio.Nursery, app: App) -> MeshPair:
    m = MeshPair(nursery, app.serve)
    grpc = build(catalog({"protocol": "grpc"}), "a")
    m.a.publish(grpc)
    m.b.publish(build(catalog({"protocol": "grpc"}), "b"))
    return m


async def test_grpc_reply_before_request_end_reaches_the_client_whole(
    nursery: trio.Nursery, autojump_clock: Clock
) -> None:
    app = App()
    m = _grpc_pair(nursery, app)
    await m.start()
    client = Client(m.connect())
    await client.start()
    for i in range(3):  # on one app connection, one mesh connection, one app-side connection
        events = await client.call(b"ping %d" % i, end_request=False)
        kinds = [type(e).__name__ for e in events if not isinstance(e, h2.events.WindowUpdated)]
        assert kinds[:4] == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
        data = next(e for e in events if isinstance(e, h2.events.DataReceived))
        assert data.data == message(b"ping %d" % i)
        trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived))
        assert trailers.headers == OK_TRAILERS
        # Agent a may pass the app's "stop sending" on, with the same NO_ERROR; never an error.
        resets = [e.error_code for e in events if isinstance(e, h2.events.StreamReset)]
        assert resets in ([], [Codes.NO_ERROR])
    assert app.resets_sent == 3
    assert (m.agent_links, m.app_links) == (1, 1)
    assert m.statuses("outbound") == {"2xx": 3}


async def test_grpc_calls_that_end_their_request_are_unchanged(
    nursery: trio.Nursery, autojump_clock: Clock
) -> None:
    app = App()
    m = _grpc_pair(nursery, app)
    await m.start()
    client = Client(m.connect())
    await client.start()
    events = await client.call(b"ping", end_request=True)
    assert [type(e).__name__ for e in events if not isinstance(e, h2.events.WindowUpdated)] == [
        "ResponseReceived",
        "DataReceived",
        "TrailersReceived",
        "StreamEnded",
    ]
    assert app.calls == 1


async def test_app_reset_mid_response_reaches_the_client_with_its_code(
    nursery: trio.Nursery, autojump_clock: Clock
) -> None:
    m = _grpc_pair(nursery, App(cancel_mid_response=True))
    await m.start()
    client = Client(m.connect())
    await client.start()
    with structlog.testing.capture_logs() as logs:
        events = await client.call(b"ping", end_request=True)
    kinds = [type(e).__name__ for e in events if not isinstance(e, h2.events.WindowUpdated)]
    assert kinds == ["ResponseReceived", "StreamReset"]
    reset = events[-1]
    assert isinstance(reset, h2.events.StreamReset)
    assert reset.error_code == Codes.CANCEL  # a cancellation, not INTERNAL_ERROR
    # Each agent that reset its caller's stream said so, once, at info.
    resets = [e for e in logs if e["event"] == "stream_reset"]
    assert [(e["log_level"], e["code"]) for e in resets] == [("info", "CANCEL")] * 2


async def test_mesh_headers_in_trailers_are_stripped_both_ways(
    nursery: trio.Nursery, autojump_clock: Clock
) -> None:
    """An app cannot claim a caller identity, or set a mesh header on its callers, by putting
    ``x-nodemesh-*`` in trailers instead of heads: both agents drop them, other trailers pass."""
    spoof = (b"x-nodemesh-client-id", b"spiffe://mesh.test/dc/dc1/svc/admin")
    app = App(trailers=[*OK_TRAILERS, (b"x-nodemesh-error", b"forged"), (b"x-app", b"1")],
              wait_for_end=True)  # fmt: skip
    m = _grpc_pair(nursery, app)
    await m.start()
    client = Client(m.connect())
    await client.start()
    events = await client.call(b"ping", end_request=True, trailers=[spoof, (b"x-req", b"2")])
    assert app.request_trailers == [[(b"x-req", b"2")]]
    trailers = next(e for e in events if isinstance(e, h2.events.TrailersReceived))
    assert trailers.headers == [*OK_TRAILERS, (b"x-app", b"1")]
