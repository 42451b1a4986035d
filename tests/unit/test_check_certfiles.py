"""Reading the identity files as ``nodemesh check`` does: real certificates from a real CA in a
temporary state dir, verified against the CA file, never written back."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from nodemesh.check.certfiles import read_certs, read_roots, verify_chain
from nodemesh.config import AgentConfig, agent_config_from_mapping
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority

TD, DC = "nodemesh.local", "dc1"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def _pair(ca: CertificateAuthority, ident: spiffe.SpiffeId, ttl: float = 3600.0) -> bytes:
    key = keys.generate_key()
    return key + ca.sign_csr(keys.make_csr(key, ident), ident, ttl)


def _host(tmp_path: Path, ca: CertificateAuthority) -> tuple[Path, Path]:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.roots_pem)
    ident = tmp_path / "state" / "identity"
    ident.mkdir(parents=True)
    return ca_file, ident


def _cfg(tmp_path: Path, ca_file: Path) -> AgentConfig:
    return agent_config_from_mapping(
        {
            "agent": {"node": "h1", "state_dir": str(tmp_path / "state")},
            "controller": {"ca_file": str(ca_file)},
        }
    )


def test_good_files_read_clean(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca_file, ident = _host(tmp_path, ca)
    node, shop = spiffe.node_id(TD, DC, "h1"), spiffe.service_id(TD, DC, "shop")
    (ident / "node-h1.pem").write_bytes(_pair(ca, node))
    (ident / "svc-shop.pem").write_bytes(_pair(ca, shop))
    cfg = _cfg(tmp_path, ca_file)
    roots, certs = read_certs(cfg, ["shop"])
    assert roots.error == "" and roots.count == 1
    assert [(c.what, c.error, c.chain_error, c.key_matches, c.identity) for c in certs] == [
        ("node h1", "", "", True, node.uri),
        ("service shop", "", "", True, shop.uri),
    ]
    assert certs[1].not_after - certs[1].not_before == pytest.approx(3660, abs=2)


def test_missing_foreign_and_mismatched_files(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca_file, ident = _host(tmp_path, ca)
    other = CertificateAuthority.create(TD)
    node, web = spiffe.node_id(TD, DC, "h1"), spiffe.service_id(TD, DC, "web")
    (ident / "node-h1.pem").write_bytes(_pair(other, node))  # another mesh's CA
    good = _pair(ca, web)
    key_end = good.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    (ident / "svc-web.pem").write_bytes(keys.generate_key() + good[key_end:])  # wrong key
    (ident / "svc-junk.pem").write_bytes(b"not pem at all\n")
    cfg = _cfg(tmp_path, ca_file)
    _, certs = read_certs(cfg, ["shop", "web"])
    by = {c.what: c for c in certs}
    # Listed in Consul or present on disk: every one is looked at.
    assert sorted(by) == ["node h1", "service junk", "service shop", "service web"]
    assert "no certificate in the chain or the CA file is its issuer" in by["node h1"].chain_error
    assert by["service shop"].error.startswith("no file ")
    assert not by["service web"].key_matches and by["service web"].chain_error == ""
    assert "does not hold a private key and a certificate" in by["service junk"].error


def test_unreadable_ca_file(tmp_path: Path, ca: CertificateAuthority) -> None:
    roots, certs = read_roots(tmp_path / "absent.pem")
    assert roots.error == "no such file or directory" and certs == []
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert read_roots(bad)[0].error.startswith("not a PEM certificate chain")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert read_roots(empty)[0].error


def test_verify_chain_follows_signatures_not_names(ca: CertificateAuthority) -> None:
    # Another root of the same trust domain has the same name but not the same key.
    ident = spiffe.service_id(TD, DC, "shop")
    leaf = keys.load_certificates(_pair(ca, ident).split(b"-----END PRIVATE KEY-----\n")[1])
    stray = CertificateAuthority.create(TD).cert
    assert verify_chain([*leaf, stray], list(ca.roots)) == ""
    assert verify_chain(leaf, [stray]) != ""
    pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    assert verify_chain(keys.load_certificates(pem), list(ca.roots)) == ""  # the root itself
