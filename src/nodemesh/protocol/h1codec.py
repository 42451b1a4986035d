"""HTTP/1.1 as events for a proxy: parsed by llhttp (through ``httptools``), sans-IO.

Theory of operation
-------------------
h11 cost each agent 220-270 us of its 400-490 us per request (``bench/datapath.py --floor``,
docs/benchmarks.md), most of it in Python-level parsing and state tracking.  llhttp, the parser
Node.js ships, does the same parse in C for about 2 us.  This module keeps h11's shape, so the
forwarder in ``proxy/http1.py`` stays an I/O loop over decisions made here:

* a ``ServerConn`` reads requests from a client and writes the responses to them;
* a ``ClientConn`` writes a request to an upstream and reads its response.

``receive_data(bytes)`` feeds the parser (``b""`` is EOF) and ``next_event()`` hands back, in
order, ``Request`` / ``Response`` (a head), ``Data``, ``EndOfMessage``, then ``NEED_DATA`` or
``CLOSED``.  A parse error is raised as ``ProtocolError`` only after every event before it was
handed out, so a request with a bad body is seen as a request first (400, never forwarded as
complete).  Nothing is validated twice: what llhttp accepted is written on as it is.

What llhttp decides, and what this module adds on top (``docs/protocols.md``):

* llhttp (strict, no leniencies): request and status lines, header tokens and value bytes,
  Content-Length (digits only, one value), Transfer-Encoding (chunked last, never with
  Content-Length), chunk sizes and CRLFs, HTTP versions 0.9-9.9.  Any of these wrong ends the
  connection with a 400.
* here: HTTP versions other than 1.0 and 1.1 (505); a head, a chunk line or trailers over
  ``MAX_HEAD_BYTES`` (431, 400): llhttp itself has no limits; a transfer coding other than
  ``chunked`` (501 from a client; a bad response from an upstream); the body of a response to
  HEAD, which llhttp cannot be told about (the message ends at its head; a reader serves one
  response and is replaced for the next).

The writer frames each message from the framing its head was parsed with: a length or
``close``-delimited body is written as it came, chunked as chunks.  A close-delimited response to
an HTTP/1.1 client is re-chunked, so the client's connection stays open; an HTTP/1.0 client gets
an identity body and the connection ends after it (HTTP/1.0 keep-alive is not offered).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

import httptools

MAX_HEAD_BYTES = 64 * 1024

# How a message's body is delimited, as read (``framing`` on a head).
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3  # a response without Content-Length or chunking: the body ends at EOF


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; ``status_hint`` is what a client should be answered."""

    def __init__(self, msg: str, status_hint: int = 400) -> None:
        super().__init__(msg)
        self.error_status_hint = status_hint


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")  # the peer closed the connection between messages

Headers = list[tuple[bytes, bytes]]


class Request:
    """A request head.  ``headers`` are (lower-cased name, value) pairs, in order, all of them
    (hop-by-hop included); ``upgrade``: llhttp took it as CONNECT or ``Connection: upgrade``."""

    __slots__ = ("framing", "headers", "http_version", "keep_alive", "method", "target", "upgrade")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        http_version: bytes = b"1.1",
        *,
        keep_alive: bool = True,
        framing: int = NO_BODY,
        upgrade: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.framing = framing
        self.upgrade = upgrade

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r} HTTP/{self.http_version.decode()}>"


class Response:
    """A response head (1xx included: an informational one is followed by the final one)."""

    __slots__ = ("framing", "headers", "http_version", "keep_alive", "reason", "status_code")

    def __init__(
        self,
        status_code: int,
        headers: Headers,
        reason: bytes = b"",
        http_version: bytes = b"1.1",
        *,
        keep_alive: bool = True,
        framing: int = NO_BODY,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.reason = reason
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.framing = framing

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.reason!r}>"


class Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<Data {len(self.data)} bytes>"


class EndOfMessage:
    """The end of a body; ``headers`` are its trailers (chunked only)."""

    __slots__ = ("headers",)

    def __init__(self, headers: Headers | None = None) -> None:
        self.headers = headers or []

    def __repr__(self) -> str:
        return f"<EndOfMessage {len(self.headers)} trailers>"


Event = Request | Response | Data | EndOfMessage

_IDLE, _HEAD, _BODY = 0, 1, 2
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_NO_BODY_STATUS = frozenset({204, 304})
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # llhttp lets these through in a reason phrase


