"""The agent's client for the controller API: HTTPS with h11 over trio.SSLStream.

One request per connection for certificates: the agent asks for a few a day, so keep-alive
would only add a stale-connection failure mode.  Metrics reports go every interval, though,
and a full TLS handshake for each was a sixth of a 1,000-agent controller's CPU
(docs/benchmarks.md), so ``report_metrics`` keeps its connection open for the next one, for
at most ``KEEP_IDLE_S`` (the controller closes idle connections after 30 s).  A kept
connection that fails before its answer began (the controller restarted, or closed it idle)
is replaced by a fresh one at once: a report is safe to send twice, the controller
de-duplicates by (agent, seq).  Only clients made with ``keep_reports`` keep one (the agent's;
its reporter closes it when it stops).  The controller's certificate must chain to the CA
file the operator installed and carry the DNS name ``nodemesh-controller``, whatever address
it was reached at (an address from Consul may be a NAT-ed one).  It must also name exactly
the controller's SPIFFE ID, ``spiffe://<td>/dc/<dc>/svc/nodemesh-controller`` (of this node's
own trust domain and datacenter once it has a certificate), and, once this node holds a
certificate, be issued by the same CA as that certificate (``check_controller``): the CA file
may hold an operator's root above the mesh's intermediate, and a root vouches for much else.
Timeouts belong to the caller (``with trio.fail_after(...)``).
"""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509

from nodemesh.config import read_secret
from nodemesh.errors import ConfigError, IdentityError
from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.spiffe import SpiffeId

CONTROLLER_NAME = "nodemesh-controller"  # DNS SAN of the controller's cert and its Consul name
MAX_RESPONSE = 256 * 1024  # a chain plus roots is a few KiB; anything bigger is not ours
MAX_METRICS_RESPONSE = 16 * 1024 * 1024  # a query over every edge of a big fleet
KEEP_IDLE_S = 20.0  # seconds a report's connection is kept for the next; the controller's is 30


class ControllerUnavailable(IdentityError):
    """The controller could not be reached or did not speak its API; retry later."""


