"""``nodemesh top`` in a real terminal: tmux runs it against a controller on loopback.

The controller is a recorded one with real mTLS (``tests/fakecontroller.py``), stopped and
restarted on the same port to play an outage.  tmux runs on a private socket, so no tmux
server of the machine is touched, and the session is killed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakecontroller import FakeController, Files, fake_controller

pytestmark = pytest.mark.system
NODEMESH = Path(sys.executable).parent / "nodemesh"
WAIT = 15.0  # seconds any screen change may take: top refreshes every second


class Tmux:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.session = f"nmtop-{uuid.uuid4().hex[:6]}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", self.session).splitlines()

    def wait(self, what: str, ok: Callable[[list[str]], bool]) -> list[str]:
        deadline = time.monotonic() + WAIT
        seen: list[str] = []
        while time.monotonic() < deadline:
            seen = self.screen()
            if ok(seen):
                return seen
            time.sleep(0.1)
        pytest.fail(f"top never showed {what}; the screen was:\n" + "\n".join(seen))

    def alive(self) -> bool:
        try:
            self("has-session", "-t", self.session)
        except subprocess.CalledProcessError:
            return False
        return True


@pytest.fixture
def top(tmp_path: Path) -> Iterator[tuple[Tmux, FakeController, Path]]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing; scripts/bootstrap installs it")
    with fake_controller(tmp_path) as (fake, files):
        tmux = Tmux(tmp_path / "tmux.sock")
        rc = tmp_path / "rc"
        cmd = " ".join([str(NODEMESH), "top", *_flags(fake, files)])
        env = {**os.environ, "TERM": "xterm-256color"}
        subprocess.run(
            [
                *("tmux", "-S", str(tmux.socket), "-f", "/dev/null", "new-session", "-d"),
                *("-s", tmux.session, "-x", "130", "-y", "20"),
                f"{cmd}; echo $? > {rc}; sleep 60",
            ],
            env=env,
            timeout=10,
            check=True,
        )
        try:
            yield tmux, fake, rc
        finally:
            if tmux.alive():
                tmux("kill-server")


def _flags(fake: FakeController, files: Files) -> list[str]:
    return ["--controller", fake.address, "--ca-file", str(files.ca), "--cert", str(files.cert)]


def _rows(screen: list[str]) -> list[tuple[str, str]]:
    """(source, destination) of the table rows, top to bottom."""
    start = next(i for i, line in enumerate(screen) if line.startswith("Source"))
    return [tuple(line.split()[:2]) for line in screen[start + 1 :] if line.strip()]  # type: ignore[misc]


def _has_table(screen: list[str]) -> bool:
    return any(line.startswith("Source") for line in screen) and len(_rows(screen)) > 0


def test_rows_keys_resize_outage_and_quit(top: tuple[Tmux, FakeController, Path]) -> None:
    tmux, fake, rc = top
    screen = tmux.wait("the edge rows", lambda s: _has_table(s) and len(_rows(s)) == 3)
    assert "sort: count" in screen[0]
    # Sorted by count: shop->web 1100, load->shop 600, plaintext->web 100.
    assert _rows(screen) == [("shop", "web"), ("load", "shop"), ("unknown", "web")]
    web = next(line for line in screen if line.startswith("shop "))
    assert web.split()[2:4] == ["GET", "/users/{id}"]  # the route's method and path
    assert web.split()[4:] == ["1100", "0.3ms", "12.0ms", "0.8ms", "99.09%"]

    tmux("send-keys", "-t", tmux.session, "s")  # worst: the same order as count here
    tmux.wait("sort: worst", lambda s: "sort: worst" in s[0])
    tmux("send-keys", "-t", tmux.session, "s")  # best: load (1.0ms) before shop (0.3ms)
    screen = tmux.wait("sort: best", lambda s: "sort: best" in s[0])
    assert _rows(screen) == [("load", "shop"), ("shop", "web"), ("unknown", "web")]

    tmux("send-keys", "-t", tmux.session, "f")
    tmux.wait("the filter prompt", lambda s: s[0].startswith("filter by service"))
    tmux("send-keys", "-t", tmux.session, "web", "Enter")
    screen = tmux.wait("the web filter", lambda s: "filter: web" in s[0] and len(_rows(s)) == 2)
    assert _rows(screen) == [("shop", "web"), ("unknown", "web")]

    tmux("resize-window", "-t", tmux.session, "-x", "50", "-y", "12")
    screen = tmux.wait("a narrow table", lambda s: _has_table(s) and "Method" not in s[1])
    assert all(len(line) <= 50 for line in screen)
    assert "Count" in screen[1] and "Success Rate" in screen[1]

    fake.stop()
    tmux.wait("the outage", lambda s: "controller unreachable, retrying" in s[0])
    fake.start()  # the same port: top reconnects by itself
    tmux.wait("the reconnect", lambda s: "unreachable" not in s[0] and _has_table(s))
    assert len(fake.queries) >= 4  # it kept asking, every second

    tmux("send-keys", "-t", tmux.session, "q")
    deadline = time.monotonic() + WAIT
    while not rc.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rc.exists(), "top did not exit on q"
    assert rc.read_text().strip() == "0"
