"""The agent's certificates: one for the node, one per local service, and the trust roots.

Theory of operation
-------------------
Every held identity owns a ready-made pair of ``ssl.SSLContext``s (server and client), built
once when its certificate arrives.  Rotation builds the new pair first and then replaces one
dict entry, which in trio's single thread is atomic: a handshake either sees the old pair or
the new one.  A TLS connection keeps the context it was handshaken with, so open connections
are untouched by rotation.

The inbound listener gets ONE context (``server_context``) that carries no certificate of its
own: its ``sni_callback`` looks up the identity named by SNI (``<svc>.svc.<dc>.<td>``) in the
current table and switches the handshake to that identity's server context; no SNI means the
node identity.  An unknown name fails the handshake with an ``unrecognized_name`` alert.  The
callback never raises: an exception there would escape into OpenSSL's callback machinery.

Certificates and keys are persisted 0600 under ``<state_dir>/identity/`` so a restarted agent
serves at once, even while the controller is down.  Renewal lives in ``rotation.py``.
"""

from __future__ import annotations

import random
import re
import ssl
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from nodemesh import log
from nodemesh.errors import IdentityError
from nodemesh.identity import files, keys, spiffe, tls
from nodemesh.identity.client import ControllerClient
from nodemesh.identity.keys import LeafInfo
from nodemesh.identity.spiffe import SpiffeId

_log = log.get("nodemesh.identity")
DEFAULT_ALPN = ("h2", "http/1.1")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


def select_identity(
    sni: str | None, trust_domain: str, node: SpiffeId, held: Collection[SpiffeId]
) -> SpiffeId | None:
    """Which held identity a handshake with server name ``sni`` is for, or None (refuse).

    Names are compared lower-cased: SNI is case-insensitive and ``spiffe.server_name`` lowers.
    """
    if sni is None:
        return node if node in held else None
    wanted = spiffe.from_server_name(sni.lower(), trust_domain)
    if wanted is None:
        return None
    key = spiffe.server_name(wanted)
    return next((h for h in held if spiffe.server_name(h) == key), None)


@dataclass(frozen=True)
class Held:
    """One identity's current certificate, key and the contexts built from them."""

    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    info: LeafInfo
    server: ssl.SSLContext
    client: ssl.SSLContext  # offers every ALPN protocol the store serves
    client_http1: ssl.SSLContext  # offers only http/1.1: the pooled HTTP/1.1 connections


