"""Multiplexed HTTP/2 connections to peer agents, shared by every app connection.

One key is (peer agent address, destination service): the service selects which identity the
peer proves (SNI), so connections are not shared across services.  A key normally has one
connection carrying up to the peer's ``MAX_CONCURRENT_STREAMS`` streams; a second opens only
when the first is full or going away.  A burst of new app connections waits on one handshake
per key (a per-key lock) instead of opening a connection each: the cost of connecting stops
scaling with the number of app connections.  Idle connections close after ``idle_timeout``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

import trio

from nodemesh.transport.h2conn import INITIAL_WINDOW, H2Conn, H2Stream

Connector = Callable[[Hashable], Awaitable[trio.abc.Stream]]


class MeshPool:
    def __init__(
        self, connect: Connector, *, idle_timeout: float, window: int = INITIAL_WINDOW
    ) -> None:
        self._connect = connect
        self._window = window
        self._idle_timeout = idle_timeout
        self._conns: dict[Hashable, list[H2Conn]] = {}
        self._locks: dict[Hashable, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.opened = 0

    def __repr__(self) -> str:
        n = sum(len(v) for v in self._conns.values())
        return f"<MeshPool keys={len(self._conns)} conns={n} opened={self.opened}>"

    def connections(self, key: Hashable) -> list[H2Conn]:
        return [c for c in self._conns.get(key, []) if c.alive]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(max(self._idle_timeout / 4, 0.5))
                    for conn in self._expired():
                        nursery.start_soon(conn.close)
            finally:
                self._nursery = None

    def _expired(self) -> list[H2Conn]:
        now = trio.current_time()
        out: list[H2Conn] = []
        for key in list(self._conns):
            keep: list[H2Conn] = []
            for c in self._conns[key]:
                if not c.alive:
                    continue
                if c.active_streams == 0 and now - c.last_used >= self._idle_timeout:
                    out.append(c)
                else:
                    keep.append(c)
            if keep:
                self._conns[key] = keep
            else:
                del self._conns[key]
        return out

    def _usable(self, key: Hashable) -> H2Conn | None:
        for c in self._conns.get(key, ()):
            if c.available:
                return c
        return None

    async def open_stream(self, key: Hashable) -> H2Stream:
        """A new stream to ``key``'s agent; connects first if no connection has room."""
        conn = self._usable(key)
        if conn is None:
            lock = self._locks.setdefault(key, trio.Lock())
            async with lock:
                conn = self._usable(key)  # another task may have connected meanwhile
                if conn is None:
                    conn = await self._open(key)
        return conn.open_stream()

    async def _open(self, key: Hashable) -> H2Conn:
        if self._nursery is None:
            raise RuntimeError("MeshPool.serve is not running")
        io = await self._connect(key)
        conn = H2Conn(io, client=True, name=str(key), window=self._window)
        await self._nursery.start(conn.serve)
        self._conns.setdefault(key, []).append(conn)
        self.opened += 1
        return conn
