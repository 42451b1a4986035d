"""The controller's certificate authority.

Either nodemesh owns the root (created on first start, EC P-256, ten years, persisted 0600
under the controller's state_dir) or the operator supplies a root or an intermediate with its
key and, for an intermediate, the chain up to the root.  Agents trust exactly the root(s) in
``roots_pem``.

Signing rules (``sign_csr``) are where the mesh's security lives, so they ignore everything a
CSR asks for except its public key: the caller (the API, after checking Consul) decides the
identity, and the leaf carries exactly one URI SAN, that identity.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodemesh.errors import ConfigError, IdentityError
from nodemesh.identity import files
from nodemesh.identity.keys import load_csr
from nodemesh.identity.spiffe import SpiffeId

ROOT_LIFETIME = datetime.timedelta(days=3650)
# Leaves start a minute in the past so a peer whose clock is slightly behind accepts them.
CLOCK_SKEW = datetime.timedelta(seconds=60)
CERT_FILE = "ca.pem"
KEY_FILE = "ca-key.pem"

SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class CertificateAuthority:
    trust_domain: str
    cert: x509.Certificate  # the signing certificate: our root, or the operator's root/intermediate
    key: SigningKey
    intermediates: tuple[x509.Certificate, ...]  # sent after each leaf: cert (if not a root) ..
    roots: tuple[x509.Certificate, ...]

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: str,
        cert_file: Path | None,
        key_file: Path | None,
        chain_file: Path | None,
    ) -> CertificateAuthority:
        if cert_file is not None and key_file is not None:
            return cls.from_operator_files(trust_domain, cert_file, key_file, chain_file)
        cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
        if cert_path.exists() or key_path.exists():
            return cls.load_state(state_dir, trust_domain)
        ca = cls.create(trust_domain)
        files.ensure_private_dir(state_dir)
        # Key first: a crash in between leaves no cert without its key.
        files.write_private(key_path, _key_pem(ca.key))
        files.write_private(cert_path, ca.cert.public_bytes(serialization.Encoding.PEM))
        return ca

    @classmethod
    def create(cls, trust_domain: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root {trust_domain}")])
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, cert, key, (), (cert,))

    @classmethod
    def load_state(cls, state_dir: Path, trust_domain: str | None = None) -> CertificateAuthority:
        """Load the root nodemesh created earlier under ``state_dir``."""
        cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
        for p in (cert_path, key_path):
            if not p.exists():
                raise ConfigError(
                    f"{p}: missing while its pair exists; restore it from backup, "
                    f"or remove {state_dir} to create a new root (agents must then trust it)"
                )
        cert = _read_certs(cert_path)[0]
        key = _read_key(key_path)
        _check_pair(cert, key, cert_path, key_path)
        own = _root_trust_domain(cert)
        if trust_domain is not None and own != trust_domain:
            raise ConfigError(
                f"{cert_path}: the root was created for trust domain {own!r} but the config "
                f"says {trust_domain!r}; set controller.trust_domain = {own!r}"
            )
        return cls(own or trust_domain or "", cert, key, (), (cert,))

    @classmethod
    def from_operator_files(
        cls, trust_domain: str, cert_file: Path, key_file: Path, chain_file: Path | None
    ) -> CertificateAuthority:
        """An operator's root or intermediate; intermediates need the chain up to the root."""
        certs = _read_certs(cert_file)
        cert, extra = certs[0], certs[1:]
        key = _read_key(key_file)
        _check_pair(cert, key, cert_file, key_file)
        _check_is_ca(cert, cert_file)
        pool = list(extra) + (_read_certs(chain_file) if chain_file is not None else [])
        path = [cert]
        while not _is_self_signed(path[-1]):
            issuer = next((c for c in pool if _issued_by(path[-1], c)), None)
            if issuer is None or len(path) > 8:
                raise ConfigError(
                    f"{cert_file}: is an intermediate whose chain does not reach a root; set "
                    "ca.chain_file to a PEM file with every issuing certificate up to the root"
                )
            _check_is_ca(issuer, chain_file or cert_file)
            path.append(issuer)
        root = path[-1]
        return cls(trust_domain, cert, key, tuple(path[:-1]), (root,))

    # --- use -----------------------------------------------------------------------------------

    @property
    def roots_pem(self) -> bytes:
        """The trust bundle agents load."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: float,
        *,
        dns_names: Iterable[str] = (),
        ips: Iterable[str] = (),
    ) -> bytes:
        """Sign ``csr_pem``'s public key as ``identity``; returns the leaf then intermediates.

        The CSR's own subject and extensions are ignored on purpose.
        """
        if identity.trust_domain != self.trust_domain:
            raise IdentityError(
                f"identity {identity} is outside trust domain {self.trust_domain!r}; "
                "this CA signs only its own trust domain"
            )
        if ttl <= 0:
            raise IdentityError(f"certificate ttl {ttl} is not positive; use a ttl like 86400")
        csr = load_csr(csr_pem)
        public_key = csr.public_key()
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(seconds=ttl), self.cert.not_valid_after_utc)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        names += [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # An empty subject obliges a critical SAN (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(_aki(self.cert, self.key), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.key, _hash_for(self.key))
        )
        chain = (leaf, *self.intermediates)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)

    def summary(self) -> dict[str, str]:
        """What ``nodemesh ca show`` prints."""
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return {
            "subject": self.cert.subject.rfc4514_string(),
            "trust_domain": self.trust_domain,
            "sha256_fingerprint": hashlib.sha256(der).hexdigest(),
            "not_before": self.cert.not_valid_before_utc.isoformat(),
            "not_after": self.cert.not_valid_after_utc.isoformat(),
            "serial": format(self.cert.serial_number, "x"),
        }


# --- helpers ------------------------------------------------------------------------------------


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate, key: SigningKey) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _hash_for(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself; the API wants no hash for them.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _key_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror}); check the path and mode") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{path}: is not a PEM certificate file") from None
    return certs


def _read_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror}); check the path and mode") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path}: is not an unencrypted PEM private key; decrypt it (openssl pkey -in ...)"
        ) from None
    if not isinstance(key, SigningKey):
        raise ConfigError(f"{path}: holds a key type that cannot sign certificates; use EC or RSA")
    return key


def _check_pair(cert: x509.Certificate, key: SigningKey, cert_path: Path, key_path: Path) -> None:
    if cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
        raise ConfigError(
            f"{key_path}: is not the private key of {cert_path}; supply the matching key"
        )


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(
            f"{path}: {cert.subject.rfc4514_string() or 'the certificate'} is not a CA "
            "(basicConstraints CA:TRUE is missing); supply a root or intermediate CA certificate"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise ConfigError(f"{path}: the CA certificate's keyUsage lacks keyCertSign; reissue it")
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise ConfigError(f"{path}: the CA certificate expired on {cert.not_valid_after_utc}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return _issued_by(cert, cert)


def _root_trust_domain(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return uri[len("spiffe://") :]
    return None
