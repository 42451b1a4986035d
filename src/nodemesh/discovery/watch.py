"""Watch the Consul catalog with blocking queries and publish ``Snapshot``s.

Theory of operation
-------------------
One task holds a blocking query on ``/v1/catalog/services``; for every service name it starts a
task holding a blocking query on ``/v1/health/service/<name>`` (all instances, with checks).
Watches never poll: each query returns only when Consul's index moves or the wait expires.
Whenever a watch sees a change it stores the raw answer and sets ``dirty``; one publisher task
rebuilds the snapshot (pure, ``snapshot.build``) and hands it to ``publish``.

When Consul is unreachable every watch backs off (1 s doubling to 15 s, jittered) and the last
published snapshot stays in force: the data path keeps routing to the last known endpoints.
Consul's index rules: an index that goes backwards resets to 0; an index of 0 is never sent.

``RoutesWatch`` holds one more blocking query, on the KV tree ``nodemesh/routes/``, and publishes
every service's route table (``discovery/routes.py``) whenever it changes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import trio

from nodemesh import log
from nodemesh.discovery import routes
from nodemesh.discovery.consul import ConsulClient, ConsulUnavailable
from nodemesh.discovery.snapshot import Snapshot, build

BACKOFF_MIN = 1.0
BACKOFF_MAX = 15.0
_log = log.get("nodemesh.discovery")


class CatalogWatch:
    def __init__(
        self, client: ConsulClient, local_node: str, publish: Callable[[Snapshot], None]
    ) -> None:
        self._client = client
        self._node = local_node
        self._publish = publish
        self._raw: dict[str, Any] = {}
        self._dirty = trio.Event()
        self._scopes: dict[str, trio.CancelScope] = {}
        self._first_round: set[str] | None = None
        self._ready = trio.Event()
        self.consul_ok = False

    def __repr__(self) -> str:
        return f"<CatalogWatch {self._node} services={len(self._raw)} ok={self.consul_ok}>"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_services, nursery)
            nursery.start_soon(self._publisher)
            await self._ready.wait()
            task_status.started()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            if self._first_round:  # wait until every service answered once
                continue
            snap = build(self._raw, self._node)
            for reason in snap.rejected:
                _log.warning("consul_entry_rejected", reason=reason)
            self._publish(snap)
            self._ready.set()

    async def _watch_services(self, nursery: trio.Nursery) -> None:
        index = 0
        backoff = BACKOFF_MIN
        while True:
            try:
                new_index, services = await self._client.services(index)
            except ConsulUnavailable as e:
                backoff = await self._failed(e, backoff)
                continue
            backoff = BACKOFF_MIN
            self.consul_ok = True
            index = 0 if new_index < index else new_index
            names = {s for s in services if isinstance(s, str)}
            if self._first_round is None:
                self._first_round = set(names)
                if not names:
                    self._dirty.set()
            for name in names - self._scopes.keys():
                scope = trio.CancelScope()
                self._scopes[name] = scope
                nursery.start_soon(self._watch_health, name, scope)
            for name in self._scopes.keys() - names:
                self._scopes.pop(name).cancel()
                self._raw.pop(name, None)
                self._dirty.set()

    async def _watch_health(self, name: str, scope: trio.CancelScope) -> None:
        index = 0
        backoff = BACKOFF_MIN
        with scope:
            while True:
                try:
                    new_index, entries = await self._client.health(name, index)
                except ConsulUnavailable as e:
                    backoff = await self._failed(e, backoff)
                    continue
                backoff = BACKOFF_MIN
                if new_index < index:
                    index = 0
                    continue
                changed = new_index != index or name not in self._raw
                index = new_index
                if changed:
                    self._raw[name] = entries
                    if self._first_round is not None:
                        self._first_round.discard(name)
                    self._dirty.set()

    async def _failed(self, e: ConsulUnavailable, backoff: float) -> float:
        if self.consul_ok or backoff == BACKOFF_MIN:
            _log.warning("consul_unreachable", error=str(e), retry_in=round(backoff, 1))
        self.consul_ok = False
        await trio.sleep(backoff * random.uniform(0.75, 1.25))
        return min(backoff * 2, BACKOFF_MAX)


class RoutesWatch:
    """Route tables from ``nodemesh/routes/<service>``; the last good ones stay while Consul is
    away, and an empty tree means every request is ``[default]``."""

    def __init__(
        self, client: ConsulClient, publish: Callable[[dict[str, routes.RouteTable]], None]
    ) -> None:
        self._client = client
        self._publish = publish

    def __repr__(self) -> str:
        return f"<RoutesWatch {self._client!r}>"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        index = 0
        backoff = BACKOFF_MIN
        last: Any = object()
        started = False
        while True:
            try:
                new_index, entries = await self._client.kv_tree(routes.PREFIX, index)
            except ConsulUnavailable as e:
                _log.warning("consul_unreachable", error=str(e), retry_in=round(backoff, 1))
                if not started:  # start without tables rather than wait for Consul
                    started = True
                    task_status.started()
                await trio.sleep(backoff * random.uniform(0.75, 1.25))
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            if new_index == 0:  # no index: a blocking query could not block; do not spin
                await trio.sleep(BACKOFF_MIN)
            index = 0 if new_index < index else new_index
            if entries != last:
                last = entries
                tables, rejected = routes.build(entries)
                for reason in rejected:
                    _log.warning("route_rejected", reason=reason)
                self._publish(tables)
                _log.info("routes_updated", services=sorted(tables))
            if not started:
                started = True
                task_status.started()
