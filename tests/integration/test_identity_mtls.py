"""Real mTLS on loopback between two agents' identity stores (certificates from a real CA).

Agent A serves "web" and its node identity on one listener (``store.server_context()``);
agent B dials with its own identities.  With TLS 1.3 a client learns that the server refused
its certificate only on its first read, so refusals are asserted there.
"""

from __future__ import annotations

import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio

from nodemesh.errors import IdentityError
from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.identity.store import IdentityStore

pytestmark = pytest.mark.integration

TD = "mesh.test"
DC = "dc1"
NODE_A = spiffe.node_id(TD, DC, "host-a")
NODE_B = spiffe.node_id(TD, DC, "host-b")
WEB = spiffe.service_id(TD, DC, "web")
SHOP = spiffe.service_id(TD, DC, "shop")


def _issue(
    ca: CertificateAuthority, store: IdentityStore, ident: SpiffeId, ttl: float = 600
) -> None:
    key = keys.generate_key()
    store.install(ident, ca.sign_csr(keys.make_csr(key, ident), ident, ttl), key, ca.roots_pem)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def store_a(ca: CertificateAuthority, tmp_path: Path) -> IdentityStore:
    store = IdentityStore(TD, DC, "host-a", tmp_path / "a")
    _issue(ca, store, NODE_A)
    _issue(ca, store, WEB)
    return store


@pytest.fixture
def store_b(ca: CertificateAuthority) -> IdentityStore:
    store = IdentityStore(TD, DC, "host-b")
    _issue(ca, store, NODE_B)
    _issue(ca, store, SHOP)
    return store


@dataclass
class Server:
    port: int
    failures: list[BaseException] = field(default_factory=list)
    served: int = 0


@pytest.fixture
async def server(store_a: IdentityStore, nursery: trio.Nursery) -> AsyncIterator[Server]:
    """Agent A's inbound listener: says who the peer is, then echoes."""
    ctx = store_a.server_context()
    srv = Server(0)

    async def handler(tcp: trio.SocketStream) -> None:
        s = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await s.do_handshake()
            srv.served += 1
            await s.send_all(f"{tls.peer_identity(s)}\n".encode())
            while data := await s.receive_some(4096):
                await s.send_all(data)
        except trio.BrokenResourceError as e:
            srv.failures.append(e.__cause__ or e)
        finally:
            await trio.aclose_forcefully(s)

    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
    srv.port = listeners[0].socket.getsockname()[1]
    yield srv


@dataclass
class Conn:
    stream: trio.SSLStream[trio.SocketStream]
    server_said: str

    @property
    def served_cert(self) -> keys.LeafInfo:
        der = self.stream.getpeercert(binary_form=True)
        return keys.leaf_info(ssl.DER_cert_to_PEM_cert(der).encode())


async def _dial(port: int, ctx: ssl.SSLContext, sni: str | None) -> Conn:
    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        s = trio.SSLStream(tcp, ctx, server_hostname=sni)
        try:
            await s.do_handshake()
            line = await s.receive_some(4096)
        except BaseException:
            await trio.aclose_forcefully(s)
            raise
        if not line:
            await trio.aclose_forcefully(s)
            raise trio.BrokenResourceError("server closed without a word")
        return Conn(s, line.decode().strip())


async def _works(port: int, store_b: IdentityStore) -> None:
    conn = await _dial(port, store_b.client_context(SHOP), spiffe.server_name(WEB))
    assert conn.server_said == str(SHOP)
    await conn.stream.aclose()


# --- who is who ----------


async def test_sni_selects_the_service_identity_and_both_sides_see_the_other(
    server: Server, store_b: IdentityStore
) -> None:
    conn = await _dial(server.port, store_b.client_context(SHOP), spiffe.server_name(WEB))
    assert conn.server_said == str(SHOP)  # the server saw B's service identity
    assert tls.peer_identity(conn.stream) == WEB  # B saw A's "web" certificate
    assert conn.stream.selected_alpn_protocol() == "h2"
    assert conn.stream.version() == "TLSv1.3"
    await conn.stream.send_all(b"ping")
    assert await conn.stream.receive_some(4096) == b"ping"
    await conn.stream.aclose()


async def test_no_sni_gets_the_node_identity(server: Server, store_b: IdentityStore) -> None:
    conn = await _dial(server.port, store_b.client_context(None), None)
    assert tls.peer_identity(conn.stream) == NODE_A
    assert conn.server_said == str(NODE_B)  # None → the node's certificate is presented
    await conn.stream.aclose()


async def test_node_sni_gets_the_node_identity(server: Server, store_b: IdentityStore) -> None:
    conn = await _dial(server.port, store_b.client_context(SHOP), spiffe.server_name(NODE_A))
    assert tls.peer_identity(conn.stream) == NODE_A
    await conn.stream.aclose()


async def test_a_source_not_held_falls_back_to_the_node(
    server: Server, store_b: IdentityStore
) -> None:
    other = spiffe.service_id(TD, DC, "not-here")
    conn = await _dial(server.port, store_b.client_context(other), spiffe.server_name(WEB))
    assert conn.server_said == str(NODE_B)
    await conn.stream.aclose()


# --- refusals never harm the listener ----------


