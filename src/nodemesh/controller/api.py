"""The controller's HTTPS API: certificates for agents.

    GET  /v1/health        200 {"status": "ok"}
    GET  /v1/ca/roots      the trust bundle, PEM
    POST /v1/sign/node     Bearer <join token>, {"csr": PEM}                 -> node identity
    POST /v1/sign/service  mTLS with the node cert, {"csr": PEM, "service"}  -> svc identity
    POST /v1/metrics/report  mTLS with the node cert, an interval report      -> accepted
    GET  /v1/metrics?window=1m&by=service  any cert of this CA                -> rows
    (the metrics endpoints are specified in docs/observability.md)

Who may have which identity (the security of the whole mesh):
- a node identity goes to a join-token holder only for a node that Consul knows, and only
  when the request comes from that node's Consul address, so a token cannot mint other nodes;
- a service identity goes to a node (proven by its certificate) only for a service that Consul
  says is registered on that very node.
The identity always comes from these checks, never from the CSR (``CertificateAuthority``
enforces one URI SAN).

``ControllerApi.handle`` decides; ``serve_api`` is the thin trio + h11 server around it: bounded
heads and bodies, keep-alive, and one broken connection never touches another.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import math
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import h11
import trio

from nodemesh import log
from nodemesh.controller import metrics
from nodemesh.controller.audit import Issuance, IssuanceLog
from nodemesh.controller.catalog import ConsulUnavailable, NodeInfo
from nodemesh.controller.journal import JournalError, MetricsJournal
from nodemesh.discovery.snapshot import UNMESHED_SERVICES
from nodemesh.errors import IdentityError, NodemeshError
from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.spiffe import SpiffeId

_log = log.get("nodemesh.controller")

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 64 * 1024  # a CSR is under 1 KiB
MAX_REPORT_BODY = 4 * 1024 * 1024  # 500 series of compressed histograms, with room to spare
HANDSHAKE_TIMEOUT = 10.0  # seconds
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may sit between requests
REQUEST_TIMEOUT = 30.0  # seconds for one request to arrive in full once it started
LINGER_TIMEOUT = 2.0  # seconds to drain a refused request before closing
# Open connections, authenticated or not; more are closed at once.  A fleet's agents keep one
# kept-alive connection each while they report, so this is the fleet size one controller takes.
MAX_CONNECTIONS = 4096
MAX_BIG_BODIES = 16  # report bodies (up to MAX_REPORT_BODY) read at the same time
# A node's services as Consul last listed them vouch for its reports' labels this long; a
# label they do not cover asks Consul again, at most once per NODE_RECHECK_S per node.
NODE_FRESH_S = 30.0
NODE_RECHECK_S = 5.0
MAX_NODES_CACHED = 100_000  # more nodes than that: start over (a fleet is far smaller)
LINGER_BYTES = 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,126}")


class NodeDirectory(Protocol):
    """What the API needs from Consul (``controller.catalog.Catalog``)."""

    async def node(self, name: str) -> NodeInfo | None: ...


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer_ip: str
    peer: SpiffeId | None  # from the client certificate, if one was presented
    query: str = ""  # the target after "?", undecoded


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, doc: dict[str, Any]) -> Response:
        return cls(status, json.dumps(doc).encode() + b"\n")

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls.json(status, {"error": message})


class ApiError(NodemeshError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


REUSE_FACTOR = 3.0  # a dear answer may be reused for this many times its computing time
DEAR_S = 0.05  # below it, an answer is always fresh: small fleets' queries are exact at once


@dataclass(frozen=True)
class _Answer:
    slot: int  # the 10 s slot ``now`` was in: a new slot moves every window
    generation: int  # FleetMetrics.generation when the plan was taken
    taken: float  # time.monotonic() then
    reuse_s: float
    doc: dict[str, Any]


class ControllerApi:
    def __init__(
        self,
        ca: CertificateAuthority,
        catalog: NodeDirectory,
        join_token: str,
        datacenter: str,
        leaf_ttl: float,
        fleet: metrics.FleetMetrics | None = None,
        clock: Callable[[], float] = time.time,
        journal: MetricsJournal | None = None,
        audit: IssuanceLog | None = None,
    ) -> None:
        self.ca = ca
        self.audit = audit  # None: issuances are logged, not recorded on disk (tests)
        self.fleet = fleet if fleet is not None else metrics.FleetMetrics()
        self.journal = journal  # None: metrics live in memory only
        self._clock = clock
        self.catalog = catalog
        self._token = join_token.encode()
        self.datacenter = datacenter
        self.leaf_ttl = leaf_ttl
        self._querying = trio.Lock()  # one query computes at a time; the next may reuse it
        self._answers: dict[tuple[int, str, str], _Answer] = {}
        self._nodes: dict[str, tuple[float, frozenset[str]]] = {}  # node -> (asked, services)
        self._routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("GET", "/v1/health"): self._health,
            ("GET", "/v1/ca/roots"): self._roots,
            ("POST", "/v1/sign/node"): self._sign_node,
            ("POST", "/v1/sign/service"): self._sign_service,
            ("POST", "/v1/metrics/report"): self._metrics_report,
            ("GET", "/v1/metrics"): self._metrics_query,
        }
        # What each endpoint demands of the caller, decided from the head alone: the server
        # asks (``admit``) before it reads a body, so nobody it would refuse can make it hold
        # one (a 4 MiB report body was read before the certificate was looked at).
        self._gates: dict[tuple[str, str], Callable[[Request], object]] = {
            ("POST", "/v1/sign/node"): lambda r: self._check_token(
                r.headers.get("authorization", "")
            ),
            ("POST", "/v1/sign/service"): self._gate_sign_service,
            ("POST", "/v1/metrics/report"): self._gate_report,
            ("GET", "/v1/metrics"): self._caller,
        }

    def admit(self, head: Request) -> Response | None:
        """The refusal for a request from its head (its ``body`` not read yet), or None: read
        the body and ``handle`` it."""
        try:
            self._route_and_gate(head)
        except ApiError as e:
            _log.info(
                "api_refused", path=head.path, peer=head.peer_ip, status=e.status, why=e.message
            )
            return Response.error(e.status, e.message)
        return None

    def _route_and_gate(self, req: Request) -> Callable[[Request], Awaitable[Response]]:
        route = self._routes.get((req.method, req.path))
        if route is None:
            if any(path == req.path for _, path in self._routes):
                raise ApiError(405, f"{req.method} is not allowed on {req.path}")
            raise ApiError(404, f"no such endpoint {req.path}; see docs/identity.md")
        gate = self._gates.get((req.method, req.path))
        if gate is not None:
            gate(req)
        return route

    async def handle(self, req: Request) -> Response:
        """The one rescue: every failure becomes one status and one sentence."""
        try:
            route = self._route_and_gate(req)
            return await route(req)
        except ApiError as e:
            _log.info(
                "api_refused", path=req.path, peer=req.peer_ip, status=e.status, why=e.message
            )
            return Response.error(e.status, e.message)
        except ConsulUnavailable as e:
            _log.warning("api_consul_unavailable", path=req.path, error=str(e))
            return Response.error(503, f"cannot check the request against Consul: {e}")

    # --- endpoints -----------------------------------------------------------------------------

    async def _health(self, req: Request) -> Response:
        return Response.json(200, {"status": "ok"})

    async def _roots(self, req: Request) -> Response:
        return Response(200, self.ca.roots_pem, "application/x-pem-file")

    async def _sign_node(self, req: Request) -> Response:
        csr_pem, _ = _parse_body(req.body, need_service=False)
        csr = _load_csr(csr_pem)
        asked = keys.csr_identity(csr)
        if asked is None or asked.kind != "node" or not self._ours(asked):
            want = f"spiffe://{self.ca.trust_domain}/dc/{self.datacenter}/node/<node>"
            raise ApiError(400, f"the CSR must ask for exactly one URI SAN {want}, got {asked}")
        node = await self._known_node(asked.name)
        if not _same_ip(node.address, req.peer_ip):
            raise ApiError(
                403,
                f"request comes from {req.peer_ip} but Consul has node {node.name!r} at "
                f"{node.address}; request the node certificate from the node itself",
            )
        return self._issue(csr_pem, asked, req)

    async def _sign_service(self, req: Request) -> Response:
        caller = self._gate_sign_service(req)
        csr_pem, service = _parse_body(req.body, need_service=True)
        _load_csr(csr_pem)
        if service in UNMESHED_SERVICES:
            # svc/nodemesh-controller is the controller's own SPIFFE ID: anyone who could
            # register that name in Consul on a node was handed it.
            raise ApiError(
                403,
                f"service {service!r} is nodemesh's or Consul's own and is never meshed, so it "
                "gets no service identity; register the app under another name",
            )
        node = await self._known_node(caller.name)
        if service not in node.services:
            raise ApiError(
                403,
                f"Consul has no service {service!r} registered on node {node.name!r}; "
                "register it there first",
            )
        return self._issue(
            csr_pem, spiffe.service_id(self.ca.trust_domain, self.datacenter, service), req
        )

    async def _metrics_report(self, req: Request) -> Response:
        caller = self._gate_report(req)
        try:
            doc = json.loads(req.body)
            report = metrics.parse_report(doc)
        except (ValueError, RecursionError) as e:  # BadReport; JSON that does not parse
            why = str(e) if isinstance(e, metrics.BadReport) else "the body is not valid JSON"
            raise ApiError(400, f"bad metrics report: {why}") from None
        if report.agent != caller.uri:
            raise ApiError(403, f"agent = {report.agent!r} but the client certificate is {caller}")
        report, doc = await self._attributed(report, doc)
        if self.journal is None:
            done = self.fleet.ingest(report, self._clock())
        else:
            self._check_replayed()
            try:  # on disk before the 200 (controller/journal.py)
                done = self.journal.record(self.fleet, doc, report, self._clock())
            except JournalError as e:
                raise ApiError(503, str(e)) from None
        if done.ahead:
            _log.warning("metrics_report_ahead", agent=report.agent, seq=report.seq,
                         ahead_s=round(done.ahead, 1))  # fmt: skip
            raise ApiError(
                400,
                f"bad metrics report: end = {report.end:.0f} is {done.ahead:.0f}s ahead of the "
                f"controller's clock (at most {metrics.MAX_CLOCK_SKEW_S:g}s is accepted); "
                "sync the agent's clock (NTP)",
            )
        if done.late:
            _log.info("metrics_report_late", agent=report.agent, seq=report.seq)
        return Response.json(200, {"accepted": True, "duplicate": done.duplicate})

    async def _attributed(
        self, report: metrics.Report, doc: dict[str, Any]
    ) -> tuple[metrics.Report, dict[str, Any]]:
        """``report`` and its ``doc`` (what the journal keeps) without the series its node
        cannot be held to (``metrics.attribute``), each refusal logged with its labels."""
        asked, services = self._nodes.get(report.host, (-math.inf, frozenset()))
        now = time.monotonic()
        if now - asked >= NODE_FRESH_S:
            asked, services = await self._node_services(report.host, now)
        kept, series, tcp = metrics.attribute(report, services)
        if kept is not report and now - asked >= NODE_RECHECK_S:
            asked, services = await self._node_services(report.host, now)
            kept, series, tcp = metrics.attribute(report, services)
        if kept is report:
            return report, doc
        keep, keep_tcp = set(series), set(tcp)
        first = next((s for i, s in enumerate(report.series) if i not in keep), None)
        if first is not None:
            direction, service, peer = first.labels[:3]
            why = _unattributed_why(direction, service, report.host, services)
        else:  # only TCP figures: an inbound one for a service not on the node
            t = next(t for i, t in enumerate(report.tcp) if i not in keep_tcp)
            direction, service, peer = t.direction, t.service, ""
            why = f"TCP figures for {t.service!r}, which Consul does not have on {report.host!r}"
        refused = len(report.series) - len(series) + len(report.tcp) - len(tcp)
        self.fleet.overflow.unattributed += refused
        _log.warning(
            "metrics_series_unattributed", agent=report.agent, seq=report.seq,
            direction=direction, service=service, peer=peer, why=why, refused=refused,
        )  # fmt: skip
        doc = {
            **doc,
            "series": [doc["series"][i] for i in series],
            "tcp": [doc.get("tcp", [])[i] for i in tcp],
        }
        return kept, doc

    async def _node_services(self, name: str, now: float) -> tuple[float, frozenset[str]]:
        node = await self.catalog.node(name)
        services = node.services if node is not None and node.name == name else frozenset()
        if len(self._nodes) >= MAX_NODES_CACHED:
            self._nodes.clear()
        self._nodes[name] = (now, services)
        return now, services

    async def _metrics_query(self, req: Request) -> Response:
        self._check_replayed()
        args = dict(urllib.parse.parse_qsl(req.query))
        try:
            window = metrics.parse_window(args.get("window", "1m"))
            by, direction = args.get("by", "service"), args.get("direction", "inbound")
            async with self._querying:
                doc = await self._answer(window, by, direction)
        except metrics.BadReport as e:
            raise ApiError(400, str(e)) from None
        return Response.json(200, doc)

    async def _answer(self, window: int, by: str, direction: str) -> dict[str, Any]:
        """The answer, computed in a worker thread so reports keep being accepted meanwhile
        (``metrics.QueryPlan``), or a recent one again: unchanged since (nothing accepted),
        or, if it took ``DEAR_S`` or more, younger than ``REUSE_FACTOR`` times that, within its
        slot.  The second bounds what repeated queries (each ``nodemesh top`` polls once a
        second) cost a large fleet's controller: at most about 1 / (1 + REUSE_FACTOR) of a
        core (at 1,000 agents an answer may then be a few seconds old)."""
        now = self._clock()
        key, slot = (window, by, direction), math.floor(now / metrics.SLOT_S)
        started = time.monotonic()
        hit = self._answers.get(key)
        if (
            hit is not None
            and hit.slot == slot
            and (hit.generation == self.fleet.generation or started - hit.taken < hit.reuse_s)
        ):
            return hit.doc
        plan = self.fleet.plan(now, window, by, direction)
        generation = self.fleet.generation
        doc = await trio.to_thread.run_sync(plan.answer)
        cost = time.monotonic() - started
        reuse_s = REUSE_FACTOR * cost if cost >= DEAR_S else 0.0
        self._answers = {k: a for k, a in self._answers.items() if a.slot == slot}
        self._answers[key] = _Answer(slot, generation, started, reuse_s, doc)
        return doc

    # --- checks --------------------------------------------------------------------------------

    def _check_token(self, header: str) -> None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing 'Authorization: Bearer <join token>' header")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise ApiError(
                401, "the join token does not match this cluster's; check join_token_file"
            )

    def _gate_sign_service(self, req: Request) -> SpiffeId:
        caller = req.peer
        if caller is None:
            raise ApiError(401, "this endpoint needs the node's certificate as TLS client cert")
        if caller.kind != "node" or not self._ours(caller):
            raise ApiError(403, f"{caller} is not a node of datacenter {self.datacenter!r}")
        return caller

    def _gate_report(self, req: Request) -> SpiffeId:
        caller = self._caller(req)
        if caller.kind != "node":
            raise ApiError(403, f"{caller} is not a node; agents report with their node cert")
        return caller

    def _check_replayed(self) -> None:
        if self.journal is not None and not self.journal.ready:
            raise ApiError(
                503, "the controller is still replaying its metrics journal; retry in a moment"
            )

    def _caller(self, req: Request) -> SpiffeId:
        if req.peer is None:
            raise ApiError(401, "this endpoint needs a certificate of this mesh as TLS client cert")
        if not self._ours(req.peer):
            raise ApiError(403, f"{req.peer} is not of datacenter {self.datacenter!r}")
        return req.peer

    def _ours(self, ident: SpiffeId) -> bool:
        return ident.trust_domain == self.ca.trust_domain and ident.datacenter == self.datacenter

    async def _known_node(self, name: str) -> NodeInfo:
        """The node ``name`` exactly as Consul names it, alive in Consul's gossip, or 403.

        Consul looks node names up without regard to case, so ``WEB-1`` finds ``web-1``: a
        second identity for one node unless the names are compared here.  A node Consul has
        marked failed (its ``serfHealth`` check critical) stays in the catalog for days; its
        identity must not go to whoever holds the join token and its old address."""
        node = await self.catalog.node(name)
        if node is None:
            raise ApiError(
                403, f"node {name!r} is not in Consul's catalog; join it to Consul first"
            )
        if node.name != name:
            raise ApiError(
                403,
                f"Consul names this node {node.name!r}, not {name!r}; node names are exact: "
                "use the name the node has in Consul",
            )
        if not node.alive:
            raise ApiError(
                403,
                f"node {name!r} is not alive in Consul (its serfHealth check is not passing); "
                "start its Consul agent and let it join before asking for identities",
            )
        return node

    def _issue(self, csr_pem: bytes, identity: SpiffeId, req: Request) -> Response:
        try:
            chain = self.ca.sign_csr(csr_pem, identity, self.leaf_ttl)
        except IdentityError as e:
            raise ApiError(400, str(e)) from None
        info = keys.leaf_info(chain)
        entry = Issuance(
            time=self._clock(),
            identity=str(identity),
            serial=format(info.serial, "x"),
            not_after=info.not_after,
            requester_ip=req.peer_ip,
            requester=str(req.peer) if req.peer is not None else "join token",
            key_sha256=keys.key_sha256(chain),
        )
        if self.audit is not None:
            try:  # on the record before the certificate leaves: never signed off it
                self.audit.record(entry)
            except IdentityError as e:
                _log.error("certificate_not_recorded", identity=str(identity), error=str(e))
                raise ApiError(503, str(e)) from None
        _log.info("certificate_issued", **dataclasses.asdict(entry))
        return Response.json(
            200,
            {
                "certificate": chain.decode(),
                "roots": self.ca.roots_pem.decode(),
                "not_after": info.not_after,
            },
        )


def _unattributed_why(direction: str, service: str, node: str, services: frozenset[str]) -> str:
    if direction == "inbound" and service not in services:
        return f"Consul has no service {service!r} on node {node!r}"
    if direction == "inbound":
        return "the caller is not an identity of this mesh"
    return f"the caller is neither node {node!r} nor one of its services"


def _parse_body(body: bytes, *, need_service: bool) -> tuple[bytes, str]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise ApiError(400, 'the body is not valid JSON; send {"csr": "<PEM>"}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("csr"), str):
        raise ApiError(400, 'the body must be a JSON object with a string field "csr"')
    service = doc.get("service", "")
    if need_service and (not isinstance(service, str) or not _NAME.fullmatch(service)):
        raise ApiError(400, f'"service" = {service!r} is not a valid Consul service name')
    return str(doc["csr"]).encode(), str(service)


def _load_csr(csr_pem: bytes) -> Any:
    try:
        return keys.load_csr(csr_pem)
    except IdentityError as e:
        raise ApiError(400, str(e)) from None


def _same_ip(a: str, b: str) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(ia, ipaddress.IPv6Address) and ia.ipv4_mapped:
        ia = ia.ipv4_mapped
    if isinstance(ib, ipaddress.IPv6Address) and ib.ipv4_mapped:
        ib = ib.ipv4_mapped
    return ia == ib


# --- the server ----------------------------------------------------------------------------------


async def serve_api(
    api: ControllerApi,
    listen: tuple[str, int],
    ssl_context: Callable[[], ssl.SSLContext],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API on ``listen``; ``ssl_context()`` is asked per connection (rotation)."""
    host, port = listen
    listeners = await trio.open_tcp_listeners(port, host=host)
    big_bodies = trio.Semaphore(MAX_BIG_BODIES)
    open_now = 0
    refused_at = -math.inf

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal open_now, refused_at
        if open_now >= MAX_CONNECTIONS:  # closed at once: no TLS, no buffers
            if trio.current_time() - refused_at >= 10.0:  # one line per 10 s, not per attempt
                refused_at = trio.current_time()
                _log.warning("api_connections_full", limit=MAX_CONNECTIONS)
            await trio.aclose_forcefully(stream)
            return
        open_now += 1
        try:
            await _serve_connection(api, stream, ssl_context(), big_bodies)
        finally:
            open_now -= 1

    await trio.serve_listeners(handler, listeners, task_status=task_status)


