"""Small programs the benchmark runs inside lab hosts, one subcommand each (stdlib and grpcio).

    python apps.py sink   --listen IP:PORT                 # h2: bulk TCP receiver
    python apps.py send   --target IP:PORT --bytes N --out F   # h1: bulk TCP sender, timed
    python apps.py pieces --listen IP:PORT                 # h2: http.server, body in its own write
    python apps.py grpc-server --listen IP:PORT            # h2: unary echo
    python apps.py grpc-client --target IP:PORT --concurrency C --duration S --out F
    python apps.py hold   --target IP:PORT --connections N --ready F --hold S  # h1: idle conns

The driver copies this file into the lab's work directory, so a program running as the agent's
uid (the "direct" path, which interception leaves alone) can read it.  Every program is bounded:
servers are stopped by the driver by pid, clients end after their duration or hold time.

The bulk transfer needs no half-close (Consul's proxy closes both directions when one ends): the
sender announces the size in an 8-byte header, the sink reads exactly that many bytes and answers
``ok <n> <peer address>\\n``, and the sender's clock runs from connect until that answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # bytes per send/recv in the bulk transfer
# 100 bytes, like nginx's body in peers.py
BODY = (
    b"nodemesh benchmark: a body written in its own write after the head, "
    b"as http.server does it ........\n"
)
GRPC_SERVICE = "bench.Echo"
GRPC_METHOD = "Echo"
GRPC_PAYLOAD = b"x" * 100
PEER_QUERY = b"peer?"


def addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


# --- bulk TCP ------------------------------------------------------------------------------------


def _read_exactly(conn: socket.socket, n: int, buf: bytearray) -> int:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[: min(len(buf), n - got)])
        if k == 0:
            break
        got += k
    return got


def serve_sink(listen: str) -> None:
    """Forever (the driver stops it): per connection, read the announced size, then answer."""
    srv = socket.create_server(addr(listen), reuse_port=False, backlog=64)
    buf = bytearray(CHUNK)

    def one(conn: socket.socket, peer: str) -> None:
        with conn:
            head = bytearray(8)
            if _read_exactly(conn, 8, head) != 8:
                return
            (n,) = struct.unpack("!Q", head)
            got = _read_exactly(conn, n, bytearray(CHUNK) if n > CHUNK else buf)
            with contextlib.suppress(OSError):
                conn.sendall(f"ok {got} {peer}\n".encode())

    while True:
        conn, (peer, _) = srv.accept()
        threading.Thread(target=one, args=(conn, peer), daemon=True).start()


def send_bulk(target: str, size: int, out: Path, timeout: float) -> None:
    zeros = bytes(CHUNK)
    start = time.perf_counter()
    sent = 0
    reply = b""
    error = ""
    try:
        with socket.create_connection(addr(target), timeout=timeout) as conn:
            conn.sendall(struct.pack("!Q", size))
            while sent < size:
                k = min(CHUNK, size - sent)
                conn.sendall(zeros[:k] if k < CHUNK else zeros)
                sent += k
            while not reply.endswith(b"\n"):
                part = conn.recv(64)
                if not part:
                    break
                reply += part
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    result = {
        "bytes": size,
        "sent": sent,
        "seconds": seconds,
        "reply": reply.decode(),
        "error": error,
    }
    out.write_text(json.dumps(result) + "\n")


# --- an upstream that writes its response in pieces ---------------------------------------------


class PiecesHandler(http.server.BaseHTTPRequestHandler):
    """Stock http.server: the head goes out in one write at end_headers, the body in another
    (wfile is unbuffered), and TCP_NODELAY is left off, as the standard library leaves it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("x-bench-peer", self.client_address[0])
        self.send_header("x-bench-client-id", self.headers.get("x-nodemesh-client-id", ""))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: Any) -> None:
        pass


def serve_pieces(listen: str) -> None:
    srv = http.server.ThreadingHTTPServer(addr(listen), PiecesHandler)
    srv.daemon_threads = True
    srv.serve_forever()


# --- gRPC unary echo -----------------------------------------------------------------------------


def _need_grpc() -> Any:
    try:
        import grpc  # only the gRPC subcommands need it
    except ImportError:
        sys.exit("apps.py: grpcio is missing; install it with .venv/bin/pip install -e '.[bench]'")
    return grpc


