"""systemd's protocol from our side: notifications on a real datagram socket, the watchdog
interval, and listening sockets inherited the way systemd passes them (fd 3, env vars)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from nodemesh import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(5)
    yield s, str(tmp_path / "notify")
    s.close()


def test_notify_sends_every_state_in_one_datagram(notify_socket) -> None:  # type: ignore[no-untyped-def]
    s, path = notify_socket
    assert sdnotify.notify("READY=1", "STATUS=serving", env={"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=serving"


def test_abstract_socket_names_start_with_at() -> None:
    name = f"nodemesh-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        assert sdnotify.notify("STOPPING=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"
    finally:
        s.close()


def test_without_systemd_or_with_a_gone_socket_nothing_breaks(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], want: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == want


async def test_watchdog_pings_from_the_loop(notify_socket, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    s, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    async with trio.open_nursery() as nursery:
        await nursery.start(sdnotify.serve_watchdog)
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    s.setblocking(False)
    pings = 0
    while pings < 100:
        try:
            assert s.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        pings += 1
    assert 3 <= pings <= 10


CHILD = textwrap.dedent(
    """
    import os, sys, trio
    from nodemesh import sdnotify
    from nodemesh.transport.listen import ListenError, open_listener

    async def main():
        port = int(sys.argv[1])
        fds = sdnotify.listen_fds()
        assert "LISTEN_FDS" not in os.environ  # taken once, never passed on
        if sys.argv[2] == "wrong":
            try:
                await open_listener(("127.0.0.1", port + 1), "outbound", fds)
            except ListenError as e:
                print("ERR", e, flush=True)
            return
        lst = await open_listener(("127.0.0.1", port), "outbound", fds)
        print("ready", sorted(fds) == [], flush=True)
        conn = await lst.accept()
        await conn.send_all(b"hello from the child")
        await conn.aclose()

    trio.run(main)
    """
)


def _child(sock: socket.socket, mode: str) -> subprocess.Popen[str]:
    """A process that gets ``sock`` as fd 3 with the env systemd would set."""
    port = sock.getsockname()[1]
    shell = (
        f"exec 3<&{sock.fileno()}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=outbound "
        f'exec "{sys.executable}" -c "$CHILD" {port} {mode}'
    )
    return subprocess.Popen(
        ["bash", "-c", shell],
        pass_fds=(sock.fileno(),),
        env={**os.environ, "CHILD": CHILD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_an_inherited_socket_is_served_and_keeps_its_queue() -> None:
    parent = socket.socket()
    parent.bind(("127.0.0.1", 0))
    parent.listen(16)
    # A client connects *before* any process serves: it waits in the queue, not refused.
    early = socket.create_connection(parent.getsockname(), timeout=10)
    child = _child(parent, "serve")
    try:
        assert early.recv(100) == b"hello from the child"
        out, err = child.communicate(timeout=20)
        assert child.returncode == 0, err
        assert out.startswith("ready True")
    finally:
        early.close()
        parent.close()
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=5)


def test_a_socket_on_another_port_is_refused_with_the_fix() -> None:
    parent = socket.socket()
    parent.bind(("127.0.0.1", 0))
    parent.listen(1)
    child = _child(parent, "wrong")
    try:
        out, err = child.communicate(timeout=20)
    finally:
        parent.close()
    assert child.returncode == 0, err
    assert "systemd passed outbound a socket on 127.0.0.1:" in out
    assert "make nodemesh.socket's ListenStream= for outbound match the config" in out
