"""The catalog watch against a real Consul: blocking queries, changes, and Consul going away."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from nodemesh.discovery.consul import ConsulClient, ConsulUnavailable
from nodemesh.discovery.snapshot import Snapshot
from nodemesh.discovery.watch import CatalogWatch
from tests.integration.devconsul import NODE, DevConsul, start_dev_consul

pytestmark = pytest.mark.integration


class Counting(ConsulClient):
    """The real client, counting the queries it makes (to tell blocking from polling)."""

    calls = 0

    async def health(self, service: str, index: int = 0):  # type: ignore[no-untyped-def]
        Counting.calls += 1
        return await super().health(service, index)


async def _wait_for(snaps: list[Snapshot], pred, timeout: float = 10.0) -> Snapshot:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            if snaps and pred(snaps[-1]):
                return snaps[-1]
            await trio.sleep(0.05)


async def test_watch_follows_registrations_with_blocking_queries(dev_consul: DevConsul) -> None:
    c = dev_consul.client()
    c.agent.service.register("nodemesh", service_id="nodemesh-x", address="127.0.0.1", port=4143)
    c.agent.service.register("api", service_id="api-1", address="127.0.0.1", port=9100)
    snaps: list[Snapshot] = []
    client = Counting(("127.0.0.1", dev_consul.http_port))
    watch = CatalogWatch(client, NODE, snaps.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.serve)
        snap = await _wait_for(snaps, lambda s: "api" in s.endpoints)
        assert snap.resolve("127.0.0.1", 9100) == "api"
        assert snap.resolve("127.0.0.1", 8080) == "web"
        assert snap.agents[NODE] == ("127.0.0.1", 4143)
        assert "api" in snap.local and "web" in snap.local

        # Idle: blocking queries hold; a polling loop would make dozens of calls here.
        before = Counting.calls
        await trio.sleep(3)
        assert Counting.calls - before <= 2

        # A new instance shows up within moments, a removed one disappears.
        c.agent.service.register("api", service_id="api-2", address="127.0.0.1", port=9101)
        snap = await _wait_for(snaps, lambda s: len(s.endpoints.get("api", ())) == 2)
        assert snap.resolve("127.0.0.1", 9101) == "api"
        c.agent.service.deregister("api-2")
        c.agent.service.deregister("api-1")
        snap = await _wait_for(snaps, lambda s: "api" not in s.by_addr.values())
        assert snap.resolve("127.0.0.1", 9100) is None
        nursery.cancel_scope.cancel()
    c.agent.service.deregister("nodemesh-x")


async def test_watch_keeps_the_last_snapshot_when_consul_goes_away(tmp_path: Path) -> None:
    snaps: list[Snapshot] = []
    with start_dev_consul(tmp_path) as dev:
        c = dev.client()
        c.agent.service.register(
            "nodemesh", service_id="nodemesh-x", address="127.0.0.1", port=4143
        )
        c.agent.service.register("db", service_id="db-1", address="127.0.0.1", port=5432)
        watch = CatalogWatch(ConsulClient(("127.0.0.1", dev.http_port)), NODE, snaps.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.serve)
            last = await _wait_for(snaps, lambda s: "db" in s.endpoints)
            assert watch.consul_ok
            dev.proc.kill()
            dev.proc.wait(10)
            with trio.fail_after(15):
                while watch.consul_ok:
                    await trio.sleep(0.1)
            await trio.sleep(1)
            # Nothing new was published: the data path keeps routing on what it knew.
            assert snaps[-1] is last
            assert snaps[-1].resolve("127.0.0.1", 5432) == "db"
            nursery.cancel_scope.cancel()


async def test_unreachable_consul_is_one_clear_error() -> None:
    client = ConsulClient(("127.0.0.1", 1))
    with pytest.raises(ConsulUnavailable, match=r"Consul at 127\.0\.0\.1:1 did not answer"):
        await client.services()
