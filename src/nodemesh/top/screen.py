"""``nodemesh top``'s thin curses layer: fetch rows, read keys, draw ``model.lines``.

Two trio tasks share one ``Feed``: the fetcher asks the controller every second (a failed or
slow fetch becomes a status line, never an exit, and the next second tries again); the screen
loop polls keys without blocking and redraws.  Keys and drawing are decided in ``top.model``.
"""

from __future__ import annotations

import contextlib
import curses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from nodemesh.errors import NodemeshError
from nodemesh.top.model import View, lines, parse_rows, press

REFRESH = 1.0  # seconds between fetches; linkerd viz top refreshes about as often
# Seconds one fetch may take before the controller counts as unreachable.  A refused or
# reset connection fails at once; this is for a hung one.  A controller of 1,000 agents takes
# a few seconds to compute a 1m by=edge_route answer (docs/benchmarks.md), which is slow, not
# gone.
FETCH_TIMEOUT = 10.0
KEY_POLL = 0.05  # seconds between key polls: responsive without spinning a core
UNREACHABLE = "controller unreachable, retrying"

# (rows over the window, rows over the newest 10 s slot), both ``by=edge`` answers.
Fetch = Callable[[], Awaitable[tuple[Sequence[Any], Sequence[Any]]]]


@dataclass
class Feed:
    view: View
    changed: bool = True


async def serve_fetches(
    fetch: Fetch, feed: Feed, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started()
    while True:
        try:
            with trio.fail_after(FETCH_TIMEOUT):
                window, last = await fetch()
        except (NodemeshError, trio.TooSlowError):
            # Shown on the title line; a log line would scribble over the full-screen view.
            feed.view = replace(feed.view, status=UNREACHABLE)
        else:
            feed.view = replace(feed.view, rows=parse_rows(window, last), status="")
        feed.changed = True
        await trio.sleep(REFRESH)


def _key(raw: int | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return curses.keyname(raw).decode("ascii", "replace")
    except ValueError:
        return ""


def draw(scr: curses.window, view: View) -> None:
    height, width = scr.getmaxyx()
    scr.erase()
    for y, text in enumerate(lines(view, width, height)):
        attr = curses.A_REVERSE if y == 1 else curses.A_BOLD if y == 0 else curses.A_NORMAL
        # Never write the bottom-right cell: curses raises after moving the cursor past it.
        with contextlib.suppress(curses.error):
            scr.addnstr(y, 0, text, max(width - 1, 0), attr)
    scr.refresh()


async def run_top(scr: curses.window, fetch: Fetch, service: str = "") -> None:
    """Until ``q``.  ``service`` starts the view filtered, as ``f`` would."""
    feed = Feed(View(service=service, status="connecting"))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_fetches, fetch, feed)
        while True:
            quit_ = False
            while not quit_:
                try:
                    raw = scr.get_wch()
                except curses.error:  # no key waiting
                    break
                key = _key(raw)
                if key == "KEY_RESIZE":
                    curses.update_lines_cols()
                feed.view, quit_ = press(feed.view, key)
                feed.changed = True
            if quit_:
                nursery.cancel_scope.cancel()
                return
            if feed.changed:
                feed.changed = False
                draw(scr, feed.view)
            await trio.sleep(KEY_POLL)


def run(fetch: Fetch, service: str = "") -> None:
    """Take over the terminal, run the view, and give the terminal back however it ends."""

    def inside(scr: curses.window) -> None:
        with contextlib.suppress(curses.error):  # some terminals cannot hide the cursor
            curses.curs_set(0)
        curses.set_escdelay(25)  # Esc cancels the filter prompt without a one-second lag
        scr.nodelay(True)
        scr.keypad(True)
        trio.run(run_top, scr, fetch, service)

    curses.wrapper(inside)
