"""End to end: nodemesh's rules redirect a real connection and SO_ORIGINAL_DST recovers its target.

Two network namespaces joined by a veth pair (nothing in the root namespace changes):

    host 198.18.7.1/24  -- eth0 == eth0 --  remote 198.18.7.2/24 and 198.18.7.130/24
      "proxy" 127.0.0.1:4140, [::1]:4140,        "direct" on :8080, :9090, :8500
              [::]:4141 (dual-stack)
      "local" 0.0.0.0:8080

Rules are installed in "host" with proxy_uid 0 (root is the agent), so clients run as nobody
(`setpriv --reuid=65534`) are redirected and root's are not.  Every peer replies with one line
saying who answered and which address it saw, so a test reads where a connection really went.

This module is also the peers' program: `python THIS_FILE serve-host|serve-remote|connect ...`
runs inside the namespaces through `ip netns exec`.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from nodemesh.transport.original_dst import original_dst

pytestmark = pytest.mark.system

PY = [sys.executable, "-B"]
HERE = os.path.abspath(__file__)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TIMEOUT = 30  # seconds, for any one command
PEER_LIFETIME = 120  # seconds; peers exit on their own even if a test forgets them
PROXY_PORT = 4140
DUAL_STACK_PORT = 4141
HOST_IP, REMOTE_IP, REMOTE_EXCLUDED_IP = "198.18.7.1", "198.18.7.2", "198.18.7.130"
EXCLUDED_PORT, CONSUL_PORT = 9090, 8500
INSTALL = ["install", "--proxy-uid", "0", "--exclude-port", str(EXCLUDED_PORT),
           "--exclude-cidr", "198.18.7.128/25"]


# --- the peers (run inside the namespaces) -----------------------------------------------------


async def _serve(listeners: list[tuple[str, str, int]]) -> None:
    """Accept on each (kind, ip, port); answer one line: '<kind> <ip> <port>'."""

    async def answer(kind: str, stream: trio.SocketStream) -> None:
        try:
            if kind == "proxy":
                ip, port = original_dst(stream.socket)
            else:
                ip, port = stream.socket.getsockname()[:2]
            await stream.send_all(f"{kind} {ip} {port}\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def serve_one(kind: str, ip: str, port: int,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" is dual-stack (IPv4 peers arrive as ::ffff:a.b.c.d); "::1" is IPv6 only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(ip != "::"))
        await sock.bind((ip, port))
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(answer, kind, stream)

    with trio.move_on_after(PEER_LIFETIME):
        async with trio.open_nursery() as nursery:
            for kind, ip, port in listeners:
                await nursery.start(serve_one, kind, ip, port)
            print("ready", flush=True)


def _connect(targets: list[str]) -> None:
    """Dial each 'ip:port' (IPv6 as '[ip]:port'); print {target: answer line} as JSON."""
    out = {}
    for target in targets:
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect((host, int(port)))
                out[target] = s.makefile().readline().strip()
        except OSError as e:
            out[target] = f"error {e.__class__.__name__}"
    print(json.dumps(out))


def _main(argv: list[str]) -> None:
    if argv[0] == "serve-host":
        trio.run(_serve, [("proxy", "127.0.0.1", PROXY_PORT), ("proxy", "::1", PROXY_PORT),
                          ("proxy", "::", DUAL_STACK_PORT), ("local", "0.0.0.0", 8080)])
    elif argv[0] == "serve-remote":
        trio.run(_serve, [("direct", "0.0.0.0", p) for p in (8080, EXCLUDED_PORT, CONSUL_PORT)])
    elif argv[0] == "connect":
        _connect(argv[1:])


# --- the tests (run in the root namespace, as root) --------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr}")
    return proc


def _root_nat_nodemesh_lines() -> list[str]:
    return [ln for ln in _run("iptables", "-t", "nat", "-S").stdout.splitlines()
            if "NODEMESH" in ln]


def _start_peer(ns: str, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *PY, HERE, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=TIMEOUT)
        raise AssertionError(f"{mode} in {ns} did not start: {err}")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=5)  # also closes our ends of its pipes
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)


@dataclass(frozen=True)
class Lab:
    host: str
    remote: str

    def iptables_cli(self, *args: str) -> str:
        cli = [*PY, "-m", "nodemesh.agent.iptables"]
        return _run("ip", "netns", "exec", self.host, *cli, *args).stdout

    def connect(self, *targets: str, as_nobody: bool = True) -> dict[str, str]:
        who = NOBODY if as_nobody else []
        proc = _run("ip", "netns", "exec", self.host, *who, *PY, HERE, "connect", *targets)
        answers: dict[str, str] = json.loads(proc.stdout)
        return answers


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "iptables", "setpriv")):
        pytest.skip("needs root, iproute2, iptables and setpriv")
    assert _root_nat_nodemesh_lines() == []
    suffix = f"{os.getpid()}-{secrets.token_hex(3)}"
    host, remote = f"nm-odh-{suffix}", f"nm-odr-{suffix}"
    made: list[str] = []
    peers: list[subprocess.Popen[str]] = []
    try:
        for ns in (host, remote):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # Both ends are created inside the namespaces: no interface ever exists in the root one.
        _run("ip", "-n", host, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", remote)
        _run("ip", "-n", host, "addr", "add", f"{HOST_IP}/24", "dev", "eth0")
        _run("ip", "-n", remote, "addr", "add", f"{REMOTE_IP}/24", "dev", "eth0")
        _run("ip", "-n", remote, "addr", "add", f"{REMOTE_EXCLUDED_IP}/24", "dev", "eth0")
        for ns in (host, remote):
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        peers.append(_start_peer(host, "serve-host"))
        peers.append(_start_peer(remote, "serve-remote"))
        yield Lab(host, remote)
    finally:
        for p in peers:
            _stop(p)
        for ns in made:
            _run("ip", "netns", "del", ns, check=False)
        assert _root_nat_nodemesh_lines() == []


def _t(ip: str, port: int) -> str:
    return f"{ip}:{port}"


def test_redirected_connection_reports_its_original_destination(lab: Lab) -> None:
    target = _t(REMOTE_IP, 8080)
    assert lab.connect(target) == {target: f"direct {REMOTE_IP} 8080"}

    lab.iptables_cli(*INSTALL)
    assert lab.connect(target) == {target: f"proxy {REMOTE_IP} 8080"}

    lab.iptables_cli("remove")
    assert lab.connect(target) == {target: f"direct {REMOTE_IP} 8080"}


def test_exclusions_are_not_redirected(lab: Lab) -> None:
    lab.iptables_cli(*INSTALL)
    answers = lab.connect(
        _t(REMOTE_IP, 8080),  # the control: redirected
        _t(REMOTE_IP, EXCLUDED_PORT),
        _t(REMOTE_EXCLUDED_IP, 8080),
        _t(REMOTE_IP, CONSUL_PORT),
        _t(HOST_IP, 8080),  # the host's own address leaves through lo
        _t("127.0.0.1", 8080),
    )
    assert answers == {
        _t(REMOTE_IP, 8080): f"proxy {REMOTE_IP} 8080",
        _t(REMOTE_IP, EXCLUDED_PORT): f"direct {REMOTE_IP} {EXCLUDED_PORT}",
        _t(REMOTE_EXCLUDED_IP, 8080): f"direct {REMOTE_EXCLUDED_IP} 8080",
        _t(REMOTE_IP, CONSUL_PORT): f"direct {REMOTE_IP} {CONSUL_PORT}",
        _t(HOST_IP, 8080): f"local {HOST_IP} 8080",
        _t("127.0.0.1", 8080): "local 127.0.0.1 8080",
    }


def test_the_proxy_uid_is_not_redirected(lab: Lab) -> None:
    lab.iptables_cli(*INSTALL)
    target = _t(REMOTE_IP, 8080)
    assert lab.connect(target, as_nobody=False) == {target: f"direct {REMOTE_IP} 8080"}
    assert lab.connect(target, as_nobody=True) == {target: f"proxy {REMOTE_IP} 8080"}


def test_a_direct_connection_reports_the_listener_address(lab: Lab) -> None:
    # No NAT entry: SO_ORIGINAL_DST fails and the listener's own address is the answer.
    target = _t("127.0.0.1", PROXY_PORT)
    assert lab.connect(target) == {target: f"proxy 127.0.0.1 {PROXY_PORT}"}
    assert lab.connect(f"[::1]:{PROXY_PORT}") == {f"[::1]:{PROXY_PORT}": f"proxy ::1 {PROXY_PORT}"}


def test_ipv6_redirect_reports_its_original_destination(lab: Lab) -> None:
    # nodemesh intercepts IPv4 only; this ip6tables rule (in the test namespace) checks that the
    # IPv6 variant of SO_ORIGINAL_DST is read correctly, on loopback.
    _run("ip", "netns", "exec", lab.host, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
         "-d", "::1", "--dport", "9999", "-j", "REDIRECT", "--to-ports", str(PROXY_PORT))
    assert lab.connect("[::1]:9999") == {"[::1]:9999": "proxy ::1 9999"}


def test_dual_stack_listener_reports_an_ipv4_original_destination(lab: Lab) -> None:
    # A listener on "::" sees IPv4 clients as ::ffff:a.b.c.d; the IPv4 option still answers.
    _run("ip", "netns", "exec", lab.host, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
         "-d", REMOTE_IP, "--dport", "7777", "-j", "REDIRECT", "--to-ports", str(DUAL_STACK_PORT))
    direct = _t("127.0.0.1", DUAL_STACK_PORT)
    assert lab.connect(_t(REMOTE_IP, 7777), direct) == {
        _t(REMOTE_IP, 7777): f"proxy {REMOTE_IP} 7777",
        direct: f"proxy 127.0.0.1 {DUAL_STACK_PORT}",
    }


if __name__ == "__main__":
    _main(sys.argv[1:])
