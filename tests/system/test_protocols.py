"""Every protocol a VM fleet speaks, from h1 through both agents to a real server on h2 or h3.

    client on h1 ──> iptables ──> agent h1 ══ mTLS ══> agent h2/h3 ──> real server (plain, local)

Peers are real programs (``nodemesh.lab.peers``): curl and h2load against an h2c server, grpcio
client and server, websockets, redis-server with redis-cli and redis-benchmark, and Python
sockets for bulk transfer and half-close.  Each test also judges the wire (``Wire``): on h1's
eth0 every byte between h1 and the server's host is TLS records on the agents' port and the
test's marker never appears, while on the server host's loopback (agent to app) the same marker
*does* appear in the clear, so its absence between hosts means something.  See docs/protocols.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemesh.lab.mesh import Lab, LabSpec
from nodemesh.lab.peers import (
    Capture,
    Peer,
    flows,
    peer_argv,
    redis_argv,
    running_peer,
    tcp_opened,
    tls_records,
    wait_meshed,
)

pytestmark = pytest.mark.system

MESH_PORT = 4143  # the agents' inbound mTLS listener
CONSUL_GOSSIP = "not portrange 8300-8302"
# 1 GiB through two agents took 6-20 s here (50-170 MiB/s, 2 cores shared by every process of
# the lab), so the full size fits the minute this test may take.
BULK_BYTES = 1 << 30


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(servers=1, hosts=3)


def _marker() -> str:
    return "plaintext-marker-" + os.urandom(6).hex()


def _serve(
    lab: Lab, host: str, service: str, port: int, kind: str, protocol: str | None = None
) -> Iterator[Peer]:
    addr = f"{lab.host_ip(host)}:{port}"
    argv = peer_argv(lab, kind, "--listen", addr)
    with running_peer(lab, host, service, port, argv, protocol=protocol) as peer:
        wait_meshed(lab, peer)
        yield peer


def _client(lab: Lab, kind: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run one of the peers' clients on h1; what it saw."""
    p = lab.exec("h1", peer_argv(lab, kind, *args), timeout=timeout)
    out: dict[str, Any] = json.loads(p.stdout)
    return out


# --- the wire ---------------------------------------------------------------------------------


class Wire:
    """Two captures around one exchange with ``peer``: h1's eth0 (between hosts) and the server
    host's loopback restricted to the peer's port (its agent talking to the app)."""

    def __init__(self, lab: Lab, tmp_path: Path, peer: Peer, count: int = 0) -> None:
        self.lab = lab
        self.peer = peer
        self.h1 = lab.host_ip("h1")
        self.between = Capture(
            lab,
            "h1",
            tmp_path / "h1-eth0.pcap",
            f"tcp and host {peer.ip} and {CONSUL_GOSSIP}",
            count=count,
        )
        try:
            self.local = Capture(
                lab,
                peer.host,
                tmp_path / f"{peer.host}-lo.pcap",
                f"tcp port {peer.port}",
                iface="lo",
                count=count and count // 4,
            )
        except BaseException:
            self.between.stop()
            raise

    def close(self) -> None:
        self.between.stop()
        self.local.stop()

    def assert_tls_only(self, marker: str) -> None:
        between, local = self.between.stop(), self.local.stop()
        mark = marker.encode()
        # Control: the app's own hop carried the marker in the clear (not compressed, masked or
        # encoded away), so not finding it between the hosts is evidence.
        assert mark in local, f"the marker never reached {self.peer.service} in the clear"
        plain = [data for data in flows(local).values() if mark in data]
        assert plain and all(tls_records(d) is None for d in plain)
        assert mark not in between, "the marker crossed the wire between hosts in the clear"
        hop = flows(between)
        assert hop, "nothing was captured between h1 and the server's host"
        kinds: set[str] = set()
        for (src, sport, dst, dport), data in hop.items():
            # Every byte between the hosts went agent to agent, never to the app's port ...
            assert MESH_PORT in (sport, dport), f"{src}:{sport} -> {dst}:{dport} bypassed the mesh"
            # ... and is TLS records, all of it.
            records = tls_records(data)
            assert records is not None, f"{src}:{sport} -> {dst}:{dport} is not TLS: {data[:40]!r}"
            kinds.update(records)
        # Pooled agent-to-agent connections may predate the capture, so no handshake is
        # required here; application data is.
        assert "application_data" in kinds, kinds


@pytest.fixture
def wire(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., Wire]]:
    made: list[Wire] = []

    def watch(peer: Peer, count: int = 0) -> Wire:
        w = Wire(lab, tmp_path, peer, count)
        made.append(w)
        return w

    try:
        yield watch
    finally:
        for w in made:
            w.close()


# --- HTTP/1.1 and HTTP/2 (h2c) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def h2c(lab: Lab) -> Iterator[Peer]:
    yield from _serve(lab, "h2", "h2c", 8081, "h2c")