class _Reader:
    """One llhttp parser and the events it produced (the parser's callbacks are methods here)."""

    __slots__ = (
        "_body_upgrade",
        "_cl",
        "_final",
        "_head_request",
        "_headers",
        "_informational",
        "_parser",
        "_progress",
        "_reason",
        "_response",
        "_stall",
        "_state",
        "_synthetic",
        "_te",
        "_trailers",
        "_until_close",
        "_url",
        "eof",
        "error",
        "events",
        "extra",
        "upgraded",
    )

    def __init__(self, *, response: bool, head_request: bool = False) -> None:
        self._response = response
        self._head_request = head_request
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )
        self.events: deque[Event] = deque()
        self._state = _IDLE
        self._headers: Headers = []
        self._trailers: Headers = []
        self._url = b""
        self._reason = b""
        self._cl: bytes | None = None
        self._te: bytes | None = None
        self._stall = 0  # bytes fed in a head, chunk line or trailers without the parser moving on
        self._progress = False
        self._until_close = False
        self._informational = False
        self._body_upgrade = False  # request: an upgrade llhttp took the body of (resume_body)
        self._final = False  # response: the final (non-1xx) response has ended
        self._synthetic = False  # swallowing the head ``_resume_body`` fed
        self.eof = False
        self.error: ProtocolError | None = None
        self.upgraded: bytes | None = None  # what followed an upgrade's head, until claimed
        self.extra = False  # response: bytes after the response ended (the connection is spent)

    # -- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._final:
            self.extra = True
        self._state = _HEAD
        self._headers = []
        self._url = b""
        self._reason = b""
        self._cl = self._te = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")
        if self._state == _BODY:
            self._trailers.append((name, value))
            return
        if name == b"content-length":
            self._cl = value
        elif name == b"transfer-encoding":
            self._te = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._state = _BODY
        self._stall = 0
        self._trailers = []
        if self._synthetic:
            self._synthetic = False
            return
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Refused(f"HTTP/{parser.get_http_version()} is not supported", 505)
        te = self._te
        if te is not None and te.lower() != b"chunked":
            raise _Refused(f"transfer coding {te.decode('latin-1')!r} is not supported", 501)
        keep_alive = parser.should_keep_alive()
        if self._response:
            status = parser.get_status_code()  # type: ignore[union-attr]
            self._informational = status < 200
            if self._reason and _CTL.search(self._reason):
                self._reason = b""  # never relayed: a reason phrase is only decoration
            if status < 200 or status in _NO_BODY_STATUS or self._head_request:
                framing = NO_BODY
            elif te is not None:
                framing = CHUNKED
            elif self._cl is not None:
                framing = LENGTH
            else:
                framing = UNTIL_CLOSE
                keep_alive = False
            self._until_close = framing == UNTIL_CLOSE
            self.events.append(
                Response(
                    status,
                    self._headers,
                    self._reason,
                    version,
                    keep_alive=keep_alive,
                    framing=framing,
                )
            )
            if self._head_request and status >= 200:
                # llhttp would wait for a body that never comes: the message ends here.
                self.events.append(EndOfMessage())
                self._final = True
            return
        if te is not None:
            framing = CHUNKED
        elif self._cl is not None and self._cl != b"0":
            framing = LENGTH
        else:
            framing = NO_BODY
        method = parser.get_method()  # type: ignore[union-attr]
        upgrade = parser.should_upgrade()
        self._body_upgrade = upgrade and framing != NO_BODY and method != b"CONNECT"
        self.events.append(
            Request(
                method,
                self._url,
                self._headers,
                version,
                keep_alive=keep_alive,
                framing=framing,
                upgrade=upgrade,
            )
        )

    def on_body(self, body: bytes) -> None:
        self._progress = True
        if self._final:
            self.extra = True  # a body after a HEAD response's head
            return
        self.events.append(Data(body))

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_chunk_complete(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        self._state = _IDLE
        self._stall = 0
        if self._body_upgrade:
            self._body_upgrade = False
            return  # llhttp skipped the body as upgrade bytes; it is parsed after resume_body
        if self._final:
            return  # a HEAD response, ended at its head
        if self._response:
            if self._informational:
                return  # a 1xx is a head alone; the final response follows
            self._final = True
        self.events.append(EndOfMessage(self._trailers))

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> None:
        if self.error is not None or self.upgraded is not None:
            return
        if not data:
            self.eof = True
            if self._state == _BODY and self._until_close:
                self._state = _IDLE
                self._final = True
                self.events.append(EndOfMessage())
            return
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = bytes(data[e.args[0] :])
            self._state = _IDLE
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Refused):
                self.error = ProtocolError(str(cause), cause.status)
            else:  # a bug here, not the peer's fault: still never a crash of the connection
                self.error = ProtocolError(f"parser callback failed: {cause!r}", 400)
            return
        except httptools.HttpParserError as e:
            self.error = ProtocolError(str(e) or type(e).__name__, 400)
            return
        state = self._state
        if state == _HEAD or (state == _BODY and not self._progress):
            self._stall += len(data)
            if self._stall > MAX_HEAD_BYTES:
                if state == _HEAD:
                    self.error = ProtocolError(f"head is over the {MAX_HEAD_BYTES}-byte limit", 431)
                else:
                    self.error = ProtocolError(
                        f"chunk line or trailers over the {MAX_HEAD_BYTES}-byte limit", 400
                    )
        elif state == _BODY:
            self._stall = 0

    def resume_body(self, framing: int, length: bytes | None) -> None:
        """After an ``Connection: upgrade`` request that is not upgraded: llhttp took its body
        for the new protocol's bytes.  Parse on, from that body, with a fresh parser that is
        first fed the framing the real head already declared (and passed)."""
        rest = self.upgraded or b""
        self.upgraded = None
        self._parser = httptools.HttpRequestParser(self)
        self._synthetic = True
        if framing == CHUNKED:
            prefix = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        else:
            prefix = b"PUT / HTTP/1.1\r\ncontent-length: " + (length or b"0") + b"\r\n\r\n"
        self.feed(prefix)
        if rest:
            self.feed(rest)

    def next_event(self) -> Event | _Sentinel:
        if self.events:
            return self.events.popleft()
        if self.error is not None:
            raise self.error
        if self.eof:
            if self._state == _IDLE:
                return CLOSED
            raise ProtocolError("peer closed the connection in the middle of a message")
        return NEED_DATA