class ControllerRefused(IdentityError):
    """The controller answered with an error; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"controller refused ({status}): {message}")
        self.status = status
        self.message = message


class _Stale(Exception):
    """A kept connection failed before any of its answer arrived."""


@dataclass(eq=False)
class _Kept:
    """An open connection whose last exchange ended cleanly, ready for the next."""

    target: tuple[str, int]
    pair: tuple[bytes, bytes]
    stream: trio.SSLStream[trio.SocketStream]
    conn: h11.Connection
    idle_since: float


@dataclass(frozen=True)
class Signed:
    certificate: bytes  # leaf then intermediates, PEM
    roots: bytes
    not_after: float


class ControllerClient:
    def __init__(
        self,
        address: Callable[[], str],
        ca_pem: bytes,
        join_token: str,
        *,
        keep_reports: bool = False,
    ) -> None:
        """``keep_reports``: keep a report's connection for the next (the agent's reporter,
        which closes it with ``aclose`` when it stops); off, every call is one connection."""
        self._address = address
        self._keep_reports = keep_reports
        self._join_token = join_token
        self._ca_pem = ca_pem
        self._plain = self._context(None)  # checks the CA file's PEM early, at construction
        self._kept: _Kept | None = None  # the last report's connection (see the module doc)
        self._pair_ctx: tuple[tuple[bytes, bytes], ssl.SSLContext, Expect] | None = None

    @classmethod
    def from_files(
        cls,
        address: Callable[[], str],
        ca_file: Path,
        join_token_file: Path,
        *,
        keep_reports: bool = False,
    ) -> ControllerClient:
        try:
            ca_pem = ca_file.read_bytes()
        except OSError as e:
            raise ConfigError(
                f"{ca_file}: cannot read the controller CA ({e.strerror}); copy the "
                "controller's ca.pem there (nodemesh ca show prints where it is)"
            ) from None
        try:
            token = read_secret(join_token_file, "join token")
            return cls(address, ca_pem, token, keep_reports=keep_reports)
        except IdentityError as e:
            raise ConfigError(f"{ca_file}: {e}") from None

    def __repr__(self) -> str:
        return f"<ControllerClient address={self._address()!r}>"

    # --- API -----------------------------------------------------------------------------------

    async def health(self) -> None:
        await self._call("GET", "/v1/health", None)

    async def roots(self) -> bytes:
        status, body = await self._exchange("GET", "/v1/ca/roots", b"", [], None)
        if status != 200:
            raise ControllerRefused(status, _error_text(body))
        return body

    async def sign_node(self, csr_pem: bytes) -> Signed:
        auth = [("authorization", f"Bearer {self._join_token}")]
        doc = await self._call("POST", "/v1/sign/node", {"csr": csr_pem.decode()}, auth)
        return _signed(doc)

    async def sign_service(
        self, csr_pem: bytes, service: str, node_chain_pem: bytes, node_key_pem: bytes
    ) -> Signed:
        body = {"csr": csr_pem.decode(), "service": service}
        doc = await self._call(
            "POST", "/v1/sign/service", body, [], client_pair=(node_chain_pem, node_key_pem)
        )
        return _signed(doc)

    async def report_metrics(
        self, report: dict[str, Any], node_chain_pem: bytes, node_key_pem: bytes
    ) -> bool:
        """Deliver one interval report (docs/observability.md); True if the controller had
        it already (a retry of a report whose answer was lost)."""
        doc = await self._call(
            "POST",
            "/v1/metrics/report",
            report,
            [],
            client_pair=(node_chain_pem, node_key_pem),
            keep=self._keep_reports,
        )
        return doc.get("duplicate") is True

    async def aclose(self) -> None:
        """Close the kept connection, if any."""
        kept, self._kept = self._kept, None
        if kept is not None:
            await trio.aclose_forcefully(kept.stream)

    async def metrics(
        self,
        window: str,
        by: str,
        chain_pem: bytes,
        key_pem: bytes,
        direction: str = "inbound",
    ) -> dict[str, Any]:
        """The controller's merged rows for ``window`` (like "1m") grouped ``by``."""
        query = urllib.parse.urlencode({"window": window, "by": by, "direction": direction})
        return await self._call(
            "GET",
            f"/v1/metrics?{query}",
            None,
            [],
            client_pair=(chain_pem, key_pem),
            limit=MAX_METRICS_RESPONSE,
        )

    # --- plumbing ------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        doc: dict[str, Any] | None,
        headers: list[tuple[str, str]] | None = None,
        *,
        client_pair: tuple[bytes, bytes] | None = None,
        limit: int = MAX_RESPONSE,
        keep: bool = False,
    ) -> dict[str, Any]:
        body = json.dumps(doc).encode() if doc is not None else b""
        if keep and client_pair is not None:
            status, raw = await self._exchange_kept(method, path, body, headers or [], client_pair)
        else:
            status, raw = await self._exchange(
                method, path, body, headers or [], client_pair, limit
            )
        if status != 200:
            raise ControllerRefused(status, _error_text(raw))
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            raise ControllerUnavailable(f"controller answered {path} with invalid JSON") from None
        if not isinstance(parsed, dict):
            raise ControllerUnavailable(f"controller answered {path} with a non-object")
        return parsed

    def _context(self, pair: tuple[bytes, bytes] | None) -> ssl.SSLContext:
        chain, key = pair if pair is not None else (None, None)
        ctx = tls.client_context(chain, key, self._ca_pem, alpn=("http/1.1",))
        ctx.check_hostname = True  # the controller is named by DNS SAN, unlike mesh peers
        return ctx

    def _target(self) -> tuple[str, int]:
        addr = self._address()
        host, sep, port = addr.rpartition(":")
        if not addr or not sep or not port.isdigit():
            raise ControllerUnavailable(
                f"no usable controller address ({addr!r}); set controller.address = "
                f'"host:port" or register {CONTROLLER_NAME} in Consul'
            )
        return host.strip("[]"), int(port)

    async def _exchange(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        pair: tuple[bytes, bytes] | None,
        limit: int = MAX_RESPONSE,
    ) -> tuple[int, bytes]:
        target = self._target()
        where = f"{target[0]}:{target[1]}"
        ctx, expect = (self._plain, NO_PIN) if pair is None else self._pair_context(pair)
        stream = await _connect(target, ctx, where, expect)
        try:
            with _failures(where):
                return await _roundtrip(stream, method, path, body, headers, limit)
        finally:
            await trio.aclose_forcefully(stream)

    async def _exchange_kept(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        pair: tuple[bytes, bytes],
    ) -> tuple[int, bytes]:
        """``_exchange`` on the kept connection if it still fits, else on a new one kept
        after; a kept one that went stale is replaced once (see the module doc)."""
        target = self._target()
        where = f"{target[0]}:{target[1]}"
        kept, self._kept = self._kept, None  # in use: a concurrent call opens its own
        if kept is not None and (
            kept.target != target
            or kept.pair != pair
            or trio.current_time() - kept.idle_since > KEEP_IDLE_S
        ):
            await trio.aclose_forcefully(kept.stream)
            kept = None
        if kept is not None:
            try:
                return await self._use(kept, method, path, body, headers, where, reused=True)
            except _Stale:
                pass  # closed by the controller meanwhile: a fresh connection below
        ctx, expect = self._pair_context(pair)
        stream = await _connect(target, ctx, where, expect)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE)
        fresh = _Kept(target, pair, stream, conn, 0.0)
        return await self._use(fresh, method, path, body, headers, where, reused=False)

    async def _use(
        self,
        kept: _Kept,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
        where: str,
        *,
        reused: bool,
    ) -> tuple[int, bytes]:
        """One exchange on ``kept``; it is kept again only if the exchange ended cleanly."""
        done = False
        try:
            with _failures(where):
                got = await _roundtrip(
                    kept.stream, method, path, body, headers, MAX_RESPONSE, kept.conn, reused
                )
            if kept.conn.our_state is h11.DONE and kept.conn.their_state is h11.DONE:
                kept.conn.start_next_cycle()
                kept.idle_since = trio.current_time()
                done = True
            return got
        finally:
            if done and self._kept is None:
                self._kept = kept
            else:
                await trio.aclose_forcefully(kept.stream)

    def _pair_context(self, pair: tuple[bytes, bytes]) -> tuple[ssl.SSLContext, Expect]:
        """The TLS context for ``pair`` and what the controller must then be, built once per
        certificate (a renewal makes anew)."""
        if self._pair_ctx is None or self._pair_ctx[0] != pair:
            self._pair_ctx = (pair, self._context(pair), Expect.from_chain(pair[0]))
        return self._pair_ctx[1], self._pair_ctx[2]


