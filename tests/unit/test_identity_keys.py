"""Agent-side keys, CSRs, leaf_info, scheduling arithmetic and SNI selection tables."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from nodemesh.errors import IdentityError
from nodemesh.identity import files, keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.keys import LeafInfo, load_csr
from nodemesh.identity.store import backoff_delay, renew_time, select_identity

TD = "mesh.test"
NODE = spiffe.node_id(TD, "dc1", "host-a")
WEB = spiffe.service_id(TD, "dc1", "web")
API = spiffe.service_id(TD, "dc1", "Api")


def test_generate_key_is_p256_pkcs8() -> None:
    pem = keys.generate_key()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = keys.load_private_key(pem)
    assert isinstance(key.curve, ec.SECP256R1)
    assert keys.generate_key() != pem


def test_csr_names_the_identity_and_is_self_signed() -> None:
    csr = keys.load_csr(keys.make_csr(keys.generate_key(), WEB))
    assert keys.csr_identity(csr) == WEB
    assert csr.is_signature_valid


def test_make_csr_rejects_garbage_keys() -> None:
    with pytest.raises(IdentityError, match="not an unencrypted PEM key"):
        keys.make_csr(b"nope", WEB)


def test_leaf_info_reads_identity_validity_and_serial() -> None:
    ca = CertificateAuthority.create(TD)
    key = keys.generate_key()
    pem = ca.sign_csr(keys.make_csr(key, NODE), NODE, 600)
    info = keys.leaf_info(pem)
    cert = x509.load_pem_x509_certificate(pem)
    assert info == LeafInfo(
        identity=NODE,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=cert.serial_number,
    )
    assert info.lifetime == pytest.approx(660, abs=1)
    assert keys.public_keys_match(pem, key)
    assert not keys.public_keys_match(pem, keys.generate_key())


def test_leaf_info_of_a_cert_without_spiffe_id() -> None:
    ca = CertificateAuthority.create(TD)
    assert keys.leaf_info(ca.roots_pem).identity is None  # "spiffe://td" names no workload


def test_leaf_info_rejects_garbage() -> None:
    with pytest.raises(IdentityError, match="not a PEM certificate chain"):
        keys.leaf_info(b"garbage")


# --- SNI selection ----------

HELD = {NODE, WEB, API}


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        (None, NODE),  # no SNI: the node identity
        ("web.svc.dc1.mesh.test", WEB),
        ("WEB.svc.dc1.mesh.test", WEB),  # SNI is case-insensitive
        ("api.svc.dc1.mesh.test", API),  # held name "Api": server_name lower-cases it
        ("host-a.node.dc1.mesh.test", NODE),
        ("db.svc.dc1.mesh.test", None),  # a service this node does not serve
        ("web.svc.dc2.mesh.test", None),  # another datacenter
        ("web.svc.dc1.other.test", None),  # another trust domain
        ("host-b.node.dc1.mesh.test", None),  # another node
        ("web.mesh.test", None),  # malformed
        ("localhost", None),
        ("", None),
    ],
)
def test_sni_selection(sni: str | None, expected: spiffe.SpiffeId | None) -> None:
    assert select_identity(sni, TD, NODE, HELD) == expected


def test_no_sni_without_a_node_cert_is_refused() -> None:
    assert select_identity(None, TD, NODE, {WEB}) is None


# --- rotation arithmetic ----------


def test_renewal_is_at_70_percent_and_jitter_only_moves_it_earlier() -> None:
    info = LeafInfo(WEB, not_before=1000.0, not_after=2000.0, serial=1)
    assert renew_time(info, 0.0) == pytest.approx(1700.0)
    assert renew_time(info, 1.0) == pytest.approx(1650.0)


def test_renewal_counts_from_issuance_not_from_the_back_dated_not_before() -> None:
    # A 4 s certificate back-dated by 60 s must not look 94 % used the moment it arrives.
    info = LeafInfo(WEB, not_before=940.0, not_after=1004.0, serial=1)
    assert renew_time(info, 0.0, issued_at=1000.0) == pytest.approx(1002.8)


@pytest.mark.parametrize(
    ("failures", "no_jitter", "full_jitter"),
    [(1, 1.0, 0.5), (2, 2.0, 1.0), (3, 4.0, 2.0), (7, 60.0, 30.0), (50, 60.0, 30.0)],
)
def test_backoff_is_exponential_and_capped(
    failures: int, no_jitter: float, full_jitter: float
) -> None:
    assert backoff_delay(failures, 0.0) == no_jitter
    assert backoff_delay(failures, 1.0) == full_jitter


# --- private files ----------


def test_write_private_is_0600_and_replaces(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    files.ensure_private_dir(d)
    files.write_private(d / "k.pem", b"one")
    files.write_private(d / "k.pem", b"two")
    assert (d / "k.pem").read_bytes() == b"two"
    assert stat.S_IMODE((d / "k.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in d.iterdir()) == ["k.pem"]


def test_scratch_file_is_private_and_gone_afterwards() -> None:
    with files.scratch_file(b"secret") as path:
        p = Path(path)
        assert p.read_bytes() == b"secret"
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert not p.exists()
    assert not p.parent.exists()


def _csr_for(key: Any) -> bytes:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, algorithm)  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make", "refused"),
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP256R1()), None, id="p256"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), None, id="p384"),
        pytest.param(ed25519.Ed25519PrivateKey.generate, None, id="ed25519"),
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), None, id="rsa2048"),
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), "RSA 1024 bits", id="rsa1024"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP192R1()), "EC secp192r1", id="p192"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), "EC secp256k1", id="k256"),
        pytest.param(lambda: dsa.generate_private_key(2048), "DSAPublicKey", id="dsa"),
    ],
)
def test_csr_key_types_are_limited(make: Any, refused: str | None) -> None:
    pem = _csr_for(make())
    if refused is None:
        load_csr(pem)
        return
    with pytest.raises(IdentityError, match=refused):
        load_csr(pem)