def _curl_json(lab: Lab, url: str, body: str, *extra: str) -> tuple[str, dict[str, Any]]:
    """POST ``body`` with curl on h1; the HTTP version curl used and the JSON answer."""
    p = lab.exec(
        "h1",
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--data-binary",
            body,
            *extra,
            "-w",
            "\n%{http_version} %{http_code}",
            url,
        ],
        timeout=20,
    )
    text, _, tail = p.stdout.decode().rpartition("\n")
    version, code = tail.split()
    assert code == "200", (code, text, p.stderr)
    return version, json.loads(text)


def test_http1_and_h2c_prior_knowledge_arrive_as_sent(
    lab: Lab, h2c: Peer, wire: Callable[..., Wire]
) -> None:
    marker = _marker()
    w = wire(h2c)
    url = f"http://{h2c.addr}/hello?from=h1"
    # Several of each: later requests reuse connections between the agents (and, for HTTP/1.1,
    # to the app), where framing bugs show that a first request on fresh ones hides.
    for flag, version, protocol in (
        ("--http1.1", "1.1", "http/1.1"),
        ("--http2-prior-knowledge", "2", "h2"),
    ):
        for i in range(5):
            body = f"{protocol} {i} {marker}"
            got, seen = _curl_json(lab, url, body, flag)
            assert (got, seen["protocol"]) == (version, protocol), (flag, i, seen)
            assert (seen["method"], seen["path"]) == ("POST", "/hello?from=h1"), (flag, i, seen)
            assert seen["body"] == body, (flag, i, seen)
    w.assert_tls_only(marker)


def test_h2load_thousands_of_requests_without_a_failure(
    lab: Lab, h2c: Peer, wire: Callable[..., Wire], tmp_path: Path
) -> None:
    marker = _marker()
    body = tmp_path / "body"
    body.write_text(marker)
    w = wire(h2c)
    n = 3000
    p = lab.exec(
        "h1",
        ["h2load", "-n", str(n), "-c", "4", "-m", "10", "-d", str(body), f"http://{h2c.addr}/load"],
        timeout=60,
    )
    out = p.stdout.decode()
    assert re.search(
        rf"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, "
        r"0 errored, 0 timeout",
        out,
    ), out
    assert re.search(rf"status codes: {n} 2xx, 0 3xx, 0 4xx, 0 5xx", out), out
    assert "h2c" in out  # h2load spoke HTTP/2 (prior knowledge), not HTTP/1.1
    w.assert_tls_only(marker)


# --- gRPC ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_peer(lab: Lab) -> Iterator[Peer]:
    yield from _serve(lab, "h3", "grpc", 50051, "grpc")


def test_grpc_every_call_kind_status_and_deadline(
    lab: Lab, grpc_peer: Peer, wire: Callable[..., Wire]
) -> None:
    marker = _marker()
    w = wire(grpc_peer)
    out = _client(lab, "grpc-client", "--target", grpc_peer.addr, "--marker", marker)
    assert "error" not in out, out
    assert out["unary"] == f"echo {marker}"
    assert out["server_stream"] == [f"{i} {marker}" for i in range(5)]
    assert out["client_stream"] == f"a|{marker}|c"
    # Each answer was read before the next request was sent: the stream is truly two-way.
    assert out["bidi"] == [f"re {i} {marker}" for i in range(4)]
    assert out["error_status"] == {"code": "NOT_FOUND", "details": f"no such key: {marker}"}
    # The handler sleeps 5 s; the client's 0.5 s deadline ends the call, and promptly.
    assert out["deadline"]["code"] == "DEADLINE_EXCEEDED"
    assert out["deadline"]["seconds"] < 2.0
    assert out["after"] == "echo after"
    w.assert_tls_only(marker)


# --- WebSocket ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws_peer(lab: Lab) -> Iterator[Peer]:
    yield from _serve(lab, "h2", "ws", 8765, "ws-echo")


def test_websocket_echo_and_closing_handshake(
    lab: Lab, ws_peer: Peer, wire: Callable[..., Wire]
) -> None:
    marker = _marker()
    w = wire(ws_peer)
    out = _client(lab, "ws-client", "--target", f"ws://{ws_peer.addr}/", "--marker", marker)
    assert "error" not in out, out
    assert out["echoes"] == [f"{i} {marker}" for i in range(5)]
    assert out["binary_ok"] is True
    assert out["close_code"] == 1000  # the server's close frame came back
    # Client frames are masked; the marker is visible on the app's hop in the echoes.
    w.assert_tls_only(marker)


# --- Redis: client-first, but on an opaque port -------------------------------------------------


@pytest.fixture(scope="module")
def redis_peer(lab: Lab) -> Iterator[Peer]:
    ip = lab.host_ip("h3")
    with running_peer(lab, "h3", "redis", 6379, redis_argv(ip, 6379, lab.dir / "h3")) as peer:
        wait_meshed(lab, peer)
        yield peer


