"""Which certificate an agent takes for the controller's (``identity.client.check_controller``):
a chain to the CA file and the DNS name are not enough when the file holds a root that vouches
for more than this mesh."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.client import NO_PIN, Expect, check_controller

TD, DC = "mesh.test", "dc1"
CONTROLLER = spiffe.service_id(TD, DC, "nodemesh-controller")


@pytest.fixture(scope="module")
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    """Another CA whose root sits in the same CA file (an operator's PKI signs much else)."""
    return CertificateAuthority.create(TD)


def _der(ca: CertificateAuthority, ident: spiffe.SpiffeId) -> bytes:
    chain = ca.sign_csr(
        keys.make_csr(keys.generate_key(), ident), ident, 600, dns_names=("nodemesh-controller",)
    )
    return keys.load_certificates(chain)[0].public_bytes(serialization.Encoding.DER)


def _own(ca: CertificateAuthority) -> Expect:
    ident = spiffe.node_id(TD, DC, "h1")
    return Expect.from_chain(ca.sign_csr(keys.make_csr(keys.generate_key(), ident), ident, 600))


def test_the_controller_from_this_nodes_own_ca_is_accepted(mesh_ca: CertificateAuthority) -> None:
    expect = _own(mesh_ca)
    assert expect.identity == CONTROLLER and expect.issuer
    assert check_controller(_der(mesh_ca, CONTROLLER), expect) is None
    assert check_controller(_der(mesh_ca, CONTROLLER), NO_PIN) is None  # the first sign-in


@pytest.mark.parametrize(
    ("ident", "says"),
    [
        (spiffe.node_id(TD, DC, "h2"), "not the controller's"),  # any node with the DNS name
        (spiffe.service_id(TD, DC, "web"), "not the controller's"),
        (spiffe.service_id(TD, "dc9", "nodemesh-controller"), "not the controller's"),
    ],
)
def test_a_certificate_naming_another_identity_is_refused(
    mesh_ca: CertificateAuthority, ident: spiffe.SpiffeId, says: str
) -> None:
    why = check_controller(_der(mesh_ca, ident), _own(mesh_ca))
    assert why is not None and says in why and ident.uri in why


def test_the_controller_id_from_another_ca_under_the_same_roots_is_refused(
    mesh_ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    """Before, a certificate from any CA in the file with the DNS name passed, and agents took
    the roots it returned.  Once a node holds a certificate, the controller's must come from the
    same CA."""
    why = check_controller(_der(other_ca, CONTROLLER), _own(mesh_ca))
    assert why is not None and "from a CA other than the one that issued this node's" in why


def test_another_trust_domains_controller_is_refused(mesh_ca: CertificateAuthority) -> None:
    theirs = spiffe.service_id("other.test", DC, "nodemesh-controller")
    why = check_controller(_der(CertificateAuthority.create("other.test"), theirs), _own(mesh_ca))
    assert why is not None and f"not the controller's {CONTROLLER}" in why


def test_no_certificate_is_refused() -> None:
    assert check_controller(None, NO_PIN) == "presented no certificate"
