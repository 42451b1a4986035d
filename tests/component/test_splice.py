"""Opaque TCP splice over memory stream pairs: bytes both ways, half-close, errors, stats."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing

from nodemesh.proxy.splice import SpliceStats, splice

Clock = trio.testing.MockClock
WAIT = 5.0  # virtual seconds: only a deadlock ever reaches it


class Resetting(trio.abc.Stream):
    """The peer's close arrives as a reset (ECONNRESET); also not half-closeable, like TLS."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if not data:
            raise trio.BrokenResourceError("connection reset by peer")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class Whole(trio.abc.Stream):
    """A plain stream that cannot half-close (an SSLStream, say): EOF passes through on read."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Wire:
    client: trio.abc.HalfCloseableStream
    server: trio.abc.HalfCloseableStream
    stats: SpliceStats
    done: trio.Event
    result: list[SpliceStats]


async def recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    with trio.fail_after(WAIT):
        while len(out) < n:
            data = await stream.receive_some(n - len(out))
            assert data, f"EOF after {len(out)} of {n} bytes"
            out += data
    return bytes(out)


async def recv_eof(stream: trio.abc.ReceiveStream) -> None:
    with trio.fail_after(WAIT):
        assert await stream.receive_some() == b""


@asynccontextmanager
async def spliced(
    *, prefix: bytes = b"", down: str = "plain", up: str = "plain"
) -> AsyncIterator[Wire]:
    """client <-> [down | splice | up] <-> server, with ``splice`` running in a task."""
    client, proxy_down = trio.testing.memory_stream_pair()
    proxy_up, server = trio.testing.memory_stream_pair()
    wrap = {"plain": lambda s: s, "resetting": Resetting, "whole": Whole}
    stats = SpliceStats()
    done = trio.Event()
    result: list[SpliceStats] = []

    async def run() -> None:
        result.append(
            await splice(wrap[down](proxy_down), wrap[up](proxy_up), prefix=prefix, stats=stats)
        )
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield Wire(client, server, stats, done, result)
        nursery.cancel_scope.cancel()


async def wait_done(w: Wire) -> SpliceStats:
    with trio.fail_after(WAIT):
        await w.done.wait()
    return w.result[0]


async def test_bytes_both_ways_and_half_close(autojump_clock: Clock) -> None:
    async with spliced() as w:
        await w.client.send_all(b"hello")
        assert await recv_exactly(w.server, 5) == b"hello"
        await w.server.send_all(b"world!")
        assert await recv_exactly(w.client, 6) == b"world!"
        assert (w.stats.bytes_in, w.stats.bytes_out) == (5, 6)  # counted as they pass

        await w.client.send_eof()
        await recv_eof(w.server)  # the client's FIN arrives as a FIN
        assert not w.done.is_set()  # the other direction is still open
        await w.server.send_all(b" still here")
        assert await recv_exactly(w.client, 11) == b" still here"

        await w.server.send_eof()
        await recv_eof(w.client)
        st = await wait_done(w)
        assert st is w.stats
        assert (st.bytes_in, st.bytes_out) == (5, 17)
        assert repr(st) == "<ByteCount in=5 out=17>"


async def test_server_closing_first(autojump_clock: Clock) -> None:
    async with spliced() as w:
        await w.server.send_all(b"banner\r\n")  # a server-speaks-first protocol
        assert await recv_exactly(w.client, 8) == b"banner\r\n"
        await w.server.send_eof()
        await recv_eof(w.client)
        await w.client.send_all(b"QUIT\r\n")
        assert await recv_exactly(w.server, 6) == b"QUIT\r\n"
        await w.client.send_eof()
        st = await wait_done(w)
        assert (st.bytes_in, st.bytes_out) == (6, 8)


async def test_prefix_goes_first_and_counts(autojump_clock: Clock) -> None:
    async with spliced(prefix=b"GET / HT") as w:
        await w.client.send_all(b"TP/1.1\r\n\r\n")
        assert await recv_exactly(w.server, 18) == b"GET / HTTP/1.1\r\n\r\n"
        await w.client.send_eof()
        await w.server.send_eof()
        st = await wait_done(w)
        assert st.bytes_in == 18


async def test_prefix_to_a_dead_upstream_returns_at_once(autojump_clock: Clock) -> None:
    _client, proxy_down = trio.testing.memory_stream_pair()
    proxy_up, server = trio.testing.memory_stream_pair()
    await server.aclose()
    with trio.fail_after(WAIT):
        st = await splice(proxy_down, proxy_up, prefix=b"peeked")
    assert (st.bytes_in, st.bytes_out) == (0, 0)


async def test_upstream_reset_ends_both_directions(autojump_clock: Clock) -> None:
    async with spliced(up="resetting") as w:
        await w.client.send_all(b"ping")
        assert await recv_exactly(w.server, 4) == b"ping"
        await w.server.aclose()  # reset: the client never closes, yet the splice ends
        st = await wait_done(w)
        assert st.bytes_in == 4


async def test_downstream_reset_ends_both_directions(autojump_clock: Clock) -> None:
    async with spliced(down="resetting") as w:
        await w.server.send_all(b"data")
        assert await recv_exactly(w.client, 4) == b"data"
        await w.client.aclose()
        st = await wait_done(w)
        assert st.bytes_out == 4


async def test_write_to_a_closed_side_ends_both(autojump_clock: Clock) -> None:
    async with spliced() as w:
        await w.server.aclose()  # gone entirely: the next write fails
        await w.client.send_all(b"into the void")
        st = await wait_done(w)
        assert st.bytes_in == 0


async def test_half_close_waits_when_the_upstream_cannot_half_close(autojump_clock: Clock) -> None:
    async with spliced(up="whole") as w:
        await w.client.send_all(b"req")
        assert await recv_exactly(w.server, 3) == b"req"
        await w.client.send_eof()
        with trio.move_on_after(1):  # no FIN can be sent on a stream like TLS: nothing arrives
            await w.server.receive_some()
            raise AssertionError("EOF crossed a stream that cannot half-close")
        await w.server.send_all(b"resp")
        assert await recv_exactly(w.client, 4) == b"resp"
        await w.server.send_eof()
        st = await wait_done(w)
        assert (st.bytes_in, st.bytes_out) == (3, 4)


async def test_a_mebibyte_each_way_at_once_arrives_intact(autojump_clock: Clock) -> None:
    rng = random.Random(11)
    up_data = rng.randbytes(1 << 20)
    down_data = rng.randbytes((1 << 20) + 7)
    async with spliced() as w:

        async def pour(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
            for i in range(0, len(data), 10_000):
                await stream.send_all(data[i : i + 10_000])
            await stream.send_eof()

        got: dict[str, bytes] = {}

        async def drink(name: str, stream: trio.abc.ReceiveStream, n: int) -> None:
            got[name] = await recv_exactly(stream, n)
            await recv_eof(stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pour, w.client, up_data)
            nursery.start_soon(pour, w.server, down_data)
            nursery.start_soon(drink, "up", w.server, len(up_data))
            nursery.start_soon(drink, "down", w.client, len(down_data))
        st = await wait_done(w)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up_data).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down_data).digest()
    assert (st.bytes_in, st.bytes_out) == (len(up_data), len(down_data))


async def test_new_stats_when_none_given(autojump_clock: Clock) -> None:
    client, proxy_down = trio.testing.memory_stream_pair()
    proxy_up, server = trio.testing.memory_stream_pair()
    await client.send_all(b"abc")
    await client.send_eof()
    await server.send_eof()
    with trio.fail_after(WAIT):
        st = await splice(proxy_down, proxy_up)
    assert (st.bytes_in, st.bytes_out) == (3, 0)
    assert await recv_exactly(server, 3) == b"abc"
