"""stdlib ``ssl`` contexts for mesh mTLS.

Verification is against the mesh roots only (never the system store).  Clients do not check
host names: a mesh peer is named by the SPIFFE URI SAN of its certificate, which the caller
compares with the identity it expected after the handshake (``peer_identity``).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, Protocol

from nodemesh.errors import IdentityError
from nodemesh.identity import files, spiffe
from nodemesh.identity.spiffe import SpiffeId

DEFAULT_ALPN = ("http/1.1",)


def _base(purpose: ssl._SSLMethod, roots_pem: bytes, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # A peer's connection that ends without close_notify is cut, not finished: some Python
    # builds (Debian's 3.11.2) set this option by default, and a truncated request or response
    # would then read as a clean end.
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    try:
        ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as e:
        raise IdentityError(f"trust bundle is not valid PEM certificates: {e}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def load_key_pair(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Give ``ctx`` a certificate chain and its key.

    ``load_cert_chain`` only reads files, so the pair goes through a private scratch file that
    is deleted as soon as OpenSSL has read it.
    """
    with files.scratch_file(key_pem.rstrip(b"\n") + b"\n" + chain_pem) as path:
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as e:
            raise IdentityError(
                f"certificate and key do not load together ({e.reason or e}); "
                "the key must be the one the certificate was issued for"
            ) from None


def server_context(
    chain_pem: bytes,
    key_pem: bytes,
    roots_pem: bytes,
    *,
    require_client_cert: bool = True,
    alpn: Sequence[str] = DEFAULT_ALPN,
) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, roots_pem, alpn)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    load_key_pair(ctx, chain_pem, key_pem)
    return ctx


def client_context(
    chain_pem: bytes | None,
    key_pem: bytes | None,
    roots_pem: bytes,
    alpn: Sequence[str] = DEFAULT_ALPN,
) -> ssl.SSLContext:
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, roots_pem, alpn)
    ctx.check_hostname = False  # the SPIFFE ID is checked after the handshake instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    if chain_pem is not None and key_pem is not None:
        load_key_pair(ctx, chain_pem, key_pem)
    return ctx


def dispatch_context(
    roots_pem: bytes, *, require_client_cert: bool = True, alpn: Sequence[str] = DEFAULT_ALPN
) -> ssl.SSLContext:
    """A server context without a certificate, for listeners whose ``sni_callback`` always
    switches to a per-identity context.

    OpenSSL keeps the *first* context's verify mode after the switch (it takes the cert, the
    trust store and ALPN from the new one), so this one must demand client certs itself.
    """
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, roots_pem, alpn)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class HasPeerCert(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` or ``trio.SSLStream``."""

    def getpeercert(self, binary_form: bool = False) -> Any: ...


def peer_identity(ssl_object: HasPeerCert) -> SpiffeId | None:
    """The verified peer's SPIFFE ID, from its URI SAN only (never the CN).

    None if the peer sent no certificate, or its certificate names no nodemesh identity or
    more than one.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    sans = cert.get("subjectAltName", ())
    uris = [entry[1] for entry in sans if isinstance(entry, tuple) and entry[0] == "URI"]
    if len(uris) != 1:
        return None
    return spiffe.parse(str(uris[0]))