class IdentityStore:
    def __init__(
        self,
        trust_domain: str,
        datacenter: str,
        node: str,
        state_dir: Path | None = None,
        *,
        alpn: Sequence[str] = DEFAULT_ALPN,
    ) -> None:
        self.trust_domain = trust_domain
        self.datacenter = datacenter
        self.node_identity = spiffe.node_id(trust_domain, datacenter, node)
        self._dir = state_dir / "identity" if state_dir is not None else None
        self._alpn = tuple(alpn)
        self._roots_pem: bytes | None = None
        self._held: dict[SpiffeId, Held] = {}
        self._dispatch: ssl.SSLContext | None = None
        self._poked = trio.Event()
        if self._dir is not None:
            self._load_persisted(self._dir)

    def __repr__(self) -> str:
        names = ", ".join(sorted(str(i) for i in self._held))
        return f"<IdentityStore node={self.node_identity} ready={self.ready()} held=[{names}]>"

    # --- what listeners and dialers use ---------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """The one context for the inbound listener; it follows rotation by itself."""
        if self._roots_pem is None:
            raise IdentityError("no trust roots yet; wait until the store is ready()")
        if self._dispatch is None:
            ctx = tls.dispatch_context(self._roots_pem, alpn=self._alpn)
            ctx.sni_callback = self._on_sni
            self._dispatch = ctx
        return self._dispatch

    def client_context(self, source: SpiffeId | None, *, http1: bool = False) -> ssl.SSLContext:
        """A client context presenting ``source``'s certificate (the node's if not held);
        ``http1``: one that offers only ``http/1.1`` in ALPN."""
        held = self._held.get(source) if source is not None else None
        held = held or self._held.get(self.node_identity)
        if held is None:
            raise IdentityError(
                f"no certificate for {self.node_identity} yet; the agent is not ready"
            )
        return held.client_http1 if http1 else held.client

    def ready(self) -> bool:
        node = self._held.get(self.node_identity)
        return node is not None and node.info.not_after > time.time()

    def identities(self) -> list[LeafInfo]:
        return [h.info for h in sorted(self._held.values(), key=lambda h: h.identity.uri)]

    def held(self, identity: SpiffeId) -> Held | None:
        return self._held.get(identity)

    @property
    def roots_pem(self) -> bytes | None:
        return self._roots_pem

    # --- what rotation uses ---------------------------------------------------------------------

    def install(
        self, identity: SpiffeId, chain_pem: bytes, key_pem: bytes, roots_pem: bytes
    ) -> Held:
        """Check and adopt a freshly issued certificate; new handshakes use it at once."""
        info = keys.leaf_info(chain_pem)
        if info.identity != identity:
            # Like ztunnel: never serve a certificate that names someone else.
            raise IdentityError(
                f"controller returned a certificate for {info.identity} instead of {identity}"
            )
        if info.not_after <= time.time():
            raise IdentityError(f"controller returned an expired certificate for {identity}")
        if roots_pem != self._roots_pem:
            self._set_roots(roots_pem)
        held = self._build(identity, chain_pem, key_pem, info)
        self._held[identity] = held
        self._persist(held)
        _log.info(
            "identity_installed",
            identity=str(identity),
            serial=format(info.serial, "x"),
            not_after=info.not_after,
        )
        return held

    def forget(self, identity: SpiffeId) -> None:
        """Stop serving a service identity (its service left this node)."""
        if identity == self.node_identity:
            return
        if self._held.pop(identity, None) is not None:
            _log.info("identity_dropped", identity=str(identity))
        if self._dir is not None:
            (self._dir / _file_name(identity)).unlink(missing_ok=True)

    def poke(self) -> None:
        """Ask rotation to re-read the wanted services now (e.g. Consul changed)."""
        self._poked.set()

    async def wait_poked(self) -> None:
        await self._poked.wait()
        self._poked = trio.Event()

    # --- internals -----------------------------------------------------------------------------

    def _on_sni(self, ssl_obj: ssl.SSLObject, sni: str | None, _ctx: ssl.SSLContext) -> int | None:
        try:
            ident = select_identity(sni, self.trust_domain, self.node_identity, self._held)
            held = self._held.get(ident) if ident is not None else None
            if held is None:
                _log.debug("tls_sni_refused", sni=sni)
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            ssl_obj.context = held.server
            return None
        except Exception as e:  # never let an error escape into OpenSSL's callback
            _log.error("tls_sni_failed", sni=sni, error=repr(e))
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    def _build(self, identity: SpiffeId, chain: bytes, key: bytes, info: LeafInfo) -> Held:
        roots = self._roots_pem
        if roots is None:
            raise IdentityError("no trust roots; install a certificate with its roots first")
        server = tls.server_context(chain, key, roots, alpn=self._alpn)
        client = tls.client_context(chain, key, roots, alpn=self._alpn)
        http1 = tls.client_context(chain, key, roots, alpn=("http/1.1",))
        return Held(identity, chain, key, info, server, client, http1)

    def _set_roots(self, roots_pem: bytes) -> None:
        keys.load_certificates(roots_pem)  # refuse garbage before anything depends on it
        self._roots_pem = roots_pem
        # Every context verifies peers against the roots, so all are rebuilt.  After the SNI
        # switch OpenSSL verifies with the per-identity context's store; the listener's
        # dispatch context also learns the new roots (a store only grows: old roots stay
        # trusted until restart, which is what a CA rollover wants).
        self._held = {
            i: self._build(i, h.chain_pem, h.key_pem, h.info) for i, h in self._held.items()
        }
        if self._dispatch is not None:
            self._dispatch.load_verify_locations(cadata=roots_pem.decode("ascii"))
        if self._dir is not None:
            files.ensure_private_dir(self._dir)
            files.write_private(self._dir / "roots.pem", roots_pem)

    def _persist(self, held: Held) -> None:
        if self._dir is None:
            return
        files.ensure_private_dir(self._dir)
        data = held.key_pem.rstrip(b"\n") + b"\n" + held.chain_pem
        files.write_private(self._dir / _file_name(held.identity), data)

    def _load_persisted(self, d: Path) -> None:
        roots_path = d / "roots.pem"
        if not roots_path.exists():
            return
        try:
            self._roots_pem = roots_path.read_bytes()
            keys.load_certificates(self._roots_pem)
        except (OSError, IdentityError) as e:
            _log.warning("identity_roots_unreadable", path=str(roots_path), error=str(e))
            self._roots_pem = None
            return
        for path in sorted(d.glob("*.pem")):
            if path.name == "roots.pem":
                continue
            try:
                self._load_one(path)
            except (OSError, IdentityError) as e:
                _log.warning("identity_file_skipped", path=str(path), error=str(e))

    def _load_one(self, path: Path) -> None:
        data = path.read_bytes()
        blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
        key = b"".join(b for kind, b in blocks if kind.endswith(b"PRIVATE KEY"))
        chain = b"".join(b for kind, b in blocks if kind == b"CERTIFICATE")
        if not key or not chain:
            raise IdentityError(f"{path}: holds no key and certificate pair")
        info = keys.leaf_info(chain)
        ident = info.identity
        if ident is None or path.name != _file_name(ident):
            raise IdentityError(f"{path}: certificate names {ident}, not what the file name says")
        if ident.trust_domain != self.trust_domain or ident.datacenter != self.datacenter:
            raise IdentityError(f"{path}: {ident} is outside this agent's trust domain/datacenter")
        if ident.kind == "node" and ident != self.node_identity:
            raise IdentityError(f"{path}: {ident} belongs to another node")
        if info.not_after <= time.time():
            raise IdentityError(f"{path}: certificate for {ident} has expired")
        self._held[ident] = self._build(ident, chain, key, info)
        _log.info("identity_restored", identity=str(ident), not_after=info.not_after)


