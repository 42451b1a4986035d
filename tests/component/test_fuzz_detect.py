"""Protocol detection under generated input: ``detect`` itself and the outbound read loop around it.

``detect`` must never raise, must never call a real HTTP/1 request line opaque while it is still
arriving, and must decide by ``MAX_PEEK`` bytes.  The read loop (``Outbound._detect``) must give
the same answer however the bytes are split into reads, hand back exactly the bytes it consumed
(they are replayed into the tunnel), and give up at the detection timeout.  Request lines are
generated from RFC 9112's grammar and checked against h11, so the generator cannot drift into
lines that are not valid.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from functools import partial
from types import SimpleNamespace
from typing import TypeVar

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodemesh.outbound.server import Outbound
from nodemesh.protocol.detect import MAX_PEEK, Protocol, detect
from nodemesh.proxy.http1 import IdleSet

HTTP1, OPAQUE, NEED_MORE = Protocol.HTTP1, Protocol.OPAQUE, Protocol.NEED_MORE
T = TypeVar("T")
DETECT_TIMEOUT = 10.0  # virtual seconds (the autojump clock); the agent's default

# Deterministic: the same examples on every run and machine, and nothing written to disk.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

# The IANA HTTP method registry (RFC 9110 §16.1), minus PRI, which only the h2 preface uses.
METHODS = [
    b"ACL", b"BASELINE-CONTROL", b"BIND", b"CHECKIN", b"CHECKOUT", b"CONNECT", b"COPY",
    b"DELETE", b"GET", b"HEAD", b"LABEL", b"LINK", b"LOCK", b"MERGE", b"MKACTIVITY",
    b"MKCALENDAR", b"MKCOL", b"MKREDIRECTREF", b"MKWORKSPACE", b"MOVE", b"OPTIONS",
    b"ORDERPATCH", b"PATCH", b"POST", b"PROPFIND", b"PROPPATCH", b"PUT", b"QUERY", b"REBIND",
    b"REPORT", b"SEARCH", b"TRACE", b"UNBIND", b"UNCHECKOUT", b"UNLINK", b"UNLOCK", b"UPDATE",
    b"UPDATEREDIRECTREF", b"VERSION-CONTROL",
]  # fmt: skip

_PCHARS = rb"[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2}"
_origin = st.from_regex(rb"\A(/(" + _PCHARS + rb")*)+(\?(" + _PCHARS + rb"|[/?])*)?\Z")
_host = st.one_of(
    st.from_regex(rb"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}\Z"),
    st.from_regex(rb"\A198\.1[89]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
)
_port = st.integers(1, 65535).map(lambda p: b"%d" % p)
_absolute = st.builds(
    lambda scheme, host, path: scheme + b"://" + host + path,
    st.sampled_from([b"http", b"https", b"HTTP"]),
    _host,
    _origin,
)


@st.composite
def request_lines(draw: st.DrawFn) -> bytes:
    """A valid RFC 9112 request line (with its CRLF) in every request-target form."""
    method = draw(st.sampled_from(METHODS))
    if method == b"CONNECT":
        target = draw(_host) + b":" + draw(_port)  # authority-form
    elif method == b"OPTIONS" and draw(st.booleans()):
        target = b"*"  # asterisk-form
    else:
        target = draw(st.one_of(_origin, _absolute))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    return method + b" " + target + b" " + version + b"\r\n"


def h11_accepts(line: bytes) -> bool:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(line + b"host: web\r\n\r\n")
    return isinstance(conn.next_event(), h11.Request)


# --- detect() ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=4 * MAX_PEEK))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    assert detect(data) in set(Protocol)


@FUZZ
@given(st.from_regex(rb"\A[A-Z\- /*a-z0-9\r\n\t]{0,200}\Z"))
def test_request_shaped_bytes_never_raise(data: bytes) -> None:
    # Random binary rarely reaches the method/target branches; this alphabet lives there.
    assert detect(data) in set(Protocol)


@FUZZ
@given(request_lines())
@example(b"UPDATEREDIRECTREF /x HTTP/1.1\r\n")  # the longest registered method
@example(b"OPTIONS * HTTP/1.1\r\n")
@example(b"CONNECT 198.18.0.2:443 HTTP/1.1\r\n")
def test_prefixes_of_valid_request_lines_are_need_more_or_http1(line: bytes) -> None:
    assert h11_accepts(line), line  # the generator only makes lines a real parser takes
    for n in range(len(line) + 1):
        assert detect(line[:n]) in (NEED_MORE, HTTP1), line[:n]
    assert detect(line) is HTTP1
    assert detect(line + b"host: web\r\n\r\n") is HTTP1


def test_connect_to_an_ipv6_literal_is_http1() -> None:
    line = b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"
    assert h11_accepts(line)
    assert detect(line) is HTTP1


@FUZZ
@given(
    st.one_of(
        st.binary(min_size=MAX_PEEK, max_size=2 * MAX_PEEK),
        st.from_regex(rb"\A[A-Z\-]{0,30} ?[ /*a-z0-9]{0,40}\Z").filter(
            lambda b: len(b) >= MAX_PEEK
        ),
        st.builds(lambda m, pad: m + pad, st.sampled_from(METHODS), st.binary(min_size=MAX_PEEK)),
    )
)
@example(b"A" * MAX_PEEK)
@example(b"-" * MAX_PEEK)
@example(b"PRI * HTTP/2.0" + b"\x00" * MAX_PEEK)
def test_decides_within_max_peek(data: bytes) -> None:
    assert detect(data[:MAX_PEEK]) is not NEED_MORE
    assert detect(data) is detect(data[:MAX_PEEK])  # more bytes never change a decision


# --- the outbound read loop -----------------------------------------------------------------------


async def read_loop(
    chunks: list[bytes], *, eof: bool, timeout: float = DETECT_TIMEOUT
) -> tuple[Protocol, bytes, bytes, float]:
    """Run the agent's detection loop against a client that sends ``chunks`` (then EOF, or then
    nothing).  Returns the decision, the prefix handed on, the bytes left unread in the stream,
    and the virtual time the decision took."""
    client, agent_side = trio.testing.memory_stream_pair()
    stand_in = SimpleNamespace(idle=IdleSet())

    async def send() -> None:
        for chunk in chunks:
            await client.send_all(chunk)
            await trio.sleep(0.001)  # separate reads, as separate TCP segments would be
        if eof:
            await client.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        start = trio.current_time()
        with trio.fail_after(timeout + 5):
            proto, prefix = await Outbound._detect(stand_in, agent_side, timeout)  # type: ignore[arg-type]
        assert proto is not None  # not draining
        elapsed = trio.current_time() - start
    rest = bytearray()
    await client.send_eof()  # if not sent yet: lets the drain below end
    with trio.fail_after(5):
        while data := await agent_side.receive_some(65536):
            rest += data
    return proto, prefix, bytes(rest), elapsed


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """One trio run per hypothesis example, on a fresh autojump clock."""
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


_inputs = st.one_of(
    request_lines().map(lambda line: line + b"host: web\r\n\r\n"),
    st.binary(min_size=1, max_size=3 * MAX_PEEK),
    st.from_regex(rb"\A[A-Z\-]{1,24} ?[ /*a-z0-9]{0,30}\Z"),
)


@FUZZ
@given(st.data(), _inputs, st.booleans())
def test_read_loop_decides_the_same_however_the_bytes_arrive(
    draw: st.DataObject, data: bytes, eof: bool
) -> None:
    chunks = draw.draw(split(data))
    proto, prefix, rest, elapsed = run(partial(read_loop, chunks, eof=eof))
    assert prefix + rest == data  # nothing lost or reordered: the prefix is replayed as-is
    whole = detect(data)
    if whole is not NEED_MORE:
        assert proto is whole
        assert detect(prefix) is whole  # it stopped at a decision, not at a guess
        assert elapsed < DETECT_TIMEOUT
    else:
        # Too short to tell: opaque, at EOF at once, else at the timeout.
        assert (proto, prefix, rest) == (OPAQUE, data, b"")
        assert elapsed == (pytest.approx(DETECT_TIMEOUT) if not eof else pytest.approx(0, abs=1))


def test_a_client_that_stalls_inside_the_method_is_opaque_at_the_timeout() -> None:
    proto, prefix, rest, elapsed = run(partial(read_loop, [b"GE"], eof=False, timeout=3.0))
    assert (proto, prefix, rest) == (OPAQUE, b"GE", b"")
    assert elapsed == pytest.approx(3.0)


def test_a_byte_at_a_time_still_decides_at_the_first_target_byte() -> None:
    line = b"PROPFIND /dav/x HTTP/1.1\r\nhost: web\r\n\r\n"
    proto, prefix, rest, _ = run(partial(read_loop, [bytes([b]) for b in line], eof=True))
    assert (proto, prefix) == (HTTP1, b"PROPFIND /")
    assert rest == line[len(prefix) :]
