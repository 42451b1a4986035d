"""The one place nodemesh talks to Consul (py-consul, run in worker threads).

py-consul is blocking, so every call runs in ``trio.to_thread.run_sync`` with its own capacity
limiter (one thread per open blocking query; the default limiter of 40 would starve).  Blocking
queries use a ``wait`` of ``WATCH_WAIT`` so a cancelled, abandoned thread ends soon on its own.
Errors of any kind (refused, timeout, 5xx, non-JSON) become ``ConsulUnavailable`` naming the
address, so callers keep their last known state and retry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import consul
import requests
import trio

from nodemesh.errors import NodemeshError

WATCH_WAIT = "20s"  # blocking-query wait; Consul adds up to wait/16 of jitter
T = TypeVar("T")


class ConsulUnavailable(NodemeshError):
    """Consul could not be reached or answered nonsense."""


class ConsulClient:
    def __init__(self, address: tuple[str, int], token: str = "") -> None:
        self.address = address
        self._token = token or None
        self._limiter = trio.CapacityLimiter(512)
        self._local = functools.partial(
            consul.Consul, host=address[0], port=address[1], token=self._token
        )

    def __repr__(self) -> str:
        return f"<ConsulClient {self.address[0]}:{self.address[1]}>"

    async def _call(self, fn: Callable[[consul.Consul], T]) -> T:
        def run() -> T:
            # One client object per call: requests sessions are not thread-safe.
            c = self._local()
            try:
                return fn(c)
            finally:
                c.http.session.close()

        try:
            return await trio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=self._limiter)
        except (requests.RequestException, consul.ConsulException, ValueError) as e:
            host, port = self.address
            raise ConsulUnavailable(
                f"Consul at {host}:{port} did not answer ({type(e).__name__}: {e}); "
                "check that the local Consul agent is running"
            ) from None

    # -- reads ------------------------------------------------------------------------------

    async def leader(self) -> str:
        return str(await self._call(lambda c: c.status.leader()))

    async def services(self, index: int = 0) -> tuple[int, dict[str, Any]]:
        """``/v1/catalog/services``, blocking while ``index`` is current."""
        idx, data = await self._call(
            lambda c: c.catalog.services(index=index or None, wait=WATCH_WAIT)
        )
        return _index(idx), data if isinstance(data, dict) else {}

    async def health(self, service: str, index: int = 0) -> tuple[int, Any]:
        """``/v1/health/service/<service>`` (all instances, any health), blocking."""
        idx, data = await self._call(
            lambda c: c.health.service(service, index=index or None, wait=WATCH_WAIT)
        )
        return _index(idx), data

    async def kv_tree(self, prefix: str, index: int = 0) -> tuple[int, Any]:
        """Every KV entry under ``prefix`` (None when there is none), blocking."""
        idx, data = await self._call(
            lambda c: c.kv.get(prefix, index=index or None, wait=WATCH_WAIT, recurse=True)
        )
        return _index(idx), data

    async def node(self, node: str) -> dict[str, Any] | None:
        """``/v1/catalog/node/<node>``: the node's address and services, or None if unknown."""
        _, data = await self._call(lambda c: c.catalog.node(node))
        return data if isinstance(data, dict) else None

    # -- writes -----------------------------------------------------------------------------

    async def register(
        self,
        name: str,
        service_id: str,
        address: str,
        port: int,
        *,
        meta: dict[str, str] | None = None,
        check: dict[str, Any] | None = None,
    ) -> None:
        await self._call(
            lambda c: c.agent.service.register(
                name, service_id=service_id, address=address, port=port, meta=meta, check=check
            )
        )

    async def deregister(self, service_id: str) -> None:
        await self._call(lambda c: c.agent.service.deregister(service_id))


def _index(idx: Any) -> int:
    try:
        return max(int(idx), 0)
    except (TypeError, ValueError):
        return 0


http_check = consul.Check.http
tcp_check = consul.Check.tcp