def _file_name(identity: SpiffeId) -> str:
    return f"{identity.kind}-{identity.name}.pem"


# --- rotation ------------------------------------------------------------------------------------

RENEW_AT = 0.70  # of a certificate's lifetime; Linkerd's and Consul's default
RENEW_JITTER = 0.05  # renew up to 5 % earlier, so a fleet started together spreads out
BACKOFF_BASE = 1.0  # seconds, first retry after a failed request
BACKOFF_CAP = 60.0  # seconds; a down controller is asked at least once a minute
REQUEST_TIMEOUT = 15.0  # seconds for one signing round trip, connect included
MIN_RENEW_GAP = 1.0  # seconds; even a nearly expired certificate is not re-requested in a loop


def renew_time(info: LeafInfo, jitter: float, issued_at: float | None = None) -> float:
    """Epoch time to renew a certificate; ``jitter`` in [0, 1] moves it up to 5 % earlier.

    The lifetime counts from ``issued_at`` when known: the CA back-dates not_before for clock
    skew, which would otherwise eat most of a very short lifetime.
    """
    start = info.not_before if issued_at is None else max(info.not_before, issued_at)
    return start + (info.not_after - start) * (RENEW_AT - RENEW_JITTER * jitter)


def backoff_delay(failures: int, jitter: float) -> float:
    """Delay before retry number ``failures`` (1-based); ``jitter`` in [0, 1] halves at most."""
    base = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(0, failures - 1))
    return base * (1.0 - 0.5 * jitter)


@dataclass
class _Due:
    at: float  # epoch seconds
    failures: int = 0


async def serve_identities(
    store: IdentityStore,
    controller: ControllerClient,
    wanted: Callable[[], set[str]],
    *,
    reevaluate_every: float = 5.0,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep a valid certificate for the node and for every wanted local service.

    Reports started once the node certificate exists (at once if one was persisted).  Never
    returns; failures are retried with capped exponential backoff while the last good
    certificates keep serving.
    """
    rng = random.Random()
    node = store.node_identity
    due: dict[SpiffeId, _Due] = {}
    for info in store.identities():
        if info.identity is not None:
            due[info.identity] = _Due(renew_time(info, rng.random()))
    names: set[str] = set()
    started = False
    while True:
        names = _wanted_names(wanted, names)
        desired = {node} | {
            spiffe.service_id(store.trust_domain, store.datacenter, n) for n in names
        }
        for ident in [i for i in due if i not in desired]:
            del due[ident]
            store.forget(ident)
        for ident in desired:
            due.setdefault(ident, _Due(0.0))
        # The node certificate first: service requests authenticate with it.
        for ident in sorted(due, key=lambda i: (i != node, i.uri)):
            entry = due[ident]
            if entry.at > time.time() or (ident != node and store.held(node) is None):
                continue
            try:
                with trio.fail_after(request_timeout):
                    held = await _obtain(store, controller, ident)
            except (IdentityError, trio.TooSlowError) as e:
                entry.failures += 1
                delay = backoff_delay(entry.failures, rng.random())
                entry.at = time.time() + delay
                _log.warning(
                    "identity_request_failed",
                    identity=str(ident),
                    error=str(e) or "timed out",
                    failures=entry.failures,
                    retry_in=round(delay, 2),
                )
            else:
                at = renew_time(held.info, rng.random(), issued_at=time.time())
                due[ident] = _Due(max(at, time.time() + MIN_RENEW_GAP))
        if not started and store.held(node) is not None:
            task_status.started()
            started = True
        wake = min(e.at for e in due.values()) if due else time.time() + reevaluate_every
        nap = min(max(0.0, wake - time.time()), reevaluate_every)
        with trio.move_on_after(nap):
            await store.wait_poked()


def _wanted_names(wanted: Callable[[], set[str]], previous: set[str]) -> set[str]:
    try:
        return set(wanted())
    except Exception as e:  # the agent's view of Consul failed: keep what we had
        _log.warning("identity_wanted_failed", error=repr(e))
        return previous


async def _obtain(store: IdentityStore, controller: ControllerClient, ident: SpiffeId) -> Held:
    key = keys.generate_key()  # a fresh key for every certificate
    csr = keys.make_csr(key, ident)
    if ident.kind == "node":
        signed = await controller.sign_node(csr)
    else:
        node = store.held(store.node_identity)
        if node is None:
            raise IdentityError("no node certificate to authenticate a service request with")
        signed = await controller.sign_service(csr, ident.name, node.chain_pem, node.key_pem)
    return store.install(ident, signed.certificate, key, signed.roots)
