"""The identity files in the state dir and the mesh CA file, read and verified (never written).

``<state_dir>/identity/<kind>-<name>.pem`` holds a private key and its certificate chain, as
``identity/store`` persists them.  Verifying a chain against ``controller.ca_file`` is the one
place outside ``identity/`` that touches ``cryptography``: only to check signatures.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from nodemesh.check.facts import CertFacts, RootsFacts
from nodemesh.config import AgentConfig
from nodemesh.errors import IdentityError
from nodemesh.identity import keys, spiffe

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str:
    """Empty when ``chain`` (leaf first) leads to one of ``roots`` by valid signatures, else
    what is wrong."""
    current, pool = chain[0], chain[1:]
    for _ in range(len(chain)):
        if any(_issued_by(current, r) for r in roots):
            return ""
        nxt = next((c for c in pool if _issued_by(current, c)), None)
        if nxt is None:
            break
        current = nxt
    issuer = current.issuer.rfc4514_string() or "its issuer"
    return f"no certificate in the chain or the CA file is its issuer ({issuer})"


def read_roots(ca_file: Path) -> tuple[RootsFacts, list[x509.Certificate]]:
    try:
        certs = keys.load_certificates(ca_file.read_bytes())
    except OSError as e:
        return RootsFacts(ca_file, error=(e.strerror or str(e)).lower()), []
    except IdentityError as e:
        return RootsFacts(ca_file, error=str(e)), []
    if not certs:
        return RootsFacts(ca_file, error="holds no certificate"), []
    not_after = min(c.not_valid_after_utc.timestamp() for c in certs)
    return RootsFacts(ca_file, count=len(certs), not_after=not_after), certs


def read_cert(
    what: str, expected: spiffe.SpiffeId, path: Path, roots: list[x509.Certificate]
) -> CertFacts:
    base = CertFacts(what, expected.uri, path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _with(base, error=f"no file {path}")
    except OSError as e:
        return _with(
            base,
            error=f"cannot read {path} ({(e.strerror or str(e)).lower()}); run "
            "nodemesh check as root",
        )
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    key = b"".join(b for kind, b in blocks if kind.endswith(b"PRIVATE KEY"))
    chain_pem = b"".join(b for kind, b in blocks if kind == b"CERTIFICATE")
    if not key or not chain_pem:
        return _with(base, error=f"{path} does not hold a private key and a certificate")
    try:
        info = keys.leaf_info(chain_pem)
        chain = keys.load_certificates(chain_pem)
        matches = keys.public_keys_match(chain_pem, key)
    except IdentityError as e:
        return _with(base, error=f"{path}: {e}")
    chain_error = verify_chain(chain, roots) if roots else "the mesh CA could not be read"
    return CertFacts(
        what,
        expected.uri,
        path,
        identity=info.identity.uri if info.identity is not None else None,
        not_before=info.not_before,
        not_after=info.not_after,
        chain_error=chain_error,
        key_matches=matches,
    )


def _with(base: CertFacts, *, error: str) -> CertFacts:
    return CertFacts(base.what, base.expected, base.path, error=error)


def _persisted_services(identity_dir: Path) -> set[str]:
    try:
        return {p.name[4:-4] for p in identity_dir.glob("svc-*.pem")}
    except OSError:
        return set()


def read_certs(cfg: AgentConfig, services: Iterable[str]) -> tuple[RootsFacts, list[CertFacts]]:
    """The CA file, the node's certificate and one per service (listed in Consul or on disk)."""
    root_facts, roots = read_roots(cfg.ca_file)
    ident = cfg.state_dir / "identity"
    node = spiffe.node_id(cfg.trust_domain, cfg.datacenter, cfg.node)
    out = [read_cert(f"node {cfg.node}", node, ident / f"node-{cfg.node}.pem", roots)]
    for name in sorted(set(services) | _persisted_services(ident)):
        svc = spiffe.service_id(cfg.trust_domain, cfg.datacenter, name)
        out.append(read_cert(f"service {name}", svc, ident / f"svc-{name}.pem", roots))
    return root_facts, out
