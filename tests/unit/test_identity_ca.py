"""The CA: creation, persistence with 0600, reload, operator CAs, and the signing rules."""

from __future__ import annotations

import datetime
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodemesh.errors import ConfigError, IdentityError
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority

TD = "mesh.test"
WEB = spiffe.service_id(TD, "dc1", "web")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _write(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


# --- creation and persistence ----------


def test_first_start_creates_a_root_and_persists_it_privately(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = CertificateAuthority.load_or_create(state, TD, None, None, None)
    assert _mode(state) == 0o700
    assert _mode(state / "ca-key.pem") == 0o600
    assert _mode(state / "ca.pem") == 0o600

    root = ca.cert
    assert root.subject.rfc4514_string() == f"CN=nodemesh root {TD}"
    bc = _ext(root, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints)
    assert bc.ca and bc.path_length == 1
    san = _ext(root, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert ca.roots_pem == root.public_bytes(serialization.Encoding.PEM)


def test_later_start_loads_the_same_root(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, TD, None, None, None)
    again = CertificateAuthority.load_or_create(tmp_path, TD, None, None, None)
    assert again.cert == first.cert
    assert again.roots_pem == first.roots_pem


def test_reload_refuses_a_different_trust_domain(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, None, None, None)
    with pytest.raises(ConfigError, match=r"controller.trust_domain = 'mesh.test'"):
        CertificateAuthority.load_or_create(tmp_path, "other.test", None, None, None)


def test_a_lost_key_is_reported_not_replaced(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD, None, None, None)
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(ConfigError, match=r"ca-key.pem: missing"):
        CertificateAuthority.load_or_create(tmp_path, TD, None, None, None)


# --- operator-supplied CAs ------------------------------------------------------------------------


def test_operator_root_is_used_as_is(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("corp root", key, None, key, ca=True)
    cert_file = _write(tmp_path / "root.pem", root)
    (tmp_path / "root-key.pem").write_bytes(_pem_key(key))
    ca = CertificateAuthority.load_or_create(
        tmp_path / "state", TD, cert_file, tmp_path / "root-key.pem", None
    )
    assert ca.roots == (root,)
    assert not (tmp_path / "state").exists()  # nothing of ours is created
    leaf = x509.load_pem_x509_certificates(ca.sign_csr(_csr(), WEB, 3600))
    assert len(leaf) == 1
    leaf[0].verify_directly_issued_by(root)


def test_operator_intermediate_with_chain_signs_and_ships_the_intermediate(tmp_path: Path) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("corp root", root_key, None, root_key, ca=True)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _cert("corp mesh intermediate", mid_key, root, root_key, ca=True)
    (tmp_path / "mid-key.pem").write_bytes(_pem_key(mid_key))
    ca = CertificateAuthority.load_or_create(
        tmp_path,
        TD,
        _write(tmp_path / "mid.pem", mid),
        tmp_path / "mid-key.pem",
        _write(tmp_path / "chain.pem", root),
    )
    assert ca.roots == (root,)
    chain = x509.load_pem_x509_certificates(ca.sign_csr(_csr(), WEB, 3600))
    assert [c.subject for c in chain[1:]] == [mid.subject]
    chain[0].verify_directly_issued_by(mid)


def test_operator_intermediate_without_chain_is_refused(tmp_path: Path) -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("corp root", root_key, None, root_key, ca=True)
    mid_key = ec.generate_private_key(ec.SECP256R1())
    mid = _cert("corp mesh intermediate", mid_key, root, root_key, ca=True)
    (tmp_path / "mid-key.pem").write_bytes(_pem_key(mid_key))
    with pytest.raises(ConfigError, match=r"set ca.chain_file"):
        CertificateAuthority.load_or_create(
            tmp_path, TD, _write(tmp_path / "mid.pem", mid), tmp_path / "mid-key.pem", None
        )


def test_operator_cert_with_mismatched_key_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("corp root", key, None, key, ca=True)
    (tmp_path / "other-key.pem").write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match=r"other-key.pem: is not the private key of .*root.pem"):
        CertificateAuthority.load_or_create(
            tmp_path, TD, _write(tmp_path / "root.pem", root), tmp_path / "other-key.pem", None
        )


def test_operator_cert_that_is_not_a_ca_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("just a server", key, None, key, ca=False)
    (tmp_path / "key.pem").write_bytes(_pem_key(key))
    with pytest.raises(ConfigError, match="is not a CA"):
        CertificateAuthority.load_or_create(
            tmp_path, TD, _write(tmp_path / "leaf.pem", leaf), tmp_path / "key.pem", None
        )


def test_operator_files_that_are_not_pem_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"junk.pem: is not a PEM certificate file"):
        CertificateAuthority.load_or_create(
            tmp_path, TD, tmp_path / "junk.pem", tmp_path / "junk.pem", None
        )


# --- signing rules ----------


def _csr(identity: spiffe.SpiffeId = WEB) -> bytes:
    return keys.make_csr(keys.generate_key(), identity)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def test_leaf_carries_exactly_the_identity_given_not_what_the_csr_asked(
    ca: CertificateAuthority,
) -> None:
    # The CSR asks for "db"; the caller (after checking Consul) decided "web".
    asked = spiffe.service_id(TD, "dc1", "db")
    pem = ca.sign_csr(_csr(asked), WEB, 3600)
    leaf = x509.load_pem_x509_certificates(pem)[0]
    san = _ext(leaf, x509.SubjectAlternativeName)
    assert san.critical
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    assert san.value.get_values_for_type(x509.DNSName) == []
    assert keys.leaf_info(pem).identity == WEB


def test_csr_with_many_sans_still_gets_one(ca: CertificateAuthority) -> None:
    key = keys.load_private_key(keys.generate_key())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(spiffe.service_id(TD, "dc1", "db").uri),
                    x509.UniformResourceIdentifier(WEB.uri),
                    x509.DNSName("controller.example"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), WEB, 3600)
    leaf = x509.load_pem_x509_certificates(pem)[0]
    assert leaf.subject == x509.Name([])
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    bc = _ext(leaf, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints) and not bc.ca


def test_leaf_profile(ca: CertificateAuthority) -> None:
    before = time.time()
    leaf = x509.load_pem_x509_certificates(ca.sign_csr(_csr(), WEB, 3600))[0]
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    assert before - 62 <= nb <= before - 58  # back-dated for clock skew
    assert before + 3598 <= na <= time.time() + 3601
    leaf.verify_directly_issued_by(ca.cert)


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {keys.leaf_info(ca.sign_csr(_csr(), WEB, 60)).serial for _ in range(5)}
    assert len(serials) == 5
    assert all(s > 2**64 for s in serials)


def test_extra_names_only_when_the_caller_asks(ca: CertificateAuthority) -> None:
    pem = ca.sign_csr(_csr(), WEB, 60, dns_names=("nodemesh-controller",), ips=("198.18.0.1",))
    san = _ext(x509.load_pem_x509_certificates(pem)[0], x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["nodemesh-controller"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.1"]


def test_csr_with_a_bad_signature_is_rejected(ca: CertificateAuthority) -> None:
    der = bytearray(x509.load_pem_x509_csr(_csr()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="signature"):
        ca.sign_csr(tampered, WEB, 60)


def test_garbage_csr_is_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="not a PEM certificate request"):
        ca.sign_csr(b"not a csr", WEB, 60)


def test_identity_outside_the_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(IdentityError, match="outside trust domain"):
        ca.sign_csr(_csr(), spiffe.service_id("evil.test", "dc1", "web"), 60)


def test_ttl_is_capped_by_the_ca_lifetime(ca: CertificateAuthority) -> None:
    pem = ca.sign_csr(_csr(), WEB, 100 * 365 * 86400.0)
    assert keys.leaf_info(pem).not_after == ca.cert.not_valid_after_utc.timestamp()
