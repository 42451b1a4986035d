"""HTTP/1.1 header rules for a proxy: pure, no I/O.

h11 owns framing: it writes Content-Length or chunked encoding from the headers we hand it, so
the framing headers (``content-length``, ``transfer-encoding``) pass through and h11 re-frames.
Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in ``Connection`` are dropped at each
hop.  ``x-nodemesh-*`` headers are the mesh's own: an app can never send them across.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
MESH_PREFIX = b"x-nodemesh-"
# The target instance (ip:port) the inbound agent delivers to, set by the outbound agent.
DST_HEADER = b"x-nodemesh-dst"
# The verified SPIFFE identity of the calling service, set by the inbound agent for the app.
CLIENT_ID_HEADER = b"x-nodemesh-client-id"
ERROR_HEADER = b"x-nodemesh-error"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]], extra: Sequence[tuple[bytes, bytes]] = ()
) -> Headers:
    """The headers to send on the next hop: hop-by-hop and mesh headers removed, ``extra`` added.

    h11 hands us lower-cased names, so no case folding is needed here.
    """
    hdrs = list(headers)
    named: set[bytes] = set()
    for name, value in hdrs:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    named -= {b"content-length", b"transfer-encoding"}  # framing: h11 re-frames each hop
    out = [
        (n, v)
        for n, v in hdrs
        if n not in HOP_BY_HOP and n not in named and not n.startswith(MESH_PREFIX)
    ]
    out.extend(extra)
    return out


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"