class _Refused(Exception):
    """Raised in a callback to stop llhttp on a head this module refuses."""

    def __init__(self, msg: str, status: int) -> None:
        super().__init__(msg)
        self.status = status


def _head_lines(first: bytes, headers: Headers) -> list[bytes]:
    out = [first]
    for name, value in headers:
        out.append(name + b": " + value + b"\r\n")
    out.append(b"\r\n")
    return out


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head as bytes (``headers`` written as they are)."""
    return b"".join(_head_lines(method + b" " + target + b" HTTP/1.1\r\n", headers))


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def _last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"".join(_head_lines(b"0\r\n", trailers))


class ServerConn:
    """The server side of a client's connection: its requests in, our responses out.

    ``request``: the head being answered; ``request_done``: its body has been read;
    ``response_started`` / ``response_done``: what we wrote; ``must_close``: the connection
    ends after this response (the client asked, HTTP/1.0, or an error)."""

    __slots__ = (
        "_chunked",
        "_r",
        "must_close",
        "request",
        "request_done",
        "response_done",
        "response_started",
    )

    def __init__(self) -> None:
        self._r = _Reader(response=False)
        self.request: Request | None = None
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.must_close = False
        self._chunked = False

    def __repr__(self) -> str:
        return (
            f"<ServerConn {self.request!r} request_done={self.request_done} "
            f"response_started={self.response_started} response_done={self.response_done}>"
        )

    def receive_data(self, data: bytes | bytearray) -> None:
        self._r.feed(data)

    def next_event(self) -> Event | _Sentinel:
        ev = self._r.next_event()
        t = type(ev)
        if t is Request:
            self.request = ev  # type: ignore[assignment]
            if not ev.keep_alive:  # type: ignore[union-attr]
                self.must_close = True
            events = self._r.events
            if events and type(events[0]) is EndOfMessage:
                events.popleft()  # a body-less request: llhttp ended it with its head
                self.request_done = True
        elif t is EndOfMessage:
            self.request_done = True
        return ev

    @property
    def trailing_data(self) -> bytes:
        """The bytes that followed an upgrade or CONNECT request's head."""
        return self._r.upgraded or b""

    def not_upgraded(self) -> None:
        """The upgrade request is served as a plain request: parse on after it."""
        req = self.request
        r = self._r
        if r.upgraded is None or req is None:
            return
        if req.framing != NO_BODY:
            length = next((v for n, v in req.headers if n == b"content-length"), None)
            r.resume_body(req.framing, length)
        else:
            rest, r.upgraded = r.upgraded, None
            if rest:
                r.feed(rest)

    @property
    def head_only(self) -> bool:
        return self.request is not None and self.request.method == b"HEAD"

    def send_response(self, resp: Response, headers: Headers) -> bytes:
        """The head of ``resp`` (a final or 1xx response read from an upstream), with
        ``headers`` in place of its own, framed for this client."""
        status = resp.status_code
        req = self.request
        old_client = req is not None and req.http_version == b"1.0"
        if status < 200:
            if old_client:
                return b""  # RFC 9110 §15.2: never a 1xx to an HTTP/1.0 client
            return b"".join(_head_lines(b"HTTP/1.1 %d %b\r\n" % (status, resp.reason), headers))
        self.response_started = True
        self._chunked = False
        framing = resp.framing
        if framing != NO_BODY and not self.head_only:
            if framing == CHUNKED:
                if old_client:
                    headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
                    self.must_close = True
                else:
                    self._chunked = True
            elif framing == UNTIL_CLOSE:
                if old_client:
                    self.must_close = True
                else:
                    headers = [*headers, (b"transfer-encoding", b"chunked")]
                    self._chunked = True
        if self.must_close:
            headers = [*headers, (b"connection", b"close")]
        return b"".join(_head_lines(b"HTTP/1.1 %d %b\r\n" % (status, resp.reason), headers))

    def send_data(self, data: bytes) -> bytes:
        if self.head_only:
            return b""
        return _chunk(data) if self._chunked else data

    def send_end(self, trailers: Headers | None = None) -> bytes:
        self.response_done = True
        if self._chunked:
            return _last_chunk(trailers or [])
        return b""

    def send_error(self, status: int, headers: Headers, body: bytes) -> bytes | None:
        """A whole response of our own, or None if a response has already started."""
        if self.response_started:
            return None
        self.response_started = self.response_done = True
        if not self.request_done:
            self.must_close = True
        if self.must_close:
            headers = [*headers, (b"connection", b"close")]
        reason = _REASONS.get(status, b"")
        head = b"".join(_head_lines(b"HTTP/1.1 %d %b\r\n" % (status, reason), headers))
        return head if self.head_only else head + body

    @property
    def reusable(self) -> bool:
        return self.request_done and self.response_done and not self.must_close

    def start_next_cycle(self) -> None:
        self.request = None
        self.request_done = self.response_started = self.response_done = False
        self._chunked = False


