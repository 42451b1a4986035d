"""Opaque TCP: copy bytes both ways until both directions end.

Each direction ends on EOF or error.  On EOF the writer side is half-closed when the stream can
(``send_eof`` on a plain TCP stream), so a client's FIN arrives as a FIN.  A TLS stream cannot
half-close without closing, so across the mTLS hop a half-close waits for the other direction
(multiplexed streams with END_STREAM replace this).  An error in one direction ends both.
"""

from __future__ import annotations

import trio

from nodemesh.telemetry.metrics import ByteCount
from nodemesh.transport.edges import IO_ERRORS

CHUNK = 64 * 1024


SpliceStats = ByteCount  # bytes_in: downstream -> upstream; bytes_out: the other way


async def splice(
    down: trio.abc.Stream,
    up: trio.abc.Stream,
    *,
    prefix: bytes = b"",
    stats: SpliceStats | None = None,
) -> SpliceStats:
    st = stats or SpliceStats()
    async with trio.open_nursery() as nursery:

        async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, inbound: bool) -> None:
            try:
                while True:
                    data = await src.receive_some(CHUNK)
                    if not data:
                        break
                    await dst.send_all(data)
                    if inbound:
                        st.bytes_in += len(data)
                    else:
                        st.bytes_out += len(data)
                if isinstance(dst, trio.abc.HalfCloseableStream):
                    await dst.send_eof()
            except IO_ERRORS:
                nursery.cancel_scope.cancel()

        if prefix:
            try:
                await up.send_all(prefix)
                st.bytes_in += len(prefix)
            except IO_ERRORS:
                return st
        nursery.start_soon(copy, down, up, True)
        nursery.start_soon(copy, up, down, False)
    return st
