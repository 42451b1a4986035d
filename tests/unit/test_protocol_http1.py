"""HTTP/1.1 header rules for the next hop: hop-by-hop, Connection-named and mesh headers."""

from __future__ import annotations

import pytest

from nodemesh.protocol.http1 import (
    CLIENT_ID_HEADER,
    DST_HEADER,
    ERROR_HEADER,
    HOP_BY_HOP,
    IDEMPOTENT,
    Headers,
    forward_headers,
    header,
    status_class,
)

H = list[tuple[bytes, bytes]]

TABLE: list[tuple[str, H, H, H]] = [
    (
        "end-to-end headers pass in order",
        [(b"host", b"web"), (b"accept", b"*/*"), (b"user-agent", b"t"), (b"accept", b"x")],
        [],
        [(b"host", b"web"), (b"accept", b"*/*"), (b"user-agent", b"t"), (b"accept", b"x")],
    ),
    (
        "every hop-by-hop header is dropped",
        [(name, b"v") for name in sorted(HOP_BY_HOP)] + [(b"host", b"web")],
        [],
        [(b"host", b"web")],
    ),
    (
        "tokens named in Connection are dropped, case-folded and trimmed",
        [
            (b"connection", b"keep-alive, X-Trace ,x-debug"),
            (b"x-trace", b"1"),
            (b"x-debug", b"2"),
            (b"x-other", b"3"),
            (b"keep-alive", b"timeout=5"),
        ],
        [],
        [(b"x-other", b"3")],
    ),
    (
        "every Connection header counts",
        [(b"connection", b"x-a"), (b"connection", b"x-b"), (b"x-a", b"1"), (b"x-b", b"2")],
        [],
        [],
    ),
    (
        "mesh headers from the app are dropped",
        [
            (DST_HEADER, b"198.18.0.9:22"),
            (CLIENT_ID_HEADER, b"spiffe://evil/dc/dc1/svc/admin"),
            (ERROR_HEADER, b"fake"),
            (b"x-nodemesh-anything", b"1"),
            (b"x-nodemeshy", b"kept: not the prefix"),
        ],
        [],
        [(b"x-nodemeshy", b"kept: not the prefix")],
    ),
    (
        "framing headers are kept for h11 to re-frame",
        [
            (b"content-length", b"12"),
            (b"transfer-encoding", b"chunked"),
            (b"expect", b"100-continue"),
        ],
        [],
        [
            (b"content-length", b"12"),
            (b"transfer-encoding", b"chunked"),
            (b"expect", b"100-continue"),
        ],
    ),
    (
        "extra headers are appended after filtering, mesh ones included",
        [(b"host", b"web"), (DST_HEADER, b"spoofed")],
        [(DST_HEADER, b"198.18.0.2:8080")],
        [(b"host", b"web"), (DST_HEADER, b"198.18.0.2:8080")],
    ),
    (
        "an empty Connection token drops nothing else",
        [(b"connection", b", ,"), (b"x-a", b"1")],
        [],
        [(b"x-a", b"1")],
    ),
]


@pytest.mark.parametrize(("name", "given", "extra", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_forward_headers(name: str, given: H, extra: H, expected: H) -> None:
    out: Headers = forward_headers(given, extra)
    assert out == expected


def test_forward_headers_accepts_any_iterable_and_copies() -> None:
    given = [(b"a", b"1")]
    out = forward_headers(iter(given))
    assert out == given
    out.append((b"b", b"2"))
    assert given == [(b"a", b"1")]


@pytest.mark.parametrize("name", [b"content-length", b"transfer-encoding"])
def test_framing_headers_survive_being_named_in_connection(name: bytes) -> None:
    value = b"5" if name == b"content-length" else b"chunked"
    out = forward_headers([(b"connection", name), (name, value)])
    assert out == [(name, value)]


def test_header_lookup() -> None:
    hs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert header(hs, b"a") == b"1"  # the first one
    assert header(hs, b"b") == b"2"
    assert header(hs, b"c") is None
    assert header([], b"a") is None


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (0, "error"),
        (99, "error"),
        (100, "1xx"),
        (200, "2xx"),
        (204, "2xx"),
        (301, "3xx"),
        (404, "4xx"),
        (503, "5xx"),
        (599, "5xx"),
        (600, "error"),
        (-200, "error"),
    ],
)
def test_status_class(status: int, cls: str) -> None:
    assert status_class(status) == cls


def test_idempotent_methods() -> None:
    assert {b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"} == IDEMPOTENT
    assert b"POST" not in IDEMPOTENT
    assert b"PATCH" not in IDEMPOTENT
    assert b"CONNECT" not in IDEMPOTENT