async def _serve_connection(
    api: ControllerApi, tcp: trio.SocketStream, ctx: ssl.SSLContext, big_bodies: trio.Semaphore
) -> None:
    try:
        peer_ip = str(tcp.socket.getpeername()[0])
    except OSError:  # reset before we even looked: nothing to serve
        await trio.aclose_forcefully(tcp)
        return
    stream = trio.SSLStream(tcp, ctx, server_side=True, https_compatible=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
        await _serve_http(api, stream, peer_ip, tls.peer_identity(stream), big_bodies)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as e:
        # Garbage instead of TLS, resets, slow clients: the client's problem, not ours.
        _log.debug("api_conn_closed", peer=peer_ip, why=repr(e.__cause__ or e))
    except Exception:
        _log.exception("api_conn_crashed", peer=peer_ip)
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_http(
    api: ControllerApi,
    stream: trio.SSLStream[trio.SocketStream],
    peer_ip: str,
    peer: SpiffeId | None,
    big_bodies: trio.Semaphore,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        try:
            with trio.fail_after(IDLE_TIMEOUT):
                event = await _next_event(conn, stream)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request)
            if _head_size(event) > MAX_HEAD:
                # h11 bounds only *incomplete* heads; one that completes in the last read
                # slips past it, so the size is checked again here.
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            path, _, query = event.target.decode("ascii", "replace").partition("?")
            method = event.method.decode("ascii", "replace")
            head = Request(method, path, headers, b"", peer_ip, peer, query)
            refused = api.admit(head)
            if refused is not None:  # before a byte of the body: it is never read
                await _send(conn, stream, refused)
                await _linger(stream)
                return
            with trio.fail_after(REQUEST_TIMEOUT):
                if _body_limit(event.target) > MAX_BODY:  # few large bodies read at once
                    async with big_bodies:
                        body = await _read_body(conn, stream, event)
                else:
                    body = await _read_body(conn, stream, event)
        except h11.RemoteProtocolError as e:
            await _send(conn, stream, Response.error(e.error_status_hint, f"bad HTTP request: {e}"))
            await _linger(stream)
            return
        except _TooLarge:
            limit = _body_limit(event.target)
            await _send(conn, stream, Response.error(413, f"request body over {limit} bytes"))
            await _linger(stream)
            return
        await _send(conn, stream, await api.handle(dataclasses.replace(head, body=body)))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return  # the client asked to close, or HTTP/1.0
        conn.start_next_cycle()


def _head_size(head: h11.Request) -> int:
    return len(head.method) + len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)