def serve_grpc(listen: str) -> None:
    grpc = _need_grpc()

    async def echo(request: bytes, context: Any) -> bytes:
        if request == PEER_QUERY:  # which path the call took: "<peer> <caller identity>"
            ids = dict(context.invocation_metadata()).get("x-nodemesh-client-id", "")
            return f"{context.peer()} {ids}".encode()
        return request

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)  # no serializers: bytes as they are
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GRPC_SERVICE, {GRPC_METHOD: handler}),)
        )
        server.add_insecure_port(listen)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def run_grpc_client(
    target: str, concurrency: int, warmup: float, duration: float, out: Path
) -> None:
    """``concurrency`` callers in a loop for ``warmup + duration`` seconds; the latencies of the
    calls that started after the warm-up, one µs value a line after a JSON summary line."""
    grpc = _need_grpc()
    latencies: list[int] = []
    errors: dict[str, int] = {}
    seen: dict[str, str] = {}
    details: dict[str, str] = {}  # the first message of each error code

    async def caller(call: Any, measure_from: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        while (t0 := loop.time()) < end:
            try:
                await call(GRPC_PAYLOAD, timeout=5.0)
            except grpc.aio.AioRpcError as e:
                if t0 >= measure_from:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    details.setdefault(e.code().name, str(e.details())[:300])
                continue
            if t0 >= measure_from:
                latencies.append(int((loop.time() - t0) * 1e6))

    async def main() -> float:
        opts = [("grpc.enable_http_proxy", 0)]
        async with grpc.aio.insecure_channel(target, options=opts) as channel:
            call = channel.unary_unary(f"/{GRPC_SERVICE}/{GRPC_METHOD}")
            try:
                seen["peer"] = (await call(PEER_QUERY, timeout=5.0)).decode()
            except grpc.aio.AioRpcError as e:
                seen["peer"] = f"error {e.code().name}: {e.details()}"
            loop = asyncio.get_running_loop()
            measure_from = loop.time() + warmup
            end = measure_from + duration
            await asyncio.gather(*(caller(call, measure_from, end) for _ in range(concurrency)))
            return loop.time() - measure_from

    seconds = asyncio.run(main())
    head = {
        "concurrency": concurrency,
        "seconds": seconds,
        "calls": len(latencies),
        "errors": errors,
        "error_details": details,
        "peer": seen.get("peer", ""),
    }
    out.write_text(json.dumps(head) + "\n" + "".join(f"{v}\n" for v in latencies))


# --- many idle keep-alive connections ------------------------------------------------------------


def _one_exchange(conn: socket.socket, host: str) -> int:
    """One GET on ``conn``; the response's status (0: none).  Reads the whole response."""
    conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(4096)
        if not part:
            return 0
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    while len(rest) < length:
        part = conn.recv(4096)
        if not part:
            return 0
        rest += part
    return int(lines[0].split()[1])


def hold(target: str, connections: int, ready: Path, hold_s: float) -> None:
    """Open ``connections`` keep-alive connections, one answered request on each, then hold
    them idle until SIGTERM or ``hold_s``; ``ready`` gets how many worked once all were tried."""
    host, port = addr(target)
    conns: list[socket.socket] = []
    statuses: dict[str, int] = {}
    start = time.monotonic()
    for _ in range(connections):
        try:
            c = socket.create_connection((host, port), timeout=10.0)
            status = _one_exchange(c, target)
        except OSError as e:
            statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        conns.append(c)
    opened = len(conns)
    tmp = ready.with_suffix(".tmp")
    summary = {"wanted": connections, "open": opened, "statuses": statuses}
    summary["seconds_to_open"] = round(time.monotonic() - start, 2)
    tmp.write_text(json.dumps(summary) + "\n")
    tmp.rename(ready)
    time.sleep(hold_s)
    for c in conns:
        c.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sink", "pieces", "grpc-server"):
        sub.add_parser(name).add_argument("--listen", required=True)
    s = sub.add_parser("send")
    s.add_argument("--target", required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--timeout", type=float, default=120.0)
    s.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("grpc-client")
    g.add_argument("--target", required=True)
    g.add_argument("--concurrency", type=int, default=10)
    g.add_argument("--warmup", type=float, default=2.0)
    g.add_argument("--duration", type=float, required=True)
    g.add_argument("--out", type=Path, required=True)
    h = sub.add_parser("hold")
    h.add_argument("--target", required=True)
    h.add_argument("--connections", type=int, required=True)
    h.add_argument("--ready", type=Path, required=True)
    h.add_argument("--hold", type=float, default=120.0)
    a = ap.parse_args(argv)
    if a.cmd == "sink":
        serve_sink(a.listen)
    elif a.cmd == "send":
        send_bulk(a.target, a.bytes, a.out, a.timeout)
    elif a.cmd == "pieces":
        serve_pieces(a.listen)
    elif a.cmd == "grpc-server":
        serve_grpc(a.listen)
    elif a.cmd == "grpc-client":
        run_grpc_client(a.target, a.concurrency, a.warmup, a.duration, a.out)
    elif a.cmd == "hold":
        hold(a.target, a.connections, a.ready, a.hold)


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    main()
