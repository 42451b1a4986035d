"""Protocol detection from the first bytes a client sends: pure, no I/O.

``detect(prefix)`` returns HTTP1, HTTP2, OPAQUE, or NEED_MORE.  The caller reads until it gets
an answer, or until the detection timeout (a server-speaks-first protocol sends nothing:
opaque), or until ``MAX_PEEK`` bytes.

HTTP/1 is recognised by its request line: a method token of capital letters, one space, then a
request target (``/``, ``*``, or an absolute URI / authority).  HTTP/2 with prior knowledge
(h2c, gRPC) is recognised by the start of its connection preface; h2 checks the rest.  A TLS
ClientHello is opaque: the app's own TLS rides the mTLS tunnel byte for byte.
"""

from __future__ import annotations

import enum
import re


class Protocol(enum.Enum):
    HTTP1 = "http/1"
    HTTP2 = "h2"
    OPAQUE = "opaque"
    NEED_MORE = "need-more"


MAX_PEEK = 64  # a method is at most ~20 bytes; decide well before an app would wait on us
_H2_PREFACE = b"PRI * HTTP/2.0"
_METHOD = re.compile(rb"^[A-Z][A-Z-]{1,19} ")
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-")


def detect(prefix: bytes) -> Protocol:
    if not prefix:
        return Protocol.NEED_MORE
    if _H2_PREFACE.startswith(prefix[: len(_H2_PREFACE)]):
        return Protocol.NEED_MORE if len(prefix) < len(_H2_PREFACE) else Protocol.HTTP2
    m = _METHOD.match(prefix)
    if m is None:
        # Still inside what could be a method token?  Wait for the space.
        if len(prefix) < 21 and all(b in _TOKEN_CHARS for b in prefix):
            return Protocol.NEED_MORE
        return Protocol.OPAQUE
    rest = prefix[m.end() :]
    if not rest:
        return Protocol.NEED_MORE
    first = rest[:1]
    if first in (b"/", b"*", b"[") or first.isalnum():  # "[": CONNECT to an IPv6 literal
        return Protocol.HTTP1
    return Protocol.OPAQUE
