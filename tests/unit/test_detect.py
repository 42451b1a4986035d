"""Protocol detection: a table of first bytes, and properties over arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodemesh.protocol.detect import MAX_PEEK, Protocol, detect

HTTP1, HTTP2, OPAQUE, NEED_MORE = (
    Protocol.HTTP1,
    Protocol.HTTP2,
    Protocol.OPAQUE,
    Protocol.NEED_MORE,
)

METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"MKCOL",
    b"M-SEARCH",
]
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CLIENT_HELLO = bytes.fromhex("160301020001") + bytes.fromhex("0001fc0303") + bytes(32)
POSTGRES_STARTUP = bytes.fromhex("0000000804d2162f")  # SSLRequest
POSTGRES_STARTUP_V3 = bytes.fromhex("0000002900030000") + b"user\x00app\x00database\x00db\x00\x00"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_http1(method: bytes) -> None:
    assert detect(method + b" / HTTP/1.1\r\nhost: x\r\n\r\n") is HTTP1
    assert detect(method + b" /") is HTTP1


@pytest.mark.parametrize("method", METHODS)
def test_partial_methods_need_more(method: bytes) -> None:
    for n in range(1, len(method) + 1):
        assert detect(method[:n]) is NEED_MORE, method[:n]
    assert detect(method + b" ") is NEED_MORE  # the target's first byte decides


TABLE = [
    (b"", NEED_MORE),
    (b"GET", NEED_MORE),
    (b"GET ", NEED_MORE),
    (b"GET /", HTTP1),
    (b"GET *", HTTP1),
    (b"OPTIONS * HTTP/1.1\r\n", HTTP1),
    (b"GET http://web.example/ HTTP/1.1\r\n", HTTP1),
    (b"CONNECT 198.18.0.2:443 HTTP/1.1\r\n", HTTP1),
    (b"get /", OPAQUE),  # methods are case-sensitive
    (b"Get /", OPAQUE),
    (b"GET  /", OPAQUE),  # two spaces: not a request line
    (b"GET\t/", OPAQUE),
    (b"GET \x00", OPAQUE),
    (b"G /", OPAQUE),  # no one-letter methods
    (b"GET-", NEED_MORE),  # '-' is a token character (M-SEARCH)
    (b"A" * 20, NEED_MORE),
    (b"A" * 20 + b" ", NEED_MORE),  # the longest method, then the target's first byte decides
    (b"A" * 20 + b" /", HTTP1),
    (b"A" * 21, OPAQUE),  # longer than any method
    (b"A" * 21 + b" /", OPAQUE),
    (CLIENT_HELLO, OPAQUE),
    (b"\x16", OPAQUE),
    (b"\x16\x03\x01", OPAQUE),
    (H2_PREFACE, HTTP2),
    (H2_PREFACE[:14], HTTP2),  # "PRI * HTTP/2.0" decides: no HTTP/1 request looks like it
    (b"PRI * HTTP/1.1\r\n", HTTP1),
    (b"PRI /", HTTP1),
    (b"*1\r\n$4\r\nPING\r\n", OPAQUE),  # Redis
    (b"*", OPAQUE),
    (POSTGRES_STARTUP, OPAQUE),
    (POSTGRES_STARTUP_V3, OPAQUE),
    (b"\x00", OPAQUE),
    (b"\xff\xfe\x00\x01garbage", OPAQUE),
    (b"SSH-2.0-OpenSSH_9.2\r\n", OPAQUE),
    (b"\r\nGET /", OPAQUE),  # leading CRLF tolerated by some servers; not here: opaque is safe
]


@pytest.mark.parametrize(("prefix", "expected"), TABLE, ids=repr)
def test_table(prefix: bytes, expected: Protocol) -> None:
    assert detect(prefix) is expected


@pytest.mark.parametrize("n", range(1, len(H2_PREFACE)))
def test_partial_h2_preface_needs_more_then_is_http2(n: int) -> None:
    assert detect(H2_PREFACE[:n]) is (NEED_MORE if n < 14 else HTTP2)


def test_max_peek_leaves_room_for_a_decision() -> None:
    assert MAX_PEEK >= 22


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_detect_never_raises(data: bytes) -> None:
    assert detect(data) in (HTTP1, HTTP2, OPAQUE, NEED_MORE)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=22, max_size=MAX_PEEK))
@example(b"A" * 22)
@example(b"A" * 20 + b" /")
@example(b"GET " + b"\x00" * 18)
@example(H2_PREFACE)
def test_enough_bytes_always_decide(data: bytes) -> None:
    # The bound is 22, not 21: a 20-letter token, its space and one target byte.
    assert detect(data) is not NEED_MORE


_requestish = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda m, rest: m + rest,
        st.sampled_from([*METHODS, b"PRI", b"PRI *", b"PRI * HTTP/2.0"]),
        st.binary(max_size=12),
    ),
    st.from_regex(rb"\A[A-Z-]{1,22}[ \t]?[/*a-z0-9 ]{0,4}\Z"),
)


@settings(max_examples=500, deadline=None)
@given(_requestish, st.binary(max_size=30))
def test_a_decision_never_changes_with_more_bytes(data: bytes, more: bytes) -> None:
    first = detect(data)
    if first is not NEED_MORE:
        assert detect(data + more) is first


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(METHODS), st.from_regex(rb"\A/[a-z0-9/._-]{0,30}\Z"))
def test_prefixes_of_a_request_line_never_look_opaque(method: bytes, path: bytes) -> None:
    line = method + b" " + path + b" HTTP/1.1\r\n"
    for n in range(len(line) + 1):
        assert detect(line[:n]) in (NEED_MORE, HTTP1), line[:n]
    assert detect(line) is HTTP1
