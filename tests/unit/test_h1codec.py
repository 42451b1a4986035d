"""The HTTP/1.1 codec (llhttp through httptools) on its own: events in, bytes out, no I/O.

Each hostile-input guard the codec adds on top of llhttp has a test here that sends the input;
``tests/component/test_fuzz_http1.py`` drives the same codec through the forwarder."""

from __future__ import annotations

import pytest

from nodemesh.protocol.h1codec import (
    CHUNKED,
    CLOSED,
    LENGTH,
    MAX_HEAD_BYTES,
    NEED_DATA,
    NO_BODY,
    UNTIL_CLOSE,
    ClientConn,
    Data,
    EndOfMessage,
    ProtocolError,
    Request,
    Response,
    ServerConn,
)


def events(conn: ServerConn | ClientConn) -> list[object]:
    out: list[object] = []
    for _ in range(1000):
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            out.append(ev)
            return out
        out.append(ev)
    raise AssertionError("no end to the events")


def client(method: bytes = b"GET") -> ClientConn:
    c = ClientConn()
    c.send_request(method, b"/", [(b"host", b"web")], NO_BODY)
    c.send_end()
    return c


# --- requests -------------------------------------------------------------------------------


def test_a_get_is_one_request_ended_with_its_head() -> None:
    s = ServerConn()
    s.receive_data(b"GET /a?b HTTP/1.1\r\nHost: web\r\nX-Two:  v \t\r\n\r\n")
    req = s.next_event()
    assert isinstance(req, Request)
    assert (req.method, req.target, req.http_version, req.framing) == (
        b"GET",
        b"/a?b",
        b"1.1",
        NO_BODY,
    )
    assert req.headers == [(b"host", b"web"), (b"x-two", b"v")]  # names folded, OWS trimmed
    assert s.request_done  # a body-less request needs no second event
    assert s.next_event() is NEED_DATA


