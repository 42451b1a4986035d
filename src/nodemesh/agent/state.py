"""What the agent's servers share: config, the current catalog snapshot, identities, pools.

The snapshot and the route tables are replaced whole by the discovery watches and read by
reference on the hot path; balancers are created lazily per service and refreshed when the
snapshot's endpoint tuple for that service is a different object (an identity check, not a
comparison).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from nodemesh.config import AgentConfig
from nodemesh.discovery.routes import RouteTable
from nodemesh.discovery.snapshot import Endpoint, Snapshot
from nodemesh.identity import spiffe
from nodemesh.identity.spiffe import SpiffeId
from nodemesh.identity.store import IdentityStore
from nodemesh.outbound.balance import Balancer
from nodemesh.telemetry.metrics import Recorder


class AgentState:
    def __init__(self, cfg: AgentConfig, identities: IdentityStore, recorder: Recorder) -> None:
        self.cfg = cfg
        self.identities = identities
        self.recorder = recorder
        self.snapshot = Snapshot(local_node=cfg.node)
        self.routes: dict[str, RouteTable] = {}  # replaced whole by the routes watch
        self.snapshot_ready = trio.Event()
        self.listeners_ready = trio.Event()
        self.draining = False
        self._balancers: dict[str, Balancer[Endpoint]] = {}
        self.on_snapshot: list[Callable[[Snapshot], None]] = []
        self._source = self.node_identity

    def __repr__(self) -> str:
        return f"<AgentState {self.cfg.node} {self.snapshot!r} draining={self.draining}>"

    def publish(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self._source = self._pick_source(snap)
        for name in list(self._balancers):
            if name not in snap.endpoints:
                del self._balancers[name]
        for cb in self.on_snapshot:
            cb(snap)
        self.snapshot_ready.set()

    def publish_routes(self, tables: dict[str, RouteTable]) -> None:
        self.routes = tables

    def balancer(self, service: str) -> Balancer[Endpoint]:
        eps = self.snapshot.endpoints.get(service, ())
        b = self._balancers.get(service)
        if b is None:
            b = self._balancers[service] = Balancer(service)
        if b.source is not eps:
            b.update(eps)
        return b

    def service_identity(self, service: str) -> SpiffeId:
        return spiffe.service_id(self.cfg.trust_domain, self.cfg.datacenter, service)

    @property
    def node_identity(self) -> SpiffeId:
        return spiffe.node_id(self.cfg.trust_domain, self.cfg.datacenter, self.cfg.node)

    def source_identity(self) -> SpiffeId:
        """The identity outbound connections present (fixed per snapshot: read per request)."""
        return self._source

    def presented_source(self) -> str:
        """The SPIFFE ID URI a new outbound request speaks as: ``source_identity()`` once its
        certificate is held, the node's until then (what a mesh connection would present).
        Requests ride only connections opened as this identity, and are counted under it, so
        the peer's view and this agent's metrics agree (read per request)."""
        src = self._source
        if src.kind != "node" and self.identities.held(src) is None:
            src = self.node_identity
        return src.uri

    def _pick_source(self, snap: Snapshot) -> SpiffeId:
        """A host running exactly one meshed service speaks as that service; a host with several
        (or none) speaks as its node, since the agent cannot yet tell which local process
        opened the connection."""
        meshed = set(snap.by_addr.values())
        local = [s for s in snap.local if s in meshed]
        if len(local) == 1:
            return self.service_identity(local[0])
        return self.node_identity

    def ready(self) -> bool:
        return (
            self.snapshot_ready.is_set()
            and self.listeners_ready.is_set()
            and self.identities.ready()
            and not self.draining
        )
