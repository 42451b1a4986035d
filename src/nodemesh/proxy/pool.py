"""A keep-alive pool of HTTP/1.1 client connections, keyed by destination.

"Decide, then act": the bookkeeping (``checkout``, ``checkin``, ``expired``) is synchronous and
returns what to open or close; the async wrappers do the I/O.  Idle connections are reused
most-recent-first (the warmest, least likely to have been closed by the peer) and evicted after
``idle_timeout``.  The peer's own idle timeout must be longer than ours (inbound 90 s vs outbound
60 s by default) so a connection is rarely closed under us.  One the peer closed while it sat
idle is noticed at checkout (``Upstream.open``: a non-blocking peek) and never lent; one closed
in the instant after, the forwarder retries once on a fresh connection if the request is safe.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from nodemesh.protocol.h1codec import ClientConn
from nodemesh.transport.edges import close_quietly


class Upstream:
    """One client connection: an HTTP/1.1 client codec on a byte stream."""

    __slots__ = ("conn", "identity", "key", "last_used", "reused", "stream")

    def __init__(self, key: Hashable, stream: trio.abc.Stream, identity: str | None = None) -> None:
        self.key = key
        self.stream = stream
        self.conn = ClientConn()
        self.identity = identity  # the peer's verified SPIFFE ID, for mesh connections
        self.last_used = 0.0
        self.reused = False

    def __repr__(self) -> str:
        return f"<Upstream {self.key} {self.conn!r}{' reused' if self.reused else ''}>"

    def open(self) -> bool:
        """Whether the idle connection still looks usable: the peer has not closed it (a
        non-blocking peek, where the stream offers one)."""
        check = getattr(self.stream, "idle_and_open", None)
        return check is None or bool(check())

    @property
    def reusable(self) -> bool:
        return self.conn.reusable


Connector = Callable[[Any], Awaitable[Upstream]]


class Pool:
    def __init__(
        self,
        connect: Connector,
        *,
        max_idle_per_key: int,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._max_idle = max_idle_per_key
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._idle: dict[Hashable, list[Upstream]] = {}
        self.opened = 0

    def __repr__(self) -> str:
        return f"<Pool keys={len(self._idle)} idle={self.idle_count()} opened={self.opened}>"

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    # -- decide ---------------------------------------------------------------------------------

    def checkout(self, key: Hashable) -> tuple[Upstream | None, list[Upstream]]:
        """A warm idle connection for ``key`` (or None), and stale ones to close."""
        stale: list[Upstream] = []
        idle = self._idle.get(key)
        now = self._clock()
        while idle:
            up = idle.pop()
            if now - up.last_used < self._idle_timeout and up.open():
                up.reused = True
                return up, stale
            stale.append(up)
        return None, stale

    def checkin(self, up: Upstream) -> bool:
        """Keep ``up`` for reuse if it finished cleanly and there is room; False → close it."""
        if not up.reusable:
            return False
        idle = self._idle.setdefault(up.key, [])
        if len(idle) >= self._max_idle:
            return False
        up.last_used = self._clock()
        idle.append(up)
        return True

    def expired(self) -> list[Upstream]:
        now = self._clock()
        out: list[Upstream] = []
        for key in list(self._idle):
            keep = [u for u in self._idle[key] if now - u.last_used < self._idle_timeout]
            out.extend(u for u in self._idle[key] if now - u.last_used >= self._idle_timeout)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return out

    def drain(self) -> list[Upstream]:
        out = [u for v in self._idle.values() for u in v]
        self._idle.clear()
        return out

    # -- act ------------------------------------------------------------------------------------

    async def acquire(self, key: Hashable, *, fresh: bool = False) -> Upstream:
        if not fresh:
            up, stale = self.checkout(key)
            for s in stale:
                await close_quietly(s.stream)
            if up is not None:
                return up
        up = await self._connect(key)
        self.opened += 1
        return up

    async def release(self, up: Upstream) -> None:
        if not self.checkin(up):
            await close_quietly(up.stream)

    async def serve_reaper(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(max(self._idle_timeout / 4, 0.5))
                for up in self.expired():
                    await close_quietly(up.stream)
        finally:
            with trio.CancelScope(shield=True):
                for up in self.drain():
                    await close_quietly(up.stream)
