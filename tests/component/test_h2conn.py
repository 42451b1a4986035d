"""H2Conn over in-memory streams: a client and a server connection wired together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import h2.errors
import pytest
import trio
import trio.testing

from nodemesh.transport.h2conn import INITIAL_WINDOW, H2Conn, H2Stream, StreamError

Handler = Callable[[H2Stream], Awaitable[None]]
REQ = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")]


async def _pair(nursery: trio.Nursery, handler: Handler) -> H2Conn:
    a, b = trio.testing.memory_stream_pair()
    client = H2Conn(a, client=True, name="client")
    server = H2Conn(b, client=False, name="server", on_stream=handler)
    await nursery.start(server.serve)
    await nursery.start(client.serve)
    return client


async def _body(stream: H2Stream) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    data, trailers = b"", []
    while True:
        ev = await stream.next_event()
        if ev[0] == "data":
            data += ev[1]
        elif ev[0] == "trailers":
            trailers = ev[1]
        elif ev[0] == "end":
            return data, trailers


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def echo(stream: H2Stream) -> None:
    ev = await stream.next_event()
    assert ev[0] == "headers"
    await stream.send_headers([(b":status", b"200")])
    while True:
        ev = await stream.next_event()
        if ev[0] == "data":
            await stream.send_data(ev[1])
        elif ev[0] == "trailers":
            await stream.end(trailers=ev[1])
            return
        elif ev[0] == "end":
            await stream.end()
            return


async def test_request_response_with_body_and_trailers(nursery: trio.Nursery) -> None:
    client = await _pair(nursery, echo)
    s = client.open_stream()
    await s.send_headers(REQ)
    await s.send_data(b"hello ")
    await s.send_data(b"world")
    await s.end(trailers=[(b"grpc-status", b"0")])
    ev = await s.next_event()
    assert ev == ("headers", [(b":status", b"200")])
    body, trailers = await _body(s)
    assert body == b"hello world"
    assert trailers == [(b"grpc-status", b"0")]
    assert client.active_streams == 0


async def test_many_concurrent_streams_share_one_connection(nursery: trio.Nursery) -> None:
    client = await _pair(nursery, echo)
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        s = client.open_stream()
        await s.send_headers(REQ)
        await s.send_data(str(i).encode() * 1000, end=True)
        await s.next_event()
        results[i] = (await _body(s))[0]

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(one, i)
    assert all(results[i] == str(i).encode() * 1000 for i in range(50))


async def test_large_body_larger_than_every_window(nursery: trio.Nursery) -> None:
    client = await _pair(nursery, echo)
    payload = bytes(range(256)) * (4 * INITIAL_WINDOW // 256)
    s = client.open_stream()
    await s.send_headers(REQ)
    got = b""

    async def send() -> None:
        await s.send_data(payload, end=True)

    async with trio.open_nursery() as n:
        n.start_soon(send)
        await s.next_event()
        got = (await _body(s))[0]
    assert got == payload


async def test_a_reader_that_stops_blocks_the_sender(nursery: trio.Nursery) -> None:
    stalled = trio.Event()

    async def never_reads(stream: H2Stream) -> None:
        await stream.next_event()  # the headers
        await stalled.wait()

    client = await _pair(nursery, never_reads)
    s = client.open_stream()
    await s.send_headers(REQ)
    sent = 0
    with trio.move_on_after(1):
        while True:
            await s.send_data(b"x" * 16384)
            sent += 16384
    # The sender stopped at about one window: nothing buffers without bound.
    assert INITIAL_WINDOW - 16384 <= sent <= INITIAL_WINDOW + 16384
    stalled.set()


async def test_reset_reaches_the_other_side_as_an_error(nursery: trio.Nursery) -> None:
    async def refuse(stream: H2Stream) -> None:
        await stream.next_event()
        stream.reset(h2.errors.ErrorCodes.REFUSED_STREAM)

    client = await _pair(nursery, refuse)
    s = client.open_stream()
    await s.send_headers(REQ, end=True)
    with pytest.raises(StreamError) as e:
        await s.next_event()
    assert e.value.unprocessed


async def test_peer_garbage_ends_the_connection_not_the_process(nursery: trio.Nursery) -> None:
    a, b = trio.testing.memory_stream_pair()
    server = H2Conn(b, client=False, name="server", on_stream=echo)
    await nursery.start(server.serve)
    await a.send_all(b"this is not the HTTP/2 preface at all\r\n\r\n")
    with trio.fail_after(5):
        while server.alive:
            await trio.sleep(0.01)
    # The server said GOAWAY (PROTOCOL_ERROR) before giving up.
    data = await a.receive_some(65536)
    assert data and b"\x07" in data[:200]


async def test_streams_dropped_with_unread_data_give_the_window_back(nursery: trio.Nursery) -> None:
    # Each response sends half the connection window; the client drops each stream unread.
    # Unread data counts against the *connection* window until acknowledged: without crediting
    # it back, two such streams would stall every later body on the connection for good.
    half = INITIAL_WINDOW // 2

    async def big(stream: H2Stream) -> None:
        await stream.next_event()
        await stream.send_headers([(b":status", b"200")])
        await stream.send_data(b"x" * half, end=True)

    client = await _pair(nursery, big)
    window = client.h2._inbound_flow_control_window_manager
    for _ in range(2):
        s = client.open_stream()
        await s.send_headers(REQ, end=True)
        assert (await s.next_event())[0] == "headers"
        with trio.fail_after(5):
            while not s.ended_remote:  # the whole body arrived, unread
                await trio.sleep(0.01)
        s.reset()
    await trio.sleep(0.1)
    assert window.current_window_size >= half, window.current_window_size
    s = client.open_stream()
    await s.send_headers(REQ, end=True)
    await s.next_event()
    with trio.fail_after(5):
        body, _ = await _body(s)
    assert len(body) == half


async def test_windows_are_wide_between_agents_and_stay_narrow_towards_apps() -> None:
    """Tunnels ride the agents' connections (4 MiB, or bulk stalls on WINDOW_UPDATEs); an app's
    connections are one per app connection and keep 1 MiB, so their memory bound stays."""
    from nodemesh.inbound.server import Inbound
    from nodemesh.outbound.server import Outbound
    from nodemesh.transport.h2conn import PEER_WINDOW
    from tests.component import meshpair as mp

    a, b = mp.agent("a", mp.A_IP), mp.agent("b", mp.B_IP)
    assert Outbound(a).mux._window == PEER_WINDOW == 4 << 20
    assert Inbound(b).h2apps._window == INITIAL_WINDOW == 1 << 20
    x, _ = trio.testing.memory_stream_pair()
    for window in (INITIAL_WINDOW, PEER_WINDOW):
        conn = H2Conn(x, client=True, name="t", window=window)
        assert conn.h2.local_settings.initial_window_size == window
