"""The routes watch against a real Consul KV: tables appear, change, go, and bad ones are named."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import trio

from nodemesh.discovery.consul import ConsulClient
from nodemesh.discovery.routes import RouteTable
from nodemesh.discovery.watch import RoutesWatch
from nodemesh.telemetry.metrics import DEFAULT_ROUTE
from tests.integration.devconsul import DevConsul

pytestmark = pytest.mark.integration

Tables = dict[str, RouteTable]


class Counting(ConsulClient):
    calls = 0

    async def kv_tree(self, prefix: str, index: int = 0):  # type: ignore[no-untyped-def]
        Counting.calls += 1
        return await super().kv_tree(prefix, index)


async def _wait_for(seen: list[Tables], pred: Callable[[Tables], bool]) -> Tables:
    with trio.fail_after(10):
        while not (seen and pred(seen[-1])):
            await trio.sleep(0.05)
    return seen[-1]


async def test_tables_follow_kv_with_a_blocking_query(dev_consul: DevConsul) -> None:
    c = dev_consul.client()
    c.kv.delete("nodemesh/routes/", recurse=True)
    seen: list[Tables] = []
    watch = RoutesWatch(Counting(("127.0.0.1", dev_consul.http_port)), seen.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.serve)
        assert seen == [{}]  # no tables yet: every request is [default]

        users = {"routes": [{"name": "GET /users/{id}", "method": "GET", "path": "/users/\\d+"}]}
        c.kv.put("nodemesh/routes/web", json.dumps(users))
        t = await _wait_for(seen, lambda t: "web" in t)
        assert t["web"].classify(b"GET", b"/users/7") == "GET /users/{id}"
        assert t["web"].classify(b"GET", b"/users/x") == DEFAULT_ROUTE

        # Idle: the query blocks; a polling loop would have made dozens of calls.
        before = Counting.calls
        await trio.sleep(2)
        assert Counting.calls - before <= 1

        # A bad entry is skipped and the good one still applies; a garbage value is no table.
        mixed = {"routes": [{"name": "x", "path": "("}, {"name": "ok", "path": "/ok"}]}
        c.kv.put("nodemesh/routes/web", json.dumps(mixed))
        c.kv.put("nodemesh/routes/db", "not json")
        t = await _wait_for(seen, lambda t: "db" in t)
        assert [r.name for r in t["web"].routes] == ["ok"]
        assert t["db"].routes == ()

        c.kv.delete("nodemesh/routes/", recurse=True)
        await _wait_for(seen, lambda t: t == {})
        nursery.cancel_scope.cancel()


async def test_start_does_not_wait_for_an_absent_consul() -> None:
    seen: list[Tables] = []
    watch = RoutesWatch(ConsulClient(("127.0.0.1", 1)), seen.append)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(watch.serve)
        assert seen == []  # nothing published: the agent keeps its (empty) tables
        nursery.cancel_scope.cancel()