@dataclass(frozen=True)
class Expect:
    """What the controller's certificate must hold beyond a chain to the CA file."""

    identity: SpiffeId | None  # its exact SPIFFE ID; None: any trust domain's controller ID
    issuer: bytes | None  # the key identifier of the CA that issued it; None: any in the file

    @classmethod
    def from_chain(cls, chain: bytes) -> Expect:
        """From this node's own certificate: same trust domain, datacenter and issuing CA."""
        own = keys.leaf_info(chain).identity
        ident = None
        if own is not None:
            ident = spiffe.service_id(own.trust_domain, own.datacenter, CONTROLLER_NAME)
        return cls(ident, _issuer_key_id(keys.load_certificates(chain)[0]))


NO_PIN = Expect(None, None)  # before this node holds a certificate (asking for its first)


def _issuer_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def check_controller(der: bytes | None, expect: Expect) -> str | None:
    """Why the certificate ``der`` (DER, its chain already verified) is not the controller's,
    or None when it is (pure)."""
    if not der:
        return "presented no certificate"
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    ident = spiffe.parse(uris[0]) if len(uris) == 1 else None
    want = expect.identity or f"spiffe://<trust domain>/dc/<dc>/svc/{CONTROLLER_NAME}"
    if ident is None or (ident.kind, ident.name) != ("svc", CONTROLLER_NAME):
        return f"presented {', '.join(uris) or 'no SPIFFE ID'}, not the controller's {want}"
    if expect.identity is not None and ident != expect.identity:
        return f"presented {ident}, not the controller's {want}"
    if expect.issuer is not None and _issuer_key_id(cert) != expect.issuer:
        return (
            f"presented {ident} from a CA other than the one that issued this node's "
            "certificate; check that it is this mesh's controller"
        )
    return None