class ClientConn:
    """The client side of an upstream connection: our requests out, their responses in."""

    __slots__ = ("_chunked", "_r", "request_done", "response", "response_done", "spent")

    def __init__(self) -> None:
        self._r = _Reader(response=True)
        self.response: Response | None = None
        self.request_done = False
        self.response_done = False
        self.spent = False  # never reusable (an error, or the peer said close)
        self._chunked = False

    def __repr__(self) -> str:
        return (
            f"<ClientConn request_done={self.request_done} response_done={self.response_done}"
            f"{' spent' if self.spent else ''}>"
        )

    def send_request(self, method: bytes, target: bytes, headers: Headers, framing: int) -> bytes:
        """A request head (``headers`` carry the framing the body will have)."""
        self._r = _Reader(response=True, head_request=method == b"HEAD")
        self._chunked = framing == CHUNKED
        self.request_done = False
        self.response = None
        self.response_done = False
        return request_head(method, target, headers)

    def send_data(self, data: bytes) -> bytes:
        return _chunk(data) if self._chunked else data

    def send_end(self, trailers: Headers | None = None) -> bytes:
        self.request_done = True
        if self._chunked:
            return _last_chunk(trailers or [])
        return b""

    def receive_data(self, data: bytes | bytearray) -> None:
        self._r.feed(data)

    def next_event(self) -> Event | _Sentinel:
        r = self._r
        ev = r.next_event()
        t = type(ev)
        if t is Response:
            if ev.status_code >= 200:  # type: ignore[union-attr]
                self.response = ev  # type: ignore[assignment]
                if not ev.keep_alive:  # type: ignore[union-attr]
                    self.spent = True
        elif t is EndOfMessage:
            if self.response is not None:
                self.response_done = True
        elif ev is CLOSED:
            self.spent = True
        return ev

    @property
    def reusable(self) -> bool:
        r = self._r
        return (
            self.request_done
            and self.response_done
            and not self.spent
            and not r.extra
            and not r.eof
            and r.upgraded is None
            and r.error is None
        )

    def mark_spent(self) -> None:
        self.spent = True


_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
