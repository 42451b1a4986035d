"""Real peers for protocol tests: servers and clients that run in lab hosts, and the lab side.

Lab side (in the test driver, next to a started ``Lab``):

    with running_peer(lab, "h2", "grpc", 50051, peer_argv(lab, "grpc", "--listen", addr)) as p:
        wait_meshed(lab, p)                       # h1's agent resolves it, h2's holds its cert
        with Capture(lab, "h1", path, "tcp and port 4143") as cap: ...
        flows(cap.stop())                         # TCP payload per direction, for TLS checks

``running_peer`` starts the program by pid, registers it in the host's Consul agent (with a TCP
check), waits until it passes, and in its ``finally`` deregisters and stops it.

Peer side (``python -m nodemesh.lab.peers KIND ...`` inside a lab host):

    servers  h2c        HTTP/2 prior knowledge and HTTP/1.1 on one port (h2 and h11); answers
                        JSON naming the protocol it saw, the method, path and request body
             grpc       grpcio, proto-less: raw-bytes unary, server/client/bidi streaming,
                        an error status with details, and a slow method for deadlines
             ws-echo    websockets: echoes every message, no compression
             sink       reads ``MARKER N\\n`` then exactly N bytes, answers their sha256
             halfclose  reads to EOF, *then* answers what it got and closes
             greet      speaks first (as PostgreSQL, MySQL or SMTP do), then echoes lines
    clients  grpc-client, ws-client, bulk-client, halfclose-client, greet-client: each prints
             one JSON line with what it saw, including ``error`` when something failed, and
             exits 0, so the test, not the client, decides what a result means.

Every server handles each connection in its own thread, with a socket timeout, so a stuck peer
never holds the process; every client call has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h11

from nodemesh.identity import spiffe
from nodemesh.lab import configs, netns
from nodemesh.lab.netns import LabError, Process

if TYPE_CHECKING:
    from nodemesh.lab.mesh import Lab

WAIT = 30.0  # seconds: registration passing, an agent learning a service, tcpdump starting
POLL = 0.2  # seconds between probes
SOCKET_TIMEOUT = 60.0  # seconds a peer connection may sit without a byte before it is dropped
CLIENT_TIMEOUT = 10.0  # seconds for any single client operation
GRPC_SERVICE = "nodemesh.lab.Probe"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CHUNK = 1 << 20
MAX_ECHO = 4096  # request body characters an h2c answer repeats back


# --- lab side: start, register, wait, stop -------------------------------------------------


@dataclass
class Peer:
    """A peer server in a lab host, registered in Consul as ``service``."""

    service: str
    host: str
    ip: str
    port: int
    process: Process = field(repr=False)

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def service_id(self) -> str:
        return f"{self.service}-{self.host}-{self.port}"

    def __repr__(self) -> str:
        return f"<Peer {self.service} {self.addr} on {self.host} {self.process!r}>"


def peer_argv(lab: Lab, kind: str, *args: str) -> list[str]:
    """The command line of one of this module's peers, run with the lab's Python."""
    return [str(lab.spec.python), "-m", "nodemesh.lab.peers", kind, *args]


def redis_argv(ip: str, port: int, workdir: Path) -> list[str]:
    """redis-server in the foreground, on one address, persisting nothing."""
    return [
        "redis-server",
        "--bind", ip,
        "--port", str(port),
        "--protected-mode", "no",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(workdir),
    ]  # fmt: skip


@contextlib.contextmanager
def running_peer(
    lab: Lab,
    host: str,
    service: str,
    port: int,
    argv: Sequence[str],
    *,
    protocol: str | None = None,
) -> Iterator[Peer]:
    """Start ``argv`` in ``host`` and register it as ``service`` at the host's address and
    ``port`` (``Meta.protocol`` = ``protocol`` if given); deregistered and stopped at exit."""
    h = lab.host(host)
    proc = netns.spawn(h, argv, lab.log_path(host, service), name=service)
    peer = Peer(service, host, h.ip, port, proc)
    try:
        definition: dict[str, Any] = {
            "ID": peer.service_id,
            "Name": service,
            "Address": h.ip,
            "Port": port,
            "Meta": {"lab_host": host, **({"protocol": protocol} if protocol else {})},
            "Check": {"TCP": peer.addr, "Interval": "1s", "Timeout": "1s"},
        }
        lab.consul_api(host, "/v1/agent/service/register", method="PUT", body=definition)
        _wait_passing(lab, peer)
        yield peer
    except BaseException:
        _stop_peer(lab, peer, quiet=True)  # the error in flight explains more than teardown
        raise
    _stop_peer(lab, peer, quiet=False)


def _stop_peer(lab: Lab, peer: Peer, *, quiet: bool) -> None:
    """Deregister, then stop by pid; the process is stopped even if Consul does not answer."""
    try:
        path = f"/v1/agent/service/deregister/{peer.service_id}"
        lab.consul_api(peer.host, path, method="PUT")
    except LabError:
        if not quiet:
            raise
    finally:
        peer.process.stop()


def _wait_passing(lab: Lab, peer: Peer) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if not peer.process.running:
            raise LabError(f"{peer!r} exited: {netns.tail(peer.process.log_path)}")
        try:
            entries = lab.consul_api(peer.host, f"/v1/health/service/{peer.service}?passing")
        except LabError:
            entries = []
        if any(e["Service"]["ID"] == peer.service_id for e in entries or []):
            return
        time.sleep(POLL)
    raise LabError(f"{peer!r} not passing in Consul within {WAIT:g}s; see {peer.process.log_path}")


def tcp_opened(lab: Lab, host: str, direction: str, service: str) -> int:
    """Connections ``host``'s agent has opened for ``service`` (its ``/stats.json`` tcp series)."""
    stats = json.loads(lab.curl("ctl", lab.admin_url(host, "/stats.json")).body or b"{}")
    return sum(
        int(t["opened"])
        for t in stats.get("tcp", [])
        if t["direction"] == direction and t["service"] == service
    )


