"""Installing interception must not break connections the host already has: the operator's ssh
session, and ansible's, which is the one that runs ``systemctl start nodemesh-iptables``.

Found by the rollout: on a host whose network namespace had no connection tracking yet (a
fresh VM with no firewall), the first nat rule turns conntrack on; the next packet the host
sends on a connection opened before that is picked up mid-stream as a NEW connection, walks
``NODEMESH_OUTPUT`` and is redirected to the agent, so the session stalls.  ansible then waits
forever for the result of the very task that installed the rules.  The jump now matches
only connection-opening packets (``-p tcp --syn``), which leaves packets of older connections
untouched.

Two namespaces, no VM: a server in ``srv`` that speaks first after the rules go in (as sshd does
with a command's output), a client in ``cli``, and the real ``nodemesh iptables install``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab import netns
from nodemesh.lab.netns import Host, Network
from tests.rollout.vms import unmet

pytestmark = pytest.mark.rollout

PORT = 7022
# The server greets, waits for a line from the test (sent once the rules are in), then speaks
# first on the old connection; it never reads what the client says after the greeting.
SERVER = f"""
import socket, sys
ls = socket.create_server(("0.0.0.0", {PORT}))
print("listening", flush=True)
conn, _ = ls.accept()
conn.sendall(b"hello\\n")
sys.stdin.readline()
conn.sendall(b"after the rules\\n")
sys.stdin.readline()
"""


@pytest.fixture
def pair() -> Iterator[tuple[Host, Host]]:
    reason = unmet()
    if reason:
        pytest.skip(reason)
    net = Network(prefix="nmk")
    try:
        net.create()
        yield net.add_host("srv"), net.add_host("cli")
    finally:
        net.teardown()


def test_installing_rules_keeps_a_connection_made_before_them(pair: tuple[Host, Host]) -> None:
    srv, cli = pair
    server_argv = netns.netns_argv(srv, [sys.executable, "-c", SERVER])
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(server_argv, stdin=subprocess.PIPE, **pipes) as server:
        assert server.stdin is not None and server.stdout is not None
        try:
            assert server.stdout.readline().strip() == b"listening"
            client_argv = netns.netns_argv(cli, [sys.executable, "-c", _client(srv.ip)])
            with subprocess.Popen(client_argv, text=True, **pipes) as client:
                assert client.stdout is not None
                assert client.stdout.readline().strip() == "hello"
                nodemesh = str(Path(sys.executable).parent / "nodemesh")
                netns.run(srv, [nodemesh, "iptables", "install", "--proxy-uid", "65534"])
                server.stdin.write(b"go\n")
                server.stdin.flush()
                out, err = client.communicate(timeout=10)
            assert out.strip() == "after the rules", f"the old connection stalled: {err.strip()}"
        finally:
            server.kill()


def _client(ip: str) -> str:
    # Reads the greeting, then waits (bounded) for what the server says after the rules.
    return f"""
import socket, sys
s = socket.create_connection(("{ip}", {PORT}), timeout=3)
f = s.makefile("rb")
print(f.readline().decode().strip(), flush=True)
try:
    print(f.readline().decode().strip(), flush=True)
except socket.timeout:
    sys.exit("nothing within 3 s")
"""
