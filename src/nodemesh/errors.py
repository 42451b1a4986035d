"""nodemesh's own error types.

Everything above the transport speaks in these; trio, ssl and codec exceptions are translated
at the boundary (``transport/``).  Each proxy error carries the HTTP status the client sees and
the short reason sent in the ``x-nodemesh-error`` header, so one rescue per server can answer.
"""

from __future__ import annotations


class NodemeshError(Exception):
    """Base of every nodemesh error."""


class ConfigError(NodemeshError):
    """A config file is unreadable or holds a bad value.  The CLI exits 64 (EX_USAGE)."""

    exit_code = 64


class ProxyError(NodemeshError):
    """A request could not be proxied; ``status`` is what the client gets."""

    status = 502
    reason = "proxy error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class BadRequest(ProxyError):
    status = 400
    reason = "bad request"


class HeadTooLarge(BadRequest):
    status = 431
    reason = "request head too large"


class MethodNotAllowed(BadRequest):
    status = 405
    reason = "method not allowed"


class NotImplementedHere(BadRequest):
    """A framing the proxy does not implement (a transfer coding other than chunked)."""

    status = 501
    reason = "not implemented"


def malformed_request(detail: str, status_hint: int) -> BadRequest:
    """The error for a request the parser refused, by its status hint."""
    kind = {431: HeadTooLarge, 501: NotImplementedHere}.get(status_hint, BadRequest)
    return kind(detail)


class Forbidden(ProxyError):
    status = 403
    reason = "forbidden"


class NoEndpoints(ProxyError):
    status = 503
    reason = "no healthy endpoints"


class UpstreamConnectError(ProxyError):
    status = 502
    reason = "upstream connect failed"


class UpstreamProtocolError(ProxyError):
    status = 502
    reason = "upstream protocol error"


class UpstreamClosed(ProxyError):
    """The upstream closed the connection before a full response arrived."""

    status = 502
    reason = "upstream closed connection"


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream timeout"


class DownstreamClosed(NodemeshError):
    """The client went away; nothing can be answered.  Logged at debug level."""


class IdentityError(NodemeshError):
    """A certificate could not be obtained, parsed or verified."""