async def test_unknown_sni_is_refused_and_the_listener_keeps_serving(
    server: Server, store_b: IdentityStore
) -> None:
    for name in ("db.svc.dc1.mesh.test", "web.svc.dc1.other.test", "localhost"):
        with pytest.raises(trio.BrokenResourceError):
            await _dial(server.port, store_b.client_context(SHOP), name)
    await _works(server.port, store_b)
    assert server.served == 1
    assert len(server.failures) == 3


async def test_client_without_a_certificate_is_refused(
    server: Server, store_b: IdentityStore, ca: CertificateAuthority
) -> None:
    anonymous = tls.client_context(None, None, ca.roots_pem)
    with pytest.raises(trio.BrokenResourceError):
        await _dial(server.port, anonymous, spiffe.server_name(WEB))
    assert server.served == 0
    assert "certificate" in str(server.failures[0]).lower()
    await _works(server.port, store_b)


async def test_client_certificate_from_another_ca_is_refused(
    server: Server, store_b: IdentityStore, ca: CertificateAuthority
) -> None:
    rogue_ca = CertificateAuthority.create(TD)  # same trust domain, different key
    key = keys.generate_key()
    chain = rogue_ca.sign_csr(keys.make_csr(key, SHOP), SHOP, 600)
    # The rogue client trusts the real roots (so it completes its side) but its cert is rogue.
    rogue = tls.client_context(chain, key, ca.roots_pem)
    with pytest.raises(trio.BrokenResourceError):
        await _dial(server.port, rogue, spiffe.server_name(WEB))
    assert server.served == 0
    assert "certificate verify failed" in str(server.failures[0])
    await _works(server.port, store_b)


async def test_server_certificate_from_another_ca_is_refused_by_the_client(
    server: Server,
) -> None:
    stranger = IdentityStore(TD, DC, "host-c")
    _issue(CertificateAuthority.create(TD), stranger, spiffe.node_id(TD, DC, "host-c"))
    with pytest.raises(trio.BrokenResourceError) as e:
        await _dial(server.port, stranger.client_context(None), spiffe.server_name(WEB))
    assert "certificate verify failed" in str(e.value.__cause__)


# --- rotation ----------


async def test_rotation_keeps_open_connections_and_new_handshakes_get_the_new_cert(
    server: Server, store_a: IdentityStore, store_b: IdentityStore, ca: CertificateAuthority
) -> None:
    before = store_a.held(WEB)
    assert before is not None
    old = await _dial(server.port, store_b.client_context(SHOP), spiffe.server_name(WEB))
    assert old.served_cert.serial == before.info.serial

    _issue(ca, store_a, WEB, ttl=4)  # what serve_identities does on renewal
    after = store_a.held(WEB)
    assert after is not None and after.info.serial != before.info.serial

    with trio.fail_after(5):
        await old.stream.send_all(b"same connection")
        assert await old.stream.receive_some(4096) == b"same connection"
    new = await _dial(server.port, store_b.client_context(SHOP), spiffe.server_name(WEB))
    assert new.served_cert.serial == after.info.serial
    await old.stream.aclose()
    await new.stream.aclose()


# --- the store's own rules ------------------------------------------------------------------------


def test_install_refuses_a_certificate_for_another_identity(
    ca: CertificateAuthority, store_a: IdentityStore
) -> None:
    key = keys.generate_key()
    chain = ca.sign_csr(keys.make_csr(key, SHOP), SHOP, 600)
    with pytest.raises(IdentityError, match="instead of"):
        store_a.install(WEB, chain, key, ca.roots_pem)


def test_install_refuses_a_key_that_does_not_match(
    ca: CertificateAuthority, store_a: IdentityStore
) -> None:
    chain = ca.sign_csr(keys.make_csr(keys.generate_key(), WEB), WEB, 600)
    with pytest.raises(IdentityError, match="do not load together"):
        store_a.install(WEB, chain, keys.generate_key(), ca.roots_pem)


def test_empty_store_is_not_ready_and_says_so() -> None:
    store = IdentityStore(TD, DC, "host-z")
    assert not store.ready()
    assert store.identities() == []
    with pytest.raises(IdentityError, match="not ready"):
        store.client_context(None)
    with pytest.raises(IdentityError, match="no trust roots"):
        store.server_context()


def test_persisted_identities_restore_and_bad_files_are_skipped(
    store_a: IdentityStore, tmp_path: Path
) -> None:
    d = tmp_path / "a" / "identity"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    (d / "svc-junk.pem").write_bytes(b"not pem")
    (d / "svc-web.pem").rename(d / "svc-stolen.pem")  # file name and cert disagree
    restored = IdentityStore(TD, DC, "host-a", tmp_path / "a")
    assert restored.ready()
    assert [i.identity for i in restored.identities()] == [NODE_A]
    other_node = IdentityStore(TD, DC, "host-b", tmp_path / "a")
    assert not other_node.ready()  # host-a's node cert is not host-b's


def test_forget_drops_a_service_but_never_the_node(store_a: IdentityStore, tmp_path: Path) -> None:
    store_a.forget(WEB)
    store_a.forget(NODE_A)
    assert [i.identity for i in store_a.identities()] == [NODE_A]
    assert not (tmp_path / "a" / "identity" / "svc-web.pem").exists()
    assert "host-a" in repr(store_a)
