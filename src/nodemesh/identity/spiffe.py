"""SPIFFE identities and the TLS server names that select them.

    spiffe://<trust-domain>/dc/<datacenter>/svc/<service>   a service
    spiffe://<trust-domain>/dc/<datacenter>/node/<node>     an agent itself

Only the URI SAN of a peer certificate is trusted, never its CN.  An agent serving several
services picks the certificate by SNI: ``<service>.svc.<datacenter>.<trust-domain>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,126}"
_ID = re.compile(rf"^spiffe://([a-z0-9][a-z0-9.-]*)/dc/({_NAME})/(svc|node)/({_NAME})$")


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    datacenter: str
    kind: str  # "svc" or "node"
    name: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/dc/{self.datacenter}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def service_id(trust_domain: str, datacenter: str, service: str) -> SpiffeId:
    return SpiffeId(trust_domain, datacenter, "svc", service)


def node_id(trust_domain: str, datacenter: str, node: str) -> SpiffeId:
    return SpiffeId(trust_domain, datacenter, "node", node)


def parse(uri: str) -> SpiffeId | None:
    """The identity in ``uri``, or None if it is not a nodemesh SPIFFE ID."""
    m = _ID.match(uri)
    if m is None:
        return None
    return SpiffeId(m.group(1), m.group(2), m.group(3), m.group(4))


def server_name(ident: SpiffeId) -> str:
    """The SNI a client sends to reach ``ident`` on an agent's inbound listener."""
    return f"{ident.name}.{ident.kind}.{ident.datacenter}.{ident.trust_domain}".lower()


def from_server_name(sni: str, trust_domain: str) -> SpiffeId | None:
    suffix = "." + trust_domain
    if not sni.endswith(suffix):
        return None
    parts = sni[: -len(suffix)].split(".")
    if len(parts) != 3 or parts[1] not in ("svc", "node"):
        return None
    return parse(f"spiffe://{trust_domain}/dc/{parts[2]}/{parts[1]}/{parts[0]}")
