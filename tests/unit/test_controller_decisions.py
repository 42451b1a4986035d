"""The API's decisions, without sockets: ``ControllerApi.handle`` on plain Request values.

Consul is replaced by ``Directory``, a dict holding what Consul's catalog would say; the
integration tests check the same rules against a real Consul.
"""

from __future__ import annotations

import json

import pytest

from nodemesh.controller.api import ControllerApi, Request, Response
from nodemesh.controller.catalog import ConsulUnavailable, NodeInfo
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.spiffe import SpiffeId

TD, DC, TOKEN = "mesh.test", "dc1", "join-me"
HOST_A = spiffe.node_id(TD, DC, "host-a")


class Directory:
    """Consul's catalog as the controller sees it: node names are looked up without regard to
    case, as Consul does."""

    def __init__(self, nodes: dict[str, NodeInfo], down: bool = False) -> None:
        self.nodes, self.down = {k.lower(): v for k, v in nodes.items()}, down

    async def node(self, name: str) -> NodeInfo | None:
        if self.down:
            raise ConsulUnavailable("Consul at 127.0.0.1:8500 is unreachable")
        return self.nodes.get(name.lower())


NODES = {
    "host-a": NodeInfo(
        "host-a", "198.18.0.1", frozenset({"web", "api", "nodemesh-controller", "consul"}), True
    ),
    "host-dead": NodeInfo("host-dead", "198.18.0.9", frozenset({"web"}), alive=False),
}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def _api(ca: CertificateAuthority, down: bool = False) -> ControllerApi:
    return ControllerApi(ca, Directory(NODES, down), TOKEN, DC, 3600)


def _csr(ident: SpiffeId) -> str:
    return keys.make_csr(keys.generate_key(), ident).decode()


def _req(
    path: str,
    doc: object = None,
    *,
    method: str = "POST",
    token: str | None = TOKEN,
    ip: str = "198.18.0.1",
    peer: SpiffeId | None = None,
    raw: bytes | None = None,
) -> Request:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    body = raw if raw is not None else json.dumps(doc).encode() if doc is not None else b""
    return Request(method, path, headers, body, ip, peer)


def _error(resp: Response) -> str:
    doc = json.loads(resp.body)
    assert isinstance(doc["error"], str)
    return doc["error"]


def _identity(resp: Response) -> SpiffeId | None:
    assert resp.status == 200, resp.body
    return keys.leaf_info(json.loads(resp.body)["certificate"].encode()).identity


async def test_node_identity_for_token_holder_at_the_nodes_address(
    ca: CertificateAuthority,
) -> None:
    resp = await _api(ca).handle(_req("/v1/sign/node", {"csr": _csr(HOST_A)}))
    assert _identity(resp) == HOST_A
    doc = json.loads(resp.body)
    assert doc["roots"] == ca.roots_pem.decode()
    assert doc["not_after"] == keys.leaf_info(doc["certificate"].encode()).not_after


async def test_ipv4_mapped_source_counts_as_the_same_address(ca: CertificateAuthority) -> None:
    req = _req("/v1/sign/node", {"csr": _csr(HOST_A)}, ip="::ffff:198.18.0.1")
    assert _identity(await _api(ca).handle(req)) == HOST_A


@pytest.mark.parametrize(
    ("req_kwargs", "status", "says"),
    [
        ({"token": None}, 401, "missing 'Authorization: Bearer"),
        ({"token": "join-mE"}, 401, "join token does not match"),
        ({"token": ""}, 401, "missing"),
        ({"ip": "198.18.0.2"}, 403, "comes from 198.18.0.2 but Consul has node 'host-a'"),
        ({"ip": "not-an-ip"}, 403, "comes from not-an-ip"),
    ],
)
async def test_node_signing_refusals(
    ca: CertificateAuthority, req_kwargs: dict[str, str], status: int, says: str
) -> None:
    resp = await _api(ca).handle(_req("/v1/sign/node", {"csr": _csr(HOST_A)}, **req_kwargs))
    assert resp.status == status
    assert says in _error(resp)