def wait_meshed(lab: Lab, peer: Peer, source: str = "h1") -> None:
    """Bounded: ``peer.host``'s agent holds the service's certificate, and ``source``'s agent
    resolves ``peer.addr`` to the service (a probe connection counts as outbound, not egress).

    Until both hold, a client's connection would be egress (plaintext) or a refused tunnel.
    The probe connects and closes at once, which every peer here tolerates.
    """
    ident = spiffe.service_id(configs.TRUST_DOMAIN, configs.DATACENTER, peer.service)
    held = f'identity="{ident.uri}"'
    probe = (
        "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()"
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if held in lab.curl("ctl", lab.admin_url(peer.host, "/metrics")).text:
            before = tcp_opened(lab, source, "outbound", peer.service)
            lab.exec(
                source,
                [str(lab.spec.python), "-c", probe, peer.ip, str(peer.port)],
                check=False,
            )
            if tcp_opened(lab, source, "outbound", peer.service) > before:
                return
        time.sleep(POLL)
    raise LabError(
        f"{peer.service} at {peer.addr} not meshed from {source} within {WAIT:g}s; see "
        f"{lab.log_path(source, 'agent')} and {lab.log_path(peer.host, 'agent')}"
    )


# --- lab side: the wire ---------------------------------------------------------------------


class Capture:
    """tcpdump on one interface of a lab host, writing ``path``; ``stop()`` returns the pcap.

    ``count`` stops after that many packets (a bulk transfer's first packets are enough to
    judge its framing, and a whole GiB would only fill the disk).
    """

    def __init__(
        self,
        lab: Lab,
        host: str,
        path: Path,
        bpf: str,
        *,
        iface: str = "eth0",
        count: int = 0,
    ) -> None:
        self.path = path
        self.where = f"{host}:{iface}"
        argv = ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s", "0"]
        argv += ["-c", str(count)] if count else []
        argv += ["-w", str(path), bpf]
        self.proc = subprocess.Popen(
            netns.netns_argv(lab.host(host), argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_listening()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else "stopped"
        return f"<Capture {self.where} {self.path.name} {state}>"

    def _wait_listening(self) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        seen = b""
        deadline = time.monotonic() + WAIT
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise LabError(f"tcpdump on {self.where} did not start: {seen.decode()[-300:]}")
            ready, _, _ = select.select([fd], [], [], min(left, POLL))
            if ready:
                seen += os.read(fd, 4096)

    def stop(self) -> bytes:
        """Stop (if still running) and return the capture; safe to call twice."""
        if self.proc.poll() is None:
            time.sleep(0.3)  # the last packets of a test land in the file (-U flushes each)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def __enter__(self) -> Capture:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


Flow = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


def flows(pcap: bytes) -> dict[Flow, bytes]:
    """Each TCP direction's payload in sequence order (pure: classic pcap, Ethernet, IPv4).

    Retransmitted or overlapping segments are taken once; a gap (a packet the capture missed)
    ends that direction's bytes there, so what is returned is always a true prefix.  Sequence
    numbers are taken relative to the first one seen in each direction, modulo 2**32: a bulk
    transfer's sequence space wraps wherever its random start puts it.
    """
    if len(pcap) < 24:
        return {}
    magic = pcap[:4]
    order = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    segments: dict[Flow, dict[int, bytes]] = {}
    bases: dict[Flow, int] = {}
    pos = 24
    while pos + 16 <= len(pcap):
        incl = struct.unpack(order + "I", pcap[pos + 8 : pos + 12])[0]
        frame = pcap[pos + 16 : pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue  # not IPv4
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != 6 or len(ip) < ihl + 20:
            continue  # not TCP
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            key = (_ipv4(ip[12:16]), sport, _ipv4(ip[16:20]), dport)
            base = bases.setdefault(key, seq)
            segments.setdefault(key, {}).setdefault((seq - base) % 2**32, payload)
    out: dict[Flow, bytes] = {}
    for key, by_offset in segments.items():
        offsets = sorted(by_offset)
        data = bytearray()
        nxt = offsets[0]
        for off in offsets:
            piece = by_offset[off]
            if off > nxt:
                break  # a gap: keep only the true prefix
            data += piece[nxt - off :]
            nxt = max(nxt, off + len(piece))
        out[key] = bytes(data)
    return out


def _ipv4(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


def tls_records(stream: bytes) -> list[str] | None:
    """The content types of the TLS records ``stream`` consists of, or None if it is not TLS.

    Every byte must belong to a record with a known content type, a TLS 1.0-1.3 record version
    and a legal length; the last record may be cut short (a capture's prefix).
    """
    out: list[str] = []
    pos = 0
    while pos < len(stream):
        head = stream[pos : pos + 5]
        if len(head) < 5:
            return out if head[:1] and head[0] in TLS_CONTENT_TYPES else None
        ctype, major, minor, length = head[0], head[1], head[2], struct.unpack("!H", head[3:5])[0]
        if ctype not in TLS_CONTENT_TYPES or major != 3 or minor > 4 or length > 16384 + 2048:
            return None
        out.append(TLS_CONTENT_TYPES[ctype])
        pos += 5 + length
    return out


# --- peer side: servers ---------------------------------------------------------------------


def _listen(addr: str) -> socket.socket:
    ip, _, port = addr.rpartition(":")
    srv = socket.create_server((ip, int(port)), backlog=256)
    print(f"listening on {addr}", flush=True)
    return srv


def _serve_threads(srv: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept forever, one daemon thread per connection; a failing connection is only logged."""

    def run(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(SOCKET_TIMEOUT)
            try:
                handle(conn)
            except (OSError, h11.ProtocolError, ValueError) as e:
                print(f"connection_failed error={e!r}", flush=True)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def _answer(protocol: str, method: str, path: str, body: bytes) -> bytes:
    return json.dumps(
        {
            "protocol": protocol,
            "method": method,
            "path": path,
            "body": body[:MAX_ECHO].decode(errors="replace"),
            "body_bytes": len(body),
        }
    ).encode()


def serve_h2c(addr: str) -> None:
    _serve_threads(_listen(addr), _h2c_connection)


def _h2c_connection(sock: socket.socket) -> None:
    # Prior knowledge: a connection that opens with the HTTP/2 preface is HTTP/2, anything
    # else is HTTP/1.1.  Read only as far as the first byte that rules the preface out.
    first = b""
    while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
        data = sock.recv(65536)
        if not data:
            return
        first += data
    if first.startswith(H2_PREFACE):
        _serve_h2(sock, first)
    else:
        _serve_h1(sock, first)


def _serve_h2(sock: socket.socket, first: bytes) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    heads: dict[int, dict[str, str]] = {}
    bodies: dict[int, bytearray] = {}
    pending: dict[int, bytes] = {}  # response bytes waiting for flow-control window
    data = first
    while data:
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                heads[ev.stream_id] = {str(k): str(v) for k, v in ev.headers or []}
                bodies[ev.stream_id] = bytearray()
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
                bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data or b"")
                conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id is not None:
                sid = ev.stream_id
                head = heads.pop(sid, {})
                body = _answer(
                    "h2", head.get(":method", ""), head.get(":path", ""), bytes(bodies.pop(sid))
                )
                conn.send_headers(
                    sid,
                    [
                        (":status", "200"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
                pending[sid] = body
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id is not None:
                for table in (heads, bodies, pending):
                    table.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                return
        for sid in list(pending):
            rest = pending[sid]
            while rest:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                conn.send_data(sid, rest[:n])
                rest = rest[n:]
            if rest:
                pending[sid] = rest
            else:
                conn.end_stream(sid)
                del pending[sid]
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)


def _serve_h1(sock: socket.socket, first: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    req: h11.Request | None = None
    body = bytearray()
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(ev, h11.Request):
            req, body = ev, bytearray()
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage) and req is not None:
            out = _answer("http/1.1", req.method.decode(), req.target.decode(), bytes(body))
            headers = [("content-type", "application/json"), ("content-length", str(len(out)))]
            sock.sendall(
                conn.send(h11.Response(status_code=200, headers=headers))
                + (conn.send(h11.Data(data=out)) or b"")
                + (conn.send(h11.EndOfMessage()) or b"")
            )
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
        else:  # ConnectionClosed, or PAUSED after a close-delimited exchange
            return


def serve_grpc(addr: str) -> None:
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]

    def echo(req: bytes, ctx: Any) -> bytes:
        return b"echo " + req

    def count(req: bytes, ctx: Any) -> Iterator[bytes]:
        n, _, word = req.partition(b" ")
        for i in range(min(int(n), 1000)):
            yield b"%d %s" % (i, word)

    def join(reqs: Iterator[bytes], ctx: Any) -> bytes:
        return b"|".join(reqs)

    def chat(reqs: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        for r in reqs:
            yield b"re " + r

    def fail(req: bytes, ctx: Any) -> bytes:
        ctx.abort(grpc.StatusCode.NOT_FOUND, f"no such key: {req.decode(errors='replace')}")
        raise AssertionError("abort returns only by raising")

    def sleep(req: bytes, ctx: Any) -> bytes:
        # Returns early when the client's deadline cancels the call, bounded at 60 s anyway.
        ms = min(int(req), 60_000)
        deadline = time.monotonic() + ms / 1000
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return b"slept"

    handler = grpc.method_handlers_generic_handler(
        GRPC_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Join": grpc.stream_unary_rpc_method_handler(join),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler])
    if not server.add_insecure_port(addr):
        raise SystemExit(f"grpc: cannot listen on {addr}")
    server.start()
    print(f"listening on {addr}", flush=True)
    server.wait_for_termination()


def serve_ws_echo(addr: str) -> None:
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)
        print(f"ws_closed code={ws.close_code}", flush=True)

    ip, _, port = addr.rpartition(":")
    with serve(echo, ip, int(port), compression=None) as server:
        print(f"listening on {addr}", flush=True)
        server.serve_forever()


def _read_line(sock: socket.socket, limit: int = 512) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        b = sock.recv(1)
        if not b:
            break
        line += b
    return line.strip()


def _sink(sock: socket.socket) -> None:
    marker, _, size = _read_line(sock).partition(b" ")
    want = int(size or b"0")
    digest = hashlib.sha256()
    got = 0
    while got < want:
        data = sock.recv(min(CHUNK, want - got))
        if not data:
            break
        digest.update(data)
        got += len(data)
    sock.sendall(b"%s %d %s\n" % (marker, got, digest.hexdigest().encode()))


def _halfclose(sock: socket.socket) -> None:
    digest = hashlib.sha256()
    got = 0
    first = b""
    while True:
        data = sock.recv(CHUNK)
        if not data:
            break  # the client's FIN: only now do we answer
        if len(first) < 256:
            first += data[: 256 - len(first)]
        digest.update(data)
        got += len(data)
    line = first.split(b"\n", 1)[0]
    sock.sendall(b"after eof %s %d %s\n" % (line, got, digest.hexdigest().encode()))


def _greet(sock: socket.socket) -> None:
    sock.sendall(b"greeting from %s\n" % socket.gethostname().encode())
    while line := _read_line(sock):
        sock.sendall(b"echo " + line + b"\n")


# --- peer side: clients (each prints one JSON line) ----------------------------------------


def grpc_client(target: str, marker: str) -> dict[str, Any]:
    import grpc

    out: dict[str, Any] = {}
    m = f"/{GRPC_SERVICE}/"
    word = marker.encode()
    try:
        with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as ch:
            grpc.channel_ready_future(ch).result(timeout=CLIENT_TIMEOUT)
            t = CLIENT_TIMEOUT
            out["unary"] = ch.unary_unary(m + "Echo")(word, timeout=t).decode()
            out["server_stream"] = [
                r.decode() for r in ch.unary_stream(m + "Count")(b"5 " + word, timeout=t)
            ]
            parts = iter([b"a", word, b"c"])
            out["client_stream"] = ch.stream_unary(m + "Join")(parts, timeout=t).decode()
            out["bidi"] = _grpc_ping_pong(ch.stream_stream(m + "Chat"), word, 4)
            try:
                ch.unary_unary(m + "Fail")(word, timeout=t)
                out["error_status"] = None
            except grpc.RpcError as e:
                out["error_status"] = {"code": e.code().name, "details": e.details()}
            start = time.monotonic()
            try:
                ch.unary_unary(m + "Sleep")(b"5000", timeout=0.5)
                out["deadline"] = {"code": "OK"}
            except grpc.RpcError as e:
                out["deadline"] = {"code": e.code().name, "seconds": time.monotonic() - start}
            # The channel still works after a cancelled call.
            out["after"] = ch.unary_unary(m + "Echo")(b"after", timeout=t).decode()
    except Exception as e:
        out["error"] = repr(e)
    return out


def _grpc_ping_pong(call: Any, word: bytes, n: int) -> list[str]:
    """Send one message, wait for its answer, then send the next: both directions interleave
    on one stream (a proxy that buffered a whole side would deadlock here, bounded)."""
    sent: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := sent.get(timeout=CLIENT_TIMEOUT)) is not None:
            yield item

    responses = call(requests(), timeout=CLIENT_TIMEOUT)
    got = []
    try:
        for i in range(n):
            sent.put(b"%d %s" % (i, word))
            got.append(next(responses).decode())
    finally:
        sent.put(None)
    got += [r.decode() for r in responses]  # must be none left
    return got


def ws_client(url: str, marker: str, count: int) -> dict[str, Any]:
    from websockets.sync.client import connect

    out: dict[str, Any] = {"echoes": []}
    try:
        with connect(
            url, compression=None, proxy=None, open_timeout=CLIENT_TIMEOUT, close_timeout=5
        ) as ws:
            for i in range(count):
                ws.send(f"{i} {marker}")
                out["echoes"].append(ws.recv(timeout=CLIENT_TIMEOUT))
            ws.send(marker.encode() * 1000)  # one larger binary frame
            big = ws.recv(timeout=CLIENT_TIMEOUT)
            out["binary_ok"] = big == marker.encode() * 1000
            ws.close()
            # The server's close frame came back: the closing handshake completed.
            out["close_code"] = ws.close_code
    except Exception as e:
        out["error"] = repr(e)
    return out


def bulk_client(target: str, marker: str, size: int) -> dict[str, Any]:
    ip, _, port = target.rpartition(":")
    digest = hashlib.sha256()
    out: dict[str, Any] = {"bytes": size}
    start = time.monotonic()
    try:
        with socket.create_connection((ip, int(port)), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(f"{marker} {size}\n".encode())
            sent = 0
            while sent < size:
                block = os.urandom(min(CHUNK, size - sent))
                digest.update(block)
                sock.sendall(block)
                sent += len(block)
            out["reply"] = _read_line(sock).decode(errors="replace")
    except Exception as e:
        out["error"] = repr(e)
    out["seconds"] = time.monotonic() - start
    out["sha256"] = digest.hexdigest()
    out["mib_per_s"] = size / (1 << 20) / max(out["seconds"], 1e-9)
    return out


def halfclose_client(target: str, marker: str, timeout: float) -> dict[str, Any]:
    ip, _, port = target.rpartition(":")
    payload = marker.encode() + b"\n" + os.urandom(100_000)
    out: dict[str, Any] = {"sent": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    try:
        with socket.create_connection((ip, int(port)), timeout=CLIENT_TIMEOUT) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(timeout)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            out["reply"] = reply.decode(errors="replace").strip()
    except Exception as e:
        out["error"] = repr(e)
    return out


def greet_client(target: str, marker: str) -> dict[str, Any]:
    """Connect and send nothing: a server that speaks first must be heard at once."""
    ip, _, port = target.rpartition(":")
    out: dict[str, Any] = {}
    start = time.monotonic()
    try:
        with socket.create_connection((ip, int(port)), timeout=CLIENT_TIMEOUT) as sock:
            out["greeting"] = _read_line(sock).decode(errors="replace")
            out["seconds"] = time.monotonic() - start
            sock.sendall(marker.encode() + b"\n")
            out["echo"] = _read_line(sock).decode(errors="replace")
    except Exception as e:
        out["error"] = repr(e)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nodemesh.lab.peers")
    sub = p.add_subparsers(dest="kind", required=True)
    for kind in ("h2c", "grpc", "ws-echo", "sink", "halfclose", "greet"):
        sub.add_parser(kind).add_argument("--listen", required=True, metavar="IP:PORT")
    for kind in ("grpc-client", "ws-client", "bulk-client", "halfclose-client", "greet-client"):
        c = sub.add_parser(kind)
        c.add_argument("--target", required=True, help="IP:PORT, or the URL for ws-client")
        c.add_argument("--marker", required=True)
        c.add_argument("--count", type=int, default=5)
        c.add_argument("--bytes", type=int, default=1 << 20)
        c.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    servers: dict[str, Callable[[str], None]] = {
        "h2c": serve_h2c,
        "grpc": serve_grpc,
        "ws-echo": serve_ws_echo,
        "sink": lambda addr: _serve_threads(_listen(addr), _sink),
        "halfclose": lambda addr: _serve_threads(_listen(addr), _halfclose),
        "greet": lambda addr: _serve_threads(_listen(addr), _greet),
    }
    if a.kind in servers:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        servers[a.kind](a.listen)
        return
    clients: dict[str, Callable[[], dict[str, Any]]] = {
        "grpc-client": lambda: grpc_client(a.target, a.marker),
        "ws-client": lambda: ws_client(a.target, a.marker, a.count),
        "bulk-client": lambda: bulk_client(a.target, a.marker, a.bytes),
        "halfclose-client": lambda: halfclose_client(a.target, a.marker, a.timeout),
        "greet-client": lambda: greet_client(a.target, a.marker),
    }
    print(json.dumps(clients[a.kind]()), flush=True)


if __name__ == "__main__":
    main()
