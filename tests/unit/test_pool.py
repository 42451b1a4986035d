"""Upstream pool bookkeeping with a fake clock, on real client codecs over memory streams."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import trio
import trio.testing

from nodemesh.protocol.h1codec import NEED_DATA, NO_BODY, EndOfMessage, Response
from nodemesh.proxy.pool import Pool, Upstream

IDLE = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def upstream(key: Hashable = "web", *, response: bytes | None = None) -> Upstream:
    """An Upstream whose client codec has finished one exchange unless told otherwise."""
    ours, _theirs = trio.testing.memory_stream_pair()
    up = Upstream(key, ours)
    up.conn.send_request(b"GET", b"/", [(b"host", b"web")], NO_BODY)
    up.conn.send_end()
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" if response is None else response
    if not data:
        return up  # still waiting for the answer (an empty receive_data would mean EOF)
    up.conn.receive_data(data)
    for _ in range(10):
        if up.conn.next_event() is NEED_DATA or up.conn.response_done:
            break
    return up


def pool(clock: Clock, max_idle: int = 4) -> Pool:
    async def refuse(key: object) -> Upstream:
        raise AssertionError("the synchronous bookkeeping never connects")

    return Pool(refuse, max_idle_per_key=max_idle, idle_timeout=IDLE, clock=clock)


def test_finished_exchange_is_reusable() -> None:
    up = upstream(("198.18.0.2", 4143))
    assert up.reusable
    assert repr(up) == (
        "<Upstream ('198.18.0.2', 4143) <ClientConn request_done=True response_done=True>>"
    )


def test_checkout_of_an_empty_pool() -> None:
    p = pool(Clock())
    assert p.checkout("web") == (None, [])
    assert repr(p) == "<Pool keys=0 idle=0 opened=0>"


def test_checkin_then_checkout_reuses_the_connection() -> None:
    clock = Clock()
    p = pool(clock)
    up = upstream()
    assert p.checkin(up)
    assert up.last_used == clock.now
    assert p.idle_count() == 1
    clock.now += IDLE - 0.001
    got, stale = p.checkout("web")
    assert got is up
    assert stale == []
    assert up.reused
    assert repr(up) == "<Upstream web <ClientConn request_done=True response_done=True> reused>"
    assert p.idle_count() == 0
    assert p.checkout("web") == (None, [])


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\npart",  # mid-body
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",  # peer closes
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",  # HTTP/1.0: no keep-alive
        b"",  # no answer yet
    ],
    ids=["mid-body", "connection-close", "http10", "waiting"],
)
def test_unfinished_or_closing_connections_are_not_pooled(response: bytes) -> None:
    p = pool(Clock())
    up = upstream(response=response)
    assert not up.reusable
    assert not p.checkin(up)
    assert p.idle_count() == 0


def test_keys_are_separate() -> None:
    p = pool(Clock())
    a, b = upstream("a"), upstream("b")
    p.checkin(a)
    p.checkin(b)
    assert p.checkout("b") == (b, [])
    assert p.checkout("b") == (None, [])
    assert p.checkout("a") == (a, [])


def test_max_idle_per_key() -> None:
    p = pool(Clock(), max_idle=2)
    assert p.checkin(upstream("a"))
    assert p.checkin(upstream("a"))
    assert not p.checkin(upstream("a"))  # full: the caller closes it
    assert p.checkin(upstream("b"))
    assert p.idle_count() == 3


def test_most_recently_used_first() -> None:
    clock = Clock()
    p = pool(clock)
    older, newer = upstream(), upstream()
    p.checkin(older)
    clock.now += 1
    p.checkin(newer)
    assert p.checkout("web")[0] is newer
    assert p.checkout("web")[0] is older


def test_checkout_returns_stale_connections_to_close() -> None:
    clock = Clock()
    p = pool(clock)
    old, mid, warm = upstream(), upstream(), upstream()
    p.checkin(old)
    clock.now += 10
    p.checkin(mid)
    clock.now += 10
    p.checkin(warm)
    clock.now += IDLE - 15  # old: 65 s, mid: 55 s, warm: 45 s
    assert p.checkout("web") == (warm, [])
    assert p.checkout("web") == (mid, [])
    assert p.checkout("web") == (None, [old])
    assert p.idle_count() == 0


def test_idle_timeout_boundary_is_stale() -> None:
    clock = Clock()
    p = pool(clock)
    up = upstream()
    p.checkin(up)
    clock.now += IDLE
    assert p.checkout("web") == (None, [up])


def test_expired() -> None:
    clock = Clock()
    p = pool(clock)
    a, b, c = upstream("a"), upstream("a"), upstream("b")
    p.checkin(a)
    p.checkin(c)
    clock.now += 30
    p.checkin(b)
    assert p.expired() == []
    clock.now += 31
    assert sorted(map(id, p.expired())) == sorted([id(a), id(c)])
    assert p.idle_count() == 1
    assert repr(p) == "<Pool keys=1 idle=1 opened=0>"  # key "b" is gone, not left empty
    assert p.expired() == []
    clock.now += 30
    assert p.expired() == [b]
    assert p.idle_count() == 0
    assert repr(p) == "<Pool keys=0 idle=0 opened=0>"


def test_drain() -> None:
    p = pool(Clock())
    ups = [upstream("a"), upstream("a"), upstream("b")]
    for up in ups:
        p.checkin(up)
    assert sorted(map(id, p.drain())) == sorted(map(id, ups))
    assert p.idle_count() == 0
    assert p.drain() == []


# --- the async wrappers over memory streams ----------------------------------------------------


class Dialer:
    """A connector that records every connection and keeps the far ends to observe closes."""

    def __init__(self) -> None:
        self.far: list[trio.abc.Stream] = []
        self.keys: list[object] = []

    async def __call__(self, key: object) -> Upstream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.far.append(theirs)
        self.keys.append(key)
        return Upstream(key, ours)


def finish(up: Upstream) -> Upstream:
    up.conn.send_request(b"GET", b"/", [(b"host", b"web")], NO_BODY)
    up.conn.send_end()
    up.conn.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(up.conn.next_event(), Response)
    assert isinstance(up.conn.next_event(), EndOfMessage)
    return up


async def closed(far: trio.abc.ReceiveStream) -> bool:
    with trio.fail_after(1):
        return await far.receive_some() == b""


async def test_acquire_connects_then_reuses() -> None:
    dial = Dialer()
    p = Pool(dial, max_idle_per_key=2, idle_timeout=IDLE, clock=trio.current_time)
    up = await p.acquire("web")
    assert (p.opened, dial.keys) == (1, ["web"])
    await p.release(finish(up))
    again = await p.acquire("web")
    assert again is up
    assert again.reused
    assert p.opened == 1
    fresh = await p.acquire("web", fresh=True)
    assert fresh is not up
    assert p.opened == 2


async def test_release_closes_what_cannot_be_pooled() -> None:
    dial = Dialer()
    p = Pool(dial, max_idle_per_key=1, idle_timeout=IDLE, clock=trio.current_time)
    half = await p.acquire("web")
    half.conn.send_request(b"GET", b"/", [(b"host", b"web")], NO_BODY)
    await p.release(half)
    assert await closed(dial.far[0])
    a, b = await p.acquire("web"), await p.acquire("web")
    await p.release(finish(a))
    await p.release(finish(b))  # over max_idle_per_key
    assert await closed(dial.far[2])
    assert p.idle_count() == 1


async def test_acquire_closes_stale_connections(autojump_clock: trio.testing.MockClock) -> None:
    dial = Dialer()
    p = Pool(dial, max_idle_per_key=2, idle_timeout=IDLE, clock=trio.current_time)
    up = await p.acquire("web")
    await p.release(finish(up))
    await trio.sleep(IDLE + 1)
    new = await p.acquire("web")
    assert new is not up
    assert await closed(dial.far[0])


async def test_reaper_closes_expired_and_drains_on_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dial = Dialer()
    p = Pool(dial, max_idle_per_key=4, idle_timeout=IDLE, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(p.serve_reaper)
        old = await p.acquire("a")
        await p.release(finish(old))
        await trio.sleep(IDLE / 2)
        young = await p.acquire("b")
        await p.release(finish(young))
        await trio.sleep(IDLE / 2 + IDLE / 4 + 1)  # old expired and reaped, young not yet
        assert p.idle_count() == 1
        assert await closed(dial.far[0])
        nursery.cancel_scope.cancel()
    assert p.idle_count() == 0
    assert await closed(dial.far[1])
