"""A TLS connection that ends without close_notify is cut, never a clean end.

Some Python builds (Debian's 3.11.2) set ``ssl.OP_IGNORE_UNEXPECTED_EOF`` on every new
context; with it a truncated request or response body reads as a finished one.  The mesh's
contexts clear it, whatever the interpreter's default.
"""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

from nodemesh.identity import spiffe
from nodemesh.transport.edges import accept_tls, open_tls
from tests.component import meshpair as mp


def test_every_mesh_context_treats_a_missing_close_notify_as_an_error() -> None:
    a = mp.agent("a", mp.A_IP)
    store = a.identities
    contexts = [
        store.server_context(),
        store.client_context(None),
        store.client_context(None, http1=True),
    ]
    for ctx in contexts:
        assert not ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF


async def test_a_peer_that_vanishes_mid_stream_is_broken_not_ended() -> None:
    a = mp.agent("a", mp.A_IP)
    b = mp.agent("b", mp.B_IP)
    mp._issue(b.identities, mp.WEB)
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server_ctx = b.identities.server_context()
    client_ctx = a.identities.client_context(None, http1=True)
    async with trio.open_nursery() as nursery:
        accepted: list[object] = []

        async def accept() -> None:
            accepted.append(await accept_tls(server_raw, server_ctx, 5.0))

        nursery.start_soon(accept)
        client = await open_tls(client_raw, client_ctx, spiffe.server_name(mp.WEB), 5.0)
    server = accepted[0]
    await client.send_all(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\n0123")
    assert await server.receive_some(65536)  # type: ignore[attr-defined]
    await client.raw.aclose()  # the socket goes, no close_notify first
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(65536)  # type: ignore[attr-defined]
