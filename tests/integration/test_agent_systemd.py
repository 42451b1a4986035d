"""The agent under systemd's protocol, played by this test: a real agent process, a real
controller and Consul.

This test does what systemd does for ``nodemesh.socket`` + ``nodemesh.service``: it binds the
three listening sockets itself, hands them to the agent as fds 3-5 with ``LISTEN_FDS``, and
listens on ``NOTIFY_SOCKET`` for READY / RELOADING / STOPPING / WATCHDOG.  Then it restarts the
agent the way ``systemctl restart`` does (SIGTERM, wait, start a new process on the same
sockets) and shows that a connection opened in between is queued and served, never refused.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.integration.test_agent_stop_metrics import Setup, controller, setup  # noqa: F401

pytestmark = pytest.mark.integration
NODEMESH = Path(sys.executable).parent / "nodemesh"
HIGH_FD = 60  # the sockets are parked here before the shell moves them to 3, 4, 5
START_TIMEOUT = 30.0


def _ports(toml: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r'^(\w+) = "127\.0\.0\.1:(\d+)"', toml, re.M)}


@pytest.fixture
def sockets(setup: Setup) -> Iterator[dict[str, socket.socket]]:  # noqa: F811
    """systemd's part: the listening sockets, owned by this test for the whole run."""
    ports = _ports(setup.agent_toml.read_text())
    out = {}
    for name in ("outbound", "inbound", "admin"):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ports[name]))
        s.listen(64)
        out[name] = s
    yield out
    for s in out.values():
        s.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    s.bind(path)
    s.setblocking(False)
    yield s, path
    s.close()


async def _expect(sock: socket.socket, want: str, timeout: float = START_TIMEOUT) -> list[str]:
    """Datagrams until one carries ``want``; all of them."""
    seen: list[str] = []
    with trio.fail_after(timeout):
        while True:
            await trio.lowlevel.wait_readable(sock)
            msg = sock.recv(4096).decode()
            seen.append(msg)
            if want in msg.split("\n"):
                return seen


class Unit:
    """One life of the agent as systemd starts it."""

    def __init__(self, where: Setup, sockets: dict[str, socket.socket], notify: str, life: int):
        self.setup, self.sockets, self.notify = where, sockets, notify
        self.log = where.tmp / f"unit-{life}.log"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        order = ("outbound", "inbound", "admin")
        parked = []
        for i, name in enumerate(order):
            os.dup2(self.sockets[name].fileno(), HIGH_FD + i)
            parked.append(HIGH_FD + i)
        moves = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(parked))
        closes = " ".join(f"{fd}<&-" for fd in parked)
        script = (
            f"exec {moves} {closes}; export LISTEN_PID=$$ LISTEN_FDS=3 "
            "LISTEN_FDNAMES=nodemesh.socket:nodemesh.socket:nodemesh.socket; "
            f'exec "{NODEMESH}" agent --config "{self.setup.agent_toml}"'
        )
        env = {**os.environ, "NOTIFY_SOCKET": self.notify, "WATCHDOG_USEC": "1000000"}
        try:
            with self.log.open("wb") as out:
                self.proc = await trio.lowlevel.open_process(
                    ["bash", "-c", script], pass_fds=parked, env=env, stdout=out, stderr=out
                )
        finally:
            for fd in parked:
                os.close(fd)

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            return await self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@asynccontextmanager
async def unit(
    where: Setup, sockets: dict[str, socket.socket], notify: str, life: int
) -> AsyncIterator[Unit]:
    u = Unit(where, sockets, notify, life)
    try:
        await u.start()
        yield u
    finally:
        if u.proc is not None and u.proc.returncode is None:
            u.proc.kill()
            with trio.move_on_after(5):
                await u.proc.wait()


async def _get(port: int, path: str, sock: trio.SocketStream | None = None) -> str:
    stream = sock or await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(START_TIMEOUT):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data.decode(errors="replace")


async def test_notify_watchdog_reload_and_a_restart_that_refuses_nothing(
    setup: Setup,  # noqa: F811
    sockets: dict[str, socket.socket],
    notify: tuple[socket.socket, str],
) -> None:
    nsock, npath = notify
    admin = sockets["admin"].getsockname()[1]
    async with controller(setup):
        # Connected before any agent runs: the kernel queues it on systemd's socket.
        early = await trio.open_tcp_stream("127.0.0.1", admin)
        async with unit(setup, sockets, npath, 1) as first:
            seen = await _expect(nsock, "READY=1")
            assert any(m.startswith("STATUS=serving as") for s in seen for m in s.split("\n"))
            assert (await _get(admin, "/live", early)).startswith("HTTP/1.1 200")
            await _expect(nsock, "WATCHDOG=1", timeout=5)  # pinged from the agent's loop

            # Reload: a reloadable key applies, a listener change is reported as pending.
            toml = setup.agent_toml.read_text()
            changed = (
                toml.replace('level = "debug"', 'level = "info"').replace(
                    'grace = "5s"', 'grace = "4s"'
                )
                + '\n[inbound]\nidle_timeout = "30s"\n'
            )
            changed = re.sub(r'admin = "127\.0\.0\.1:\d+"', 'admin = "127.0.0.1:1"', changed)
            setup.agent_toml.write_text(changed)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGHUP)
            seen = await _expect(nsock, "READY=1", timeout=10)
            assert any("RELOADING=1" in s for s in seen)
            with trio.fail_after(10):
                while "config_reloaded" not in first.text():
                    await trio.sleep(0.1)
            line = next(ln for ln in first.text().splitlines() if "config_reloaded" in ln)
            assert "inbound_idle_timeout" in line and "shutdown_grace" in line
            assert '"needs_restart": ["admin_addr"]' in line

            # A bad config on reload is reported and changes nothing.
            setup.agent_toml.write_text(changed + '\n[outbound]\nconnect_timeout = "soon"\n')
            first.proc.send_signal(signal.SIGHUP)
            seen = await _expect(nsock, "READY=1", timeout=10)
            assert any("reload failed" in s and "outbound.connect_timeout" in s for s in seen)
            assert (await _get(admin, "/live")).startswith("HTTP/1.1 200")
            setup.agent_toml.write_text(toml)

            # systemctl restart: the old process drains and exits ...
            code = await first.stop()
            assert code == 0, first.text()[-2000:]
            assert "STOPPING=1" in "\n".join(await _expect(nsock, "STOPPING=1", timeout=1))
        # ... a client connects while no agent runs: queued, not refused ...
        between = await trio.open_tcp_stream("127.0.0.1", admin)
        async with unit(setup, sockets, npath, 2) as second:
            # ... and the next process, on the same sockets, answers it.
            assert (await _get(admin, "/live", between)).startswith("HTTP/1.1 200")
            await _expect(nsock, "READY=1")
            assert await second.stop() == 0