@pytest.mark.parametrize(
    ("ident", "status", "says"),
    [
        (spiffe.node_id(TD, DC, "ghost"), 403, "'ghost' is not in Consul's catalog"),
        # Consul finds host-a for HOST-A: a second identity for one node, unless refused.
        (spiffe.node_id(TD, DC, "HOST-A"), 403, "names this node 'host-a', not 'HOST-A'"),
        (spiffe.node_id(TD, DC, "host-dead"), 403, "'host-dead' is not alive in Consul"),
        (spiffe.service_id(TD, DC, "web"), 400, "must ask for exactly one URI SAN"),
        (spiffe.node_id(TD, "dc9", "host-a"), 400, "must ask for exactly one URI SAN"),
        (spiffe.node_id("other.test", DC, "host-a"), 400, "must ask for exactly one URI SAN"),
    ],
)
async def test_node_csr_must_name_a_node_of_ours_that_consul_knows(
    ca: CertificateAuthority, ident: SpiffeId, status: int, says: str
) -> None:
    resp = await _api(ca).handle(_req("/v1/sign/node", {"csr": _csr(ident)}))
    assert resp.status == status
    assert says in _error(resp)


async def test_service_identity_for_a_service_on_the_callers_node(
    ca: CertificateAuthority,
) -> None:
    web = spiffe.service_id(TD, DC, "web")
    req = _req("/v1/sign/service", {"csr": _csr(web), "service": "web"}, token=None, peer=HOST_A)
    assert _identity(await _api(ca).handle(req)) == web


@pytest.mark.parametrize(
    ("peer", "service", "status", "says"),
    [
        (None, "web", 401, "node's certificate as TLS client cert"),
        (spiffe.service_id(TD, DC, "web"), "web", 403, "is not a node of datacenter"),
        (spiffe.node_id(TD, "dc9", "host-a"), "web", 403, "is not a node of datacenter"),
        (HOST_A, "db", 403, "no service 'db' registered on node 'host-a'"),
        # Registered on the node, but the controller's own name (its SPIFFE ID) and Consul's.
        (HOST_A, "nodemesh-controller", 403, "is nodemesh's or Consul's own and is never meshed"),
        (HOST_A, "consul", 403, "gets no service identity"),
        (spiffe.node_id(TD, DC, "gone"), "web", 403, "'gone' is not in Consul's catalog"),
        (spiffe.node_id(TD, DC, "Host-A"), "web", 403, "names this node 'host-a', not 'Host-A'"),
        (spiffe.node_id(TD, DC, "host-dead"), "web", 403, "serfHealth check is not passing"),
        (HOST_A, "../etc", 400, "is not a valid Consul service name"),
        (HOST_A, 7, 400, "is not a valid Consul service name"),
    ],
)
async def test_service_signing_refusals(
    ca: CertificateAuthority, peer: SpiffeId | None, service: object, status: int, says: str
) -> None:
    doc = {"csr": _csr(spiffe.service_id(TD, DC, "web")), "service": service}
    resp = await _api(ca).handle(_req("/v1/sign/service", doc, token=None, peer=peer))
    assert resp.status == status
    assert says in _error(resp)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'"csr"', 'string field "csr"'),
        (b'{"csr": 5}', 'string field "csr"'),
        (b'{"csr": "hello"}', "CSR is not a PEM certificate request"),
    ],
)
async def test_malformed_bodies(ca: CertificateAuthority, raw: bytes, says: str) -> None:
    resp = await _api(ca).handle(_req("/v1/sign/node", raw=raw))
    assert resp.status == 400
    assert says in _error(resp)


async def test_consul_down_is_503(ca: CertificateAuthority) -> None:
    resp = await _api(ca, down=True).handle(_req("/v1/sign/node", {"csr": _csr(HOST_A)}))
    assert resp.status == 503
    assert "Consul at 127.0.0.1:8500 is unreachable" in _error(resp)


async def test_routes(ca: CertificateAuthority) -> None:
    api = _api(ca)
    health = await api.handle(_req("/v1/health", method="GET"))
    assert (health.status, json.loads(health.body)) == (200, {"status": "ok"})
    roots = await api.handle(_req("/v1/ca/roots", method="GET"))
    assert (roots.status, roots.body) == (200, ca.roots_pem)
    assert (await api.handle(_req("/v1/sign/node", method="GET"))).status == 405
    assert (await api.handle(_req("/v2/anything", method="GET"))).status == 404


async def test_weak_csr_key_is_refused_with_400(ca: CertificateAuthority) -> None:
    """An RSA-1024 key (proof of possession and all) is not signed: 400 naming the key."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.unit.test_identity_keys import _csr_for

    doc = {"csr": _csr_for(rsa.generate_private_key(65537, 1024)).decode()}
    resp = await _api(ca).handle(_req("/v1/sign/node", doc))
    assert resp.status == 400
    assert "CSR key is RSA 1024 bits" in _error(resp)