class _TooLarge(Exception):
    pass


def _body_limit(target: bytes) -> int:
    # Only the metrics report is big; every other body stays at the CSR-sized bound.
    return MAX_REPORT_BODY if target.split(b"?", 1)[0] == b"/v1/metrics/report" else MAX_BODY


async def _linger(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Read and drop what the client is still sending before closing.

    Closing a socket with unread data makes the kernel send a RST, which can destroy our error
    response before the client reads it (nginx calls this lingering close).  Bounded in time
    and bytes so a client cannot hold the connection open with it.
    """
    budget = LINGER_BYTES
    with trio.move_on_after(LINGER_TIMEOUT):
        while budget > 0:
            data = await stream.receive_some(65536)
            if not data:
                return
            budget -= len(data)


async def _next_event(conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream]) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(16384)))


async def _read_body(
    conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream], head: h11.Request
) -> bytes:
    limit = _body_limit(head.target)
    for name, value in head.headers:
        if name == b"content-length" and int(value) > limit:
            raise _TooLarge  # refuse before reading a byte of it
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, stream)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise _TooLarge
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:  # ConnectionClosed mid-body
            raise h11.RemoteProtocolError("connection closed in the middle of the request body")


async def _send(
    conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream], resp: Response
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    closing = resp.status >= 400 and conn.their_state is not h11.DONE
    headers = [
        ("content-type", resp.content_type),
        ("content-length", str(len(resp.body))),
        ("cache-control", "no-store"),
    ]
    if closing:
        headers.append(("connection", "close"))
    if resp.status >= 400:
        headers.append(("x-nodemesh-error", HTTPStatus(resp.status).phrase.lower()))
    data = conn.send(
        h11.Response(
            status_code=resp.status, headers=headers, reason=HTTPStatus(resp.status).phrase
        )
    )
    data = (data or b"") + (conn.send(h11.Data(data=resp.body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