def test_redis_commands_and_benchmark(
    lab: Lab, redis_peer: Peer, wire: Callable[..., Wire]
) -> None:
    marker = _marker()
    w = wire(redis_peer)
    cli = ["redis-cli", "-h", redis_peer.ip, "-p", str(redis_peer.port)]
    assert lab.exec("h1", [*cli, "SET", "k", marker]).stdout.strip() == b"OK"
    assert lab.exec("h1", [*cli, "GET", "k"]).stdout.strip() == marker.encode()
    w.assert_tls_only(marker)
    # redis-benchmark opens 50 client connections per command it measures: every one must be
    # meshed (counted by h1's agent as outbound to redis, not egress) and none may fail.
    before = tcp_opened(lab, "h1", "outbound", "redis")
    bench = ["redis-benchmark", "-h", redis_peer.ip, "-p", str(redis_peer.port)]
    p = lab.exec("h1", [*bench, "-n", "2000", "-q", "--csv"], timeout=120)
    assert p.stderr.strip() == b"", p.stderr
    rows = [line.split('","') for line in p.stdout.decode().splitlines()[1:]]
    rates = {r[0].strip('"'): float(r[1].strip('"')) for r in rows if len(r) > 1}
    print(f"redis-benchmark through the mesh: {rates}")
    assert {"PING_INLINE", "SET", "GET", "INCR", "LPUSH", "MSET (10 keys)"} <= set(rates), rates
    assert tcp_opened(lab, "h1", "outbound", "redis") - before >= 50 * len(rates)
    assert all(rps > 0 for rps in rates.values()), rates


def _redis_clients(lab: Lab, peer: Peer) -> int:
    """Connections redis-server holds now, asked on its own host (loopback, not meshed)."""
    p = lab.exec(peer.host, ["redis-cli", "-h", peer.ip, "-p", str(peer.port), "INFO", "clients"])
    found = re.search(rb"connected_clients:(\d+)", p.stdout)
    assert found, p.stdout
    return int(found.group(1)) - 1  # not counting the asking redis-cli itself


def test_closed_clients_are_closed_at_the_server(lab: Lab, redis_peer: Peer) -> None:
    before = _redis_clients(lab, redis_peer)
    cli = ["redis-cli", "-h", redis_peer.ip, "-p", str(redis_peer.port)]
    for _ in range(20):
        assert lab.exec("h1", [*cli, "PING"]).stdout.strip() == b"PONG"
    deadline = time.monotonic() + 5.0
    held = _redis_clients(lab, redis_peer)
    while held > before and time.monotonic() < deadline:
        time.sleep(0.2)
        held = _redis_clients(lab, redis_peer)
    assert held <= before, f"{held - before} of 20 closed clients still connected after 5 s"


# --- bulk transfer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(lab: Lab) -> Iterator[Peer]:
    # Declared opaque in Consul (Meta.protocol = "tcp"): no detection at all.
    yield from _serve(lab, "h2", "sink", 7100, "sink", protocol="tcp")


def test_bulk_transfer_one_gib_intact(lab: Lab, sink: Peer, wire: Callable[..., Wire]) -> None:
    marker = _marker()
    # Only the first packets: enough to judge the framing, without writing a GiB of pcap.
    w = wire(sink, count=4000)
    out = _client(
        lab,
        "bulk-client",
        "--target",
        sink.addr,
        "--marker",
        marker,
        "--bytes",
        str(BULK_BYTES),
        timeout=120,
    )
    print(f"bulk: {out['bytes']} bytes in {out['seconds']:.1f} s, {out['mib_per_s']:.0f} MiB/s")
    assert "error" not in out, out
    assert out["reply"] == f"{marker} {BULK_BYTES} {out['sha256']}"
    w.assert_tls_only(marker)


# --- half-close ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def halfclose(lab: Lab) -> Iterator[Peer]:
    yield from _serve(lab, "h2", "halfclose", 7200, "halfclose", protocol="tcp")


def test_half_close_then_reply(lab: Lab, halfclose: Peer, wire: Callable[..., Wire]) -> None:
    marker = _marker()
    w = wire(halfclose)
    out = _client(
        lab, "halfclose-client", "--target", halfclose.addr, "--marker", marker, "--timeout", "5"
    )
    assert "reply" in out, f"the client's FIN did not reach the server in 5 s: {out}"
    assert out["reply"] == f"after eof {marker} {out['sent']} {out['sha256']}"
    w.assert_tls_only(marker)


# --- server speaks first ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greeter(lab: Lab) -> Iterator[Peer]:
    # 5432 (PostgreSQL's port) is on the agents' default opaque list: never peeked.
    yield from _serve(lab, "h3", "greeter", 5432, "greet")


def test_server_that_speaks_first_is_heard_at_once(
    lab: Lab, greeter: Peer, wire: Callable[..., Wire]
) -> None:
    marker = _marker()
    w = wire(greeter)
    out = _client(lab, "greet-client", "--target", greeter.addr, "--marker", marker)
    assert "error" not in out, out
    assert out["greeting"].startswith("greeting from "), out
    # Far below the 10 s detection timeout: the agent did not wait for the client to speak.
    assert out["seconds"] < 2.0, out
    assert out["echo"] == f"echo {marker}"
    w.assert_tls_only(marker)
