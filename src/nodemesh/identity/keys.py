"""Agent-side key material: private keys, CSRs, and what a leaf certificate says.

Keys are generated where they are used (on the agent) and never leave it: the controller only
ever sees a CSR.  EC P-256 because every TLS stack verifies it fast and its keys are small.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from nodemesh.errors import IdentityError
from nodemesh.identity import spiffe
from nodemesh.identity.spiffe import SpiffeId


@dataclass(frozen=True)
class LeafInfo:
    """What a leaf certificate asserts, as plain values (epoch seconds, int serial)."""

    identity: SpiffeId | None
    not_before: float
    not_after: float
    serial: int

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def generate_key() -> bytes:
    """A fresh EC P-256 private key as unencrypted PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"private key is not an unencrypted PEM key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError("private key is not an EC key; generate one with generate_key()")
    return key


def make_csr(key_pem: bytes, identity: SpiffeId) -> bytes:
    """A PEM CSR for ``identity`` signed by ``key_pem``.

    The CSR carries the URI SAN only as a hint: the controller decides the identity it signs.
    """
    key = load_private_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature (proof that the requester holds the key)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise IdentityError(f"CSR is not a PEM certificate request: {e}") from None
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # unsupported algorithms raise from deep inside cryptography
        raise IdentityError(f"CSR signature cannot be checked: {e}") from None
    if not valid:
        raise IdentityError("CSR signature does not match its public key; send a freshly made CSR")
    _check_key(csr.public_key())
    return csr


# The keys a leaf may carry: what TLS stacks verify well and what is not breakable today.
SIGNABLE_CURVES = ("secp256r1", "secp384r1")
MIN_RSA_BITS = 2048


def _check_key(key: object) -> None:
    """Refuse a CSR whose key is weak or of a type nodemesh does not sign (RSA-1024, DSA, P-192)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        refused = None if key.curve.name in SIGNABLE_CURVES else f"EC {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        refused = None if key.key_size >= MIN_RSA_BITS else f"RSA {key.key_size} bits"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        refused = None
    else:
        refused = type(key).__name__
    if refused is not None:
        raise IdentityError(
            f"CSR key is {refused}; nodemesh signs only P-256, P-384, Ed25519 and RSA of"
            f" {MIN_RSA_BITS} bits or more"
        )


def csr_identity(csr: x509.CertificateSigningRequest) -> SpiffeId | None:
    """The single nodemesh SPIFFE ID a CSR asks for, or None if it asks for none or several."""
    return _one_identity(csr.extensions)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise IdentityError(f"not a PEM certificate chain: {e}") from None
    return certs


def leaf_info(cert_pem: bytes) -> LeafInfo:
    """Identity, validity and serial of the first certificate in ``cert_pem``."""
    cert = load_certificates(cert_pem)[0]
    return LeafInfo(
        identity=_one_identity(cert.extensions),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        serial=cert.serial_number,
    )


def key_sha256(cert_pem: bytes) -> str:
    """SHA-256 of the first certificate's public key (SubjectPublicKeyInfo, DER), hex: the
    same for every certificate of one key, as ``openssl x509 -pubkey -noout | openssl pkey
    -pubin -outform DER | sha256sum`` prints it."""
    cert = load_certificates(cert_pem)[0]
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


def public_keys_match(cert_pem: bytes, key_pem: bytes) -> bool:
    cert = load_certificates(cert_pem)[0]
    key = load_private_key(key_pem)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _one_identity(extensions: x509.Extensions) -> SpiffeId | None:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    # Two URI SANs would make "who is this" ambiguous: trust neither.
    if len(uris) != 1:
        return None
    return spiffe.parse(uris[0])