async def _connect(
    target: tuple[str, int], ctx: ssl.SSLContext, where: str, expect: Expect
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream to the controller, handshaken and checked (``check_controller``)."""
    try:
        tcp = await trio.open_tcp_stream(*target)
    except OSError as e:
        raise ControllerUnavailable(
            f"controller at {where} unreachable: {e.strerror or e}"
        ) from None
    stream = trio.SSLStream(tcp, ctx, server_hostname=CONTROLLER_NAME, https_compatible=True)
    try:
        with _failures(where):
            await stream.do_handshake()
        why = check_controller(stream.getpeercert(binary_form=True), expect)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    if why is not None:
        await trio.aclose_forcefully(stream)
        raise ControllerUnavailable(f"controller at {where} {why}")
    return stream


@contextlib.contextmanager
def _failures(where: str) -> Iterator[None]:
    """Transport and HTTP failures of an exchange as ``ControllerUnavailable``."""
    try:
        yield
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        cause = e.__cause__ or e
        raise ControllerUnavailable(f"controller at {where} failed: {cause}") from None
    except h11.ProtocolError as e:
        raise ControllerUnavailable(f"controller at {where} spoke bad HTTP: {e}") from None


async def _roundtrip(
    stream: trio.SSLStream[trio.SocketStream],
    method: str,
    path: str,
    body: bytes,
    headers: list[tuple[str, str]],
    limit: int = MAX_RESPONSE,
    conn: h11.Connection | None = None,
    reused: bool = False,
) -> tuple[int, bytes]:
    """One exchange.  Without ``conn`` a one-shot connection (``connection: close``); with
    it, kept alive.  ``reused``: a failure before the answer began raises ``_Stale``."""
    keep = conn is not None
    if conn is None:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE)
    req = h11.Request(
        method=method,
        target=path,
        headers=[
            ("host", CONTROLLER_NAME),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            *([] if keep else [("connection", "close")]),
            *headers,
        ],
    )
    out = conn.send(req) or b""
    if body:
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    status = 0
    try:
        await stream.send_all(out)
        event = conn.next_event()
        while event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(65536))
            conn.receive_data(data)
            event = conn.next_event()
        if isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before the response began")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, h11.ProtocolError):
        if reused:
            raise _Stale() from None
        raise
    chunks: list[bytes] = []
    size = 0
    while True:
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise h11.RemoteProtocolError(f"response body over {limit} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before the response ended")
        event = conn.next_event()


def _error_text(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return body[:200].decode("utf-8", "replace") or "no detail"


def _signed(doc: dict[str, Any]) -> Signed:
    cert, roots, not_after = doc.get("certificate"), doc.get("roots"), doc.get("not_after")
    if not isinstance(cert, str) or not isinstance(roots, str):
        raise ControllerUnavailable("controller's answer lacks certificate or roots")
    if not isinstance(not_after, int | float):
        raise ControllerUnavailable("controller's answer lacks not_after")
    return Signed(cert.encode(), roots.encode(), float(not_after))
