"""HTTP/1.1 header rules for a proxy: pure, no I/O.

The codec owns framing (``protocol/h1codec.py``): it writes each body as the framing its head
was parsed with, so the framing headers (``content-length``, ``transfer-encoding``) pass through
and the codec re-frames.
Hop-by-hop headers (RFC 9110 §7.6.1) and every header named in ``Connection`` are dropped at each
hop.  ``x-nodemesh-*`` headers are the mesh's own: an app can never send them across.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nodemesh.errors import BadRequest, HeadTooLarge

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


FRAMING = frozenset({b"content-length", b"transfer-encoding"})  # the codec re-frames each hop
MAX_HEAD_BYTES = 64 * 1024  # a request or response head; 431 beyond it


def _named(value: bytes, named: set[bytes] | None) -> set[bytes]:
    """Add the header names a ``Connection`` value lists (case-folded, trimmed)."""
    out = named if named is not None else set()
    out.update(t.strip().lower() for t in value.split(b","))
    return out


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]],
    extra: Sequence[tuple[bytes, bytes]] = (),
    keep: frozenset[bytes] = frozenset(),
) -> Headers:
    """The headers to send on the next hop: hop-by-hop and mesh headers removed (but the mesh
    headers in ``keep``, which the sender is trusted with), ``extra`` added.

    The codec hands us lower-cased names, so no case folding is needed here.  One pass; a second
    only when a ``Connection`` header names further headers to drop.
    """
    out: Headers = []
    named: set[bytes] | None = None
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection":
                named = _named(value, named)
        elif not name.startswith(MESH_PREFIX) or name in keep:
            out.append((name, value))
    if named:
        named -= FRAMING
        if named:
            out = [(n, v) for n, v in out if n not in named]
    out.extend(extra)
    return out


class RequestHead:
    """What a proxy must know of a request head, read in one pass over its headers (pure).

    ``headers``: what the next hop gets (``forward_headers``' rules); ``dst``: the mesh's
    ``x-nodemesh-dst`` if the sender set one (only the inbound side heeds it); ``has_body``:
    Transfer-Encoding, or a Content-Length other than 0; ``upgrade``: ``Connection: upgrade``
    with an ``Upgrade`` header and no body (WebSocket and friends); ``refusal``: why a proxy
    must not forward it although the parser accepted it, or None.
    """

    __slots__ = ("dst", "has_body", "has_host", "headers", "refusal", "upgrade")

    def __init__(
        self,
        headers: Headers,
        *,
        dst: bytes | None = None,
        has_body: bool = False,
        has_host: bool = False,
        upgrade: bool = False,
        refusal: BadRequest | None = None,
    ) -> None:
        self.headers = headers
        self.dst = dst
        self.has_body = has_body
        self.has_host = has_host
        self.upgrade = upgrade
        self.refusal = refusal

    def __repr__(self) -> str:
        return (
            f"<RequestHead {len(self.headers)} headers body={self.has_body} "
            f"upgrade={self.upgrade} refusal={self.refusal!r}>"
        )


def read_request(
    method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> RequestHead:
    out: Headers = []
    named: set[bytes] | None = None
    dst = cl = te = None
    has_host = upgrade_header = False
    size = len(method) + len(target) + 12  # "GET / HTTP/1.1\r\n" and the final CRLF
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name in HOP_BY_HOP:
            if name == b"connection":
                named = _named(value, named)
            elif name == b"upgrade":
                upgrade_header = True
            continue
        if name.startswith(MESH_PREFIX):
            if name == DST_HEADER and dst is None:
                dst = value
            continue
        if name == b"host":
            has_host = True
        elif name == b"content-length":
            cl = value
        elif name == b"transfer-encoding":
            te = value
        out.append((name, value))
    upgrade = False
    if named:
        upgrade = b"upgrade" in named
        named -= FRAMING
        if named:
            out = [(n, v) for n, v in out if n not in named]
    has_body = te is not None or (cl is not None and cl != b"0")
    refusal: BadRequest | None = None
    if size > MAX_HEAD_BYTES:
        # The codec bounds only an *incomplete* head: one that completes in the read after the
        # limit would otherwise pass at up to twice the size, and the app's refusal would look
        # like the endpoint failing.
        refusal = HeadTooLarge(
            f"request head of {size} bytes is over the {MAX_HEAD_BYTES}-byte limit"
        )
    elif te is not None and cl is not None:
        # RFC 9112 §6.1: the two framings may disagree on where this request ends; an app that
        # trusts Content-Length would read a request the mesh never saw (request smuggling).
        refusal = BadRequest("request has both Transfer-Encoding and Content-Length; send one")
    return RequestHead(
        out,
        dst=dst,
        has_body=has_body,
        has_host=has_host,
        upgrade=upgrade and upgrade_header and not has_body,
        refusal=refusal,
    )


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "error"
