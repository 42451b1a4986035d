"""The few Consul calls the controller makes, kept apart so they can move into discovery/.

py-consul is blocking, so every call runs in a worker thread with a short HTTP timeout (the
thread is abandoned on cancellation; the timeout bounds how long it lingers).  Connection and
API failures become ``ConsulUnavailable`` naming the Consul address.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import consul
import trio

from nodemesh.errors import NodemeshError

CONTROLLER_SERVICE = "nodemesh-controller"
CHECK_INTERVAL = "10s"
CHECK_TIMEOUT = "2s"
SERF_CHECK = "serfHealth"  # the check Consul keeps for every node's membership in the gossip

T = TypeVar("T")


class ConsulUnavailable(NodemeshError):
    """Consul could not be asked; the answer is unknown (not "no")."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str
    services: frozenset[str]  # service *names* registered on the node
    alive: bool  # its Serf health check (``serfHealth``) passes: the node is in the gossip pool


class Catalog:
    def __init__(self, address: tuple[str, int], token: str = "", *, timeout: float = 5.0) -> None:
        self.address = address
        self._token = token or None
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<Catalog consul={self.address[0]}:{self.address[1]}>"

    async def node(self, name: str) -> NodeInfo | None:
        """The node ``name`` as Consul's catalog has it, or None if Consul does not know it."""

        def call(c: Any) -> NodeInfo | None:
            _, data = c.catalog.node(name)
            if not data:
                return None
            services = data.get("Services") or {}
            _, checks = c.health.node(name)
            return NodeInfo(
                name=str(data["Node"]["Node"]),
                address=str(data["Node"]["Address"]),
                services=frozenset(str(s["Service"]) for s in services.values()),
                alive=any(
                    ch.get("CheckID") == SERF_CHECK and ch.get("Status") == "passing"
                    for ch in checks or ()
                ),
            )

        return await self._run(call)

    async def local_address(self) -> str:
        """The address the local Consul agent advertises for this node."""

        def call(c: Any) -> str:
            me = c.agent.self()
            return str(me["Member"]["Addr"])

        return await self._run(call)

    async def register_controller(self, service_id: str, address: str, port: int) -> None:
        def call(c: Any) -> None:
            check = consul.Check.tcp(address, port, CHECK_INTERVAL, timeout=CHECK_TIMEOUT)
            # Registered only once listening: start passing, or agents wait a whole interval
            # before they find any controller.
            check["Status"] = "passing"
            c.agent.service.register(
                CONTROLLER_SERVICE, service_id=service_id, address=address, port=port, check=check
            )

        await self._run(call)

    async def deregister_controller(self, service_id: str) -> None:
        await self._run(lambda c: c.agent.service.deregister(service_id))

    async def _run(self, call: Callable[[Any], T]) -> T:
        host, port = self.address

        def blocking() -> T:
            c = consul.Consul(
                host=host, port=port, token=self._token, connections_timeout=self._timeout
            )
            return call(c)

        try:
            return await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        except OSError as e:  # requests' errors are OSErrors
            raise ConsulUnavailable(
                f"Consul at {host}:{port} is unreachable ({type(e).__name__}); "
                "check that the local Consul agent runs and consul.address is right"
            ) from None
        except consul.ConsulException as e:
            raise ConsulUnavailable(f"Consul at {host}:{port} refused the request: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConsulUnavailable(
                f"Consul at {host}:{port} answered in an unexpected shape ({e!r})"
            ) from None