def test_pipelined_requests_come_out_one_after_the_other() -> None:
    s = ServerConn()
    s.receive_data(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\nGET /2 HTTP/1.1\r\nhost: a\r\n\r\n")
    first = s.next_event()
    assert isinstance(first, Request) and first.target == b"/1"
    s.send_response(Response(204, []), [])
    s.send_end()
    assert s.reusable
    s.start_next_cycle()
    second = s.next_event()
    assert isinstance(second, Request) and second.target == b"/2"


def test_a_bad_body_is_an_error_after_the_request_was_seen() -> None:
    s = ServerConn()
    s.receive_data(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
    assert isinstance(s.next_event(), Request)
    with pytest.raises(ProtocolError) as e:
        s.next_event()
    assert e.value.error_status_hint == 400
    assert not s.request_done


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(b"GET / HTTP/2.0\r\n\r\n", 505, id="http2-version"),
        pytest.param(b"GET / HTTP/0.9\r\n\r\n", 505, id="http09-version"),
        pytest.param(
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            id="coding-before-chunked",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            400,
            id="cl-and-te",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            400,
            id="two-lengths",
        ),
        pytest.param(b"GET / HTTP/1.1\r\nhost : a\r\n\r\n", 400, id="space-before-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nx: a\r\n folded\r\n\r\n", 400, id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\nhost: a\n\n", 400, id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400, id="nul-in-value"),
    ],
)
def test_refused_heads(head: bytes, status: int) -> None:
    s = ServerConn()
    s.receive_data(head)
    with pytest.raises(ProtocolError) as e:
        s.next_event()
    assert e.value.error_status_hint == status


def test_a_head_that_never_ends_is_refused_past_the_limit() -> None:
    # llhttp has no limit of its own; the codec counts bytes fed while a head is open.
    s = ServerConn()
    s.receive_data(b"GET / HTTP/1.1\r\nx-pad: ")
    fed = 0
    with pytest.raises(ProtocolError) as e:
        while fed < 4 * MAX_HEAD_BYTES:
            s.receive_data(b"a" * 16384)
            fed += 16384
            assert s.next_event() is NEED_DATA
    assert e.value.error_status_hint == 431
    assert fed <= MAX_HEAD_BYTES + 16384


def test_a_chunk_extension_that_never_ends_is_refused() -> None:
    s = ServerConn()
    s.receive_data(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;")
    assert isinstance(s.next_event(), Request)
    with pytest.raises(ProtocolError) as e:
        for _ in range(100):
            s.receive_data(b"e" * 16384)
            assert s.next_event() is NEED_DATA
    assert e.value.error_status_hint == 400


def test_a_long_chunked_body_is_not_mistaken_for_a_stalled_chunk_line() -> None:
    s = ServerConn()
    s.receive_data(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n100000\r\n")
    assert isinstance(s.next_event(), Request)
    got = 0
    for _ in range(64):
        s.receive_data(b"x" * 16384)
        for ev in events(s):
            if isinstance(ev, Data):
                got += len(ev.data)
    assert got == 0x100000


def test_an_upgrade_request_with_a_body_is_read_as_a_body_when_not_upgraded() -> None:
    # llhttp takes everything after an upgrade request's head for the new protocol, body
    # included; parsed on as a request, that body would be a smuggled second request.
    smuggled = b"GET /admin HTTP/1.1\r\nhost: web\r\n\r\n"
    s = ServerConn()
    s.receive_data(
        b"POST / HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
        b"content-length: %d\r\n\r\n%bGET /next HTTP/1.1\r\nhost: web\r\n\r\n"
        % (len(smuggled), smuggled)
    )
    req = s.next_event()
    assert isinstance(req, Request) and req.upgrade and req.framing == LENGTH
    assert not s.request_done  # its body is still to come
    s.not_upgraded()
    body = b""
    while not isinstance(ev := s.next_event(), EndOfMessage):
        assert isinstance(ev, Data)
        body += ev.data
    assert body == smuggled
    assert s.request_done
    s.send_response(Response(200, [], framing=LENGTH), [(b"content-length", b"0")])
    s.send_end()
    s.start_next_cycle()
    nxt = s.next_event()
    assert isinstance(nxt, Request) and nxt.target == b"/next"


def test_the_bytes_after_an_upgrade_head_are_kept_for_the_tunnel() -> None:
    s = ServerConn()
    s.receive_data(
        b"GET /ws HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
        b"\r\n\x81\x05"
    )
    req = s.next_event()
    assert isinstance(req, Request) and req.upgrade and s.request_done
    assert s.trailing_data == b"\x81\x05"


# --- responses ------------------------------------------------------------------------------


def test_a_response_to_head_ends_at_its_head() -> None:
    # llhttp cannot be told the request was HEAD: it would wait for 1,000 body bytes.
    c = client(b"HEAD")
    c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
    got = events(c)
    assert [type(e) for e in got] == [Response, EndOfMessage, type(NEED_DATA)]
    assert c.reusable


def test_bytes_after_a_head_response_spend_the_connection() -> None:
    c = client(b"HEAD")
    c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    events(c)
    assert c.response_done and not c.reusable


def test_bytes_after_a_response_spend_the_connection() -> None:
    c = client()
    c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    events(c)
    assert c.response_done and not c.reusable


def test_informational_responses_come_before_the_final_one() -> None:
    c = client()
    c.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx"
    )
    got = [e for e in events(c) if e is not NEED_DATA]
    assert [type(e) for e in got] == [Response, Response, Data, EndOfMessage]
    assert [e.status_code for e in got if isinstance(e, Response)] == [100, 201]
    assert c.reusable


def test_a_close_delimited_response_ends_at_eof_and_spends_the_connection() -> None:
    c = client()
    c.receive_data(b"HTTP/1.1 200 OK\r\n\r\nsome")
    head = c.next_event()
    assert isinstance(head, Response) and head.framing == UNTIL_CLOSE
    assert isinstance(c.next_event(), Data)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    assert isinstance(c.next_event(), EndOfMessage)
    assert c.response_done and not c.reusable


def test_eof_before_a_response_is_closed_not_an_error() -> None:
    c = client()
    c.receive_data(b"")
    assert c.next_event() is CLOSED
    assert not c.reusable


def test_eof_inside_a_response_is_an_error() -> None:
    c = client()
    c.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    assert isinstance(c.next_event(), Response)
    assert isinstance(c.next_event(), Data)
    c.receive_data(b"")
    with pytest.raises(ProtocolError):
        c.next_event()


def test_control_bytes_in_a_reason_phrase_are_not_relayed() -> None:
    c = client()
    c.receive_data(b"HTTP/1.1 200 O\x01K\r\ncontent-length: 0\r\n\r\n")
    head = c.next_event()
    assert isinstance(head, Response) and head.reason == b""


def test_a_response_transfer_coding_other_than_chunked_is_refused() -> None:
    c = client()
    c.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc")
    with pytest.raises(ProtocolError):
        c.next_event()


# --- writing --------------------------------------------------------------------------------


def _served(head: bytes) -> ServerConn:
    s = ServerConn()
    s.receive_data(head)
    assert isinstance(s.next_event(), Request)
    return s


def test_a_length_response_is_written_as_it_came() -> None:
    s = _served(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    out = s.send_response(Response(200, [], b"OK", framing=LENGTH), [(b"content-length", b"2")])
    out += s.send_data(b"ok") + s.send_end()
    assert out == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert s.reusable


def test_a_close_delimited_response_is_chunked_for_an_http11_client() -> None:
    s = _served(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    out = s.send_response(Response(200, [], b"OK", framing=UNTIL_CLOSE), [])
    out += s.send_data(b"abc") + s.send_data(b"") + s.send_end()
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert s.reusable


def test_an_http10_client_gets_an_identity_body_and_the_connection_ends() -> None:
    s = _served(b"GET / HTTP/1.0\r\n\r\n")
    out = s.send_response(
        Response(200, [], b"OK", framing=CHUNKED), [(b"transfer-encoding", b"chunked")]
    )
    out += s.send_data(b"abc") + s.send_end()
    assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabc"
    assert not s.reusable


def test_a_client_that_asks_to_close_is_told_so() -> None:
    s = _served(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    out = s.send_response(Response(204, []), [])
    assert out.endswith(b"connection: close\r\n\r\n")
    assert not s.reusable


def test_an_error_to_head_has_no_body_and_one_with_a_body_unread_closes() -> None:
    s = _served(b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n")
    out = s.send_error(502, [(b"content-length", b"4")], b"bad\n")
    assert out == b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 4\r\n\r\n"
    assert s.reusable
    s = _served(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 9\r\n\r\nabc")
    out = s.send_error(502, [(b"content-length", b"4")], b"bad\n")
    assert out is not None and b"connection: close\r\n" in out and out.endswith(b"bad\n")
    assert not s.reusable
    assert s.send_error(502, [], b"") is None  # one response per request


def test_a_chunked_request_is_written_as_chunks_with_trailers() -> None:
    c = ClientConn()
    head = c.send_request(b"POST", b"/", [(b"transfer-encoding", b"chunked")], CHUNKED)
    body = c.send_data(b"hello") + c.send_end([(b"x-sum", b"1")])
    assert head == b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    assert body == b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n"


def test_an_http10_client_never_gets_an_informational_response() -> None:
    s = _served(b"POST / HTTP/1.0\r\ncontent-length: 0\r\n\r\n")
    assert s.send_response(Response(100, [], b"Continue"), []) == b""
    s = _served(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
    assert s.send_response(Response(100, [], b"Continue"), []) == b"HTTP/1.1 100 Continue\r\n\r\n"
