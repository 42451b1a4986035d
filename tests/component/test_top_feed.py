"""``nodemesh top``'s fetcher: an absent or silent controller is a status line, then recovers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
import trio.testing

from nodemesh.identity.client import ControllerUnavailable
from nodemesh.top.model import View
from nodemesh.top.screen import FETCH_TIMEOUT, REFRESH, UNREACHABLE, Feed, serve_fetches
from tests.fixtures.controller import rows


class Controller:
    """Answers with the recorded edge rows, or fails the way it is told to."""

    def __init__(self) -> None:
        self.mode = "ok"  # "ok" | "down" | "silent"
        self.calls = 0

    async def fetch(self) -> tuple[Sequence[Any], Sequence[Any]]:
        self.calls += 1
        if self.mode == "down":
            raise ControllerUnavailable("controller at 127.0.0.1:4190 unreachable")
        if self.mode == "silent":
            await trio.sleep_forever()
        return rows("edge", "1m"), rows("edge", "10s")


async def test_outage_then_recovery(autojump_clock: trio.testing.MockClock) -> None:
    ctl, feed = Controller(), Feed(View(status="connecting"))
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fetches, ctl.fetch, feed)
        await trio.sleep(0.1)
        assert feed.view.status == "" and len(feed.view.rows) == 3

        ctl.mode = "down"
        await trio.sleep(REFRESH)
        assert feed.view.status == UNREACHABLE
        assert len(feed.view.rows) == 3  # the last rows stay on screen

        ctl.mode = "silent"
        await trio.sleep(REFRESH + FETCH_TIMEOUT)
        assert feed.view.status == UNREACHABLE  # a hung fetch is cut off, not waited on

        ctl.mode = "ok"
        await trio.sleep(REFRESH + FETCH_TIMEOUT)
        assert feed.view.status == ""
        nursery.cancel_scope.cancel()
    # about one fetch a second, never a spin (the silent phase is one hung fetch)
    assert 4 <= ctl.calls <= (trio.current_time() - started) / REFRESH + 1


async def test_filter_and_sort_survive_refreshes(autojump_clock: trio.testing.MockClock) -> None:
    ctl, feed = Controller(), Feed(View(sort="worst", service="web"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fetches, ctl.fetch, feed)
        await trio.sleep(3 * REFRESH)
        assert (feed.view.sort, feed.view.service) == ("worst", "web")
        nursery.cancel_scope.cancel()
