"""The agents' own cost per request, in one process, without root, Consul or namespaces.

    .venv/bin/python bench/datapath.py [--connections 16] [--duration 5] [--profile]
    .venv/bin/python bench/datapath.py --floor [http|codec|l4]  # the least a hop can do, in place

Both agents' production data paths (``Outbound`` on "a", ``Inbound`` on "b", the component
tests' mesh pair: real certificates from a real CA, real pools, balancer and recorder) run in
this process under one trio loop, joined by loopback TCP with mTLS between them.  A canned
HTTP/1.1 app and a closed-loop client run as separate processes (plain sockets, no HTTP
library), so this process's CPU time is the two agents' and nothing else:

    client ──tcp──> outbound a ══ mTLS over tcp ══> inbound b ──tcp──> app

It prints requests, the client's latency percentiles and the agents' CPU per request (user and
system, both agents together and per agent).  ``--profile`` adds a cProfile of the agents
(sorted by own time; profiling slows them several-fold, so its figures are shares, not costs).
Floors to compare with: ``../shared/bench/floors.py`` (h11, h2, TLS and a trio hop alone).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BODY = b"x" * 100
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\n" + BODY
WARMUP = 0.5  # seconds the client runs before the measured window
WARM = b"warm\n"  # the client's word that the measured window begins
REQUEST = b"GET / HTTP/1.1\r\nHost: 198.18.0.2:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def app(port: int, seconds: float) -> None:
    """A canned answer for each request head: a stand-in for nginx costing nearly nothing."""
    lsock = socket.create_server(("127.0.0.1", port), backlog=128)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is lsock:
                conn, _ = lsock.accept()
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            heads = data.count(b"\r\n\r\n")  # GETs only: a request is its head
            if heads:
                sock.sendall(RESPONSE * heads)


def sink(port: int, seconds: float) -> None:
    """Each connection: read to EOF, answer ``ok <bytes>``, close (the bulk app)."""
    lsock = socket.create_server(("127.0.0.1", port), backlog=16)
    lsock.settimeout(seconds)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            return
        with conn:
            n = 0
            while data := conn.recv(1 << 20):
                n += len(data)
            conn.sendall(f"ok {n}\n".encode())


def send_bulk(port: int, mib: int) -> None:
    """``mib`` MiB on one connection, then a half-close; JSON on stdout once the sink agrees."""
    s = socket.create_connection(("127.0.0.1", port))
    sys.stdout.buffer.write(WARM)
    sys.stdout.flush()
    chunk = bytes(1 << 20)
    start = time.perf_counter()
    for _ in range(mib):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while data := s.recv(100):
        reply += data
    seconds = time.perf_counter() - start
    ok = reply == f"ok {mib << 20}\n".encode()
    print(
        json.dumps(
            {
                "bytes": mib << 20,
                "ok": ok,
                "seconds": round(seconds, 3),
                "mib_s": round(mib / seconds, 1),
                "requests": 1,
            }
        )
    )


def client(port: int, connections: int, seconds: float) -> None:
    """``connections`` keep-alive connections, one request at a time each; JSON on stdout."""
    sel = selectors.DefaultSelector()
    started: dict[socket.socket, float] = {}
    got: dict[socket.socket, int] = {}
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        got[s] = 0
        started[s] = time.perf_counter()
        s.send(REQUEST)
    latencies: list[float] = []
    errors = 0
    warm_end = time.monotonic() + WARMUP
    end = warm_end + seconds
    warm = True
    while time.monotonic() < end:
        if warm and time.monotonic() >= warm_end:
            warm = False
            latencies.clear()
            errors = 0
            sys.stdout.buffer.write(WARM)
            sys.stdout.flush()
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            data = s.recv(65536)
            if not data:
                errors += 1
                sel.unregister(s)
                continue
            got[s] += len(data)
            if got[s] >= len(RESPONSE):
                if got[s] != len(RESPONSE) or not data.endswith(BODY):
                    errors += 1
                now = time.perf_counter()
                latencies.append(now - started[s])
                got[s] = 0
                started[s] = now
                s.send(REQUEST)
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return round(1e3 * latencies[min(n - 1, int(q * n))], 3) if n else 0.0

    print(
        json.dumps(
            {
                "requests": n,
                "errors": errors,
                "seconds": seconds,
                "p50_ms": pct(0.5),
                "p90_ms": pct(0.9),
                "p99_ms": pct(0.99),
            }
        )
    )


async def relay(down: Any, up: Any) -> None:
    """The least an HTTP/1.1 proxy hop can do with nodemesh's pieces (h11 on both sides, the
    same streams, ``_parsed`` events): per request, parse the head, re-frame it upstream, parse
    the response, re-frame it downstream.  No routing, pool, balancer, metrics, header policy,
    timeouts or error answers: the floor under one agent's cost per request."""
    import h11

    from nodemesh.transport.edges import IO_ERRORS

    ds = h11.Connection(h11.SERVER)
    us = h11.Connection(h11.CLIENT)

    async def event(conn: h11.Connection, stream: Any) -> Any:
        while (ev := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        return ev

    try:
        while True:
            req = await event(ds, down)
            if type(req) is not h11.Request:
                return
            await event(ds, down)  # EndOfMessage: GETs only
            out = us.send(
                h11.Request(method=req.method, target=req.target, headers=req.headers, _parsed=True)
            )
            await up.send_all(out + us.send(h11.EndOfMessage()))  # type: ignore[operator]
            parts = []
            while True:
                ev = await event(us, up)
                if type(ev) is h11.Response:
                    ev = h11.Response(
                        status_code=ev.status_code,
                        headers=ev.headers,
                        reason=ev.reason,
                        _parsed=True,
                    )
                parts.append(ds.send(ev))
                if type(ev) is h11.EndOfMessage:
                    break
            await down.send_all(b"".join(parts))  # type: ignore[arg-type]
            ds.start_next_cycle()
            us.start_next_cycle()
    except IO_ERRORS:
        return


async def floor(args: argparse.Namespace, app_port: int) -> dict[str, object]:
    """``relay`` in place of each agent: app conn -> relay -> mTLS -> relay -> app, 1:1.

    ``--floor l4`` puts nodemesh's opaque ``splice`` there instead: no HTTP at all, bytes copied
    both ways as they come (an L4 proxy such as Consul's built-in one), with the same streams
    and mTLS.  What is left is trio's scheduling, the socket calls and TLS: the part of an
    agent's cost no HTTP codec changes."""
    import trio

    sys.path.insert(0, str(HERE.parent))
    from floor import h1_relay  # bench/floor.py: the lab's trio-h1 path

    from nodemesh.identity import spiffe
    from nodemesh.proxy.splice import splice
    from nodemesh.transport.edges import accept_tls, open_tcp, open_tls
    from nodemesh.transport.streams import SocketIO
    from tests.component import meshpair as mp

    a = mp.agent("a", mp.A_IP)
    b = mp.agent("b", mp.B_IP)
    mp._issue(b.identities, mp.WEB)
    client_ctx = a.identities.client_context(None, http1=True)
    server_ctx = b.identities.server_context()
    ports: dict[str, int] = {}
    hop = {"l4": splice, "codec": h1_relay}.get(args.floor, relay)

    async def outbound(stream: trio.SocketStream) -> None:
        down = SocketIO.adopt(stream)
        raw = await open_tcp("127.0.0.1", ports["inbound"], 5.0)
        up = await open_tls(raw, client_ctx, spiffe.server_name(mp.WEB), 5.0)
        try:
            await hop(down, up)
        finally:
            down.close()
            await up.aclose()

    async def inbound(stream: trio.SocketStream) -> None:
        down = await accept_tls(SocketIO.adopt(stream), server_ctx, 5.0)
        up = await open_tcp("127.0.0.1", app_port, 5.0)
        try:
            await hop(down, up)
        finally:
            up.close()
            await down.aclose()

    return await measure(args, {"outbound": outbound, "inbound": inbound}, ports)


async def agents(args: argparse.Namespace, app_port: int) -> dict[str, object]:
    import trio

    sys.path.insert(0, str(HERE.parent))
    from nodemesh.inbound.server import Inbound
    from nodemesh.outbound.server import Outbound
    from nodemesh.transport.edges import open_tcp
    from nodemesh.transport.streams import SocketIO
    from tests.component import meshpair as mp

    a = mp.agent("a", mp.A_IP)
    b = mp.agent("b", mp.B_IP)
    mp._issue(b.identities, mp.WEB)
    ports: dict[str, int] = {}

    async def dial_from_a(host: str, port: int, timeout: float) -> SocketIO:  # noqa: ASYNC109
        assert (host, port) == (mp.B_IP, mp.MESH_PORT)
        return await open_tcp("127.0.0.1", ports["inbound"], timeout)

    async def dial_from_b(host: str, port: int, timeout: float) -> SocketIO:  # noqa: ASYNC109
        assert (host, port) == mp.APP
        return await open_tcp("127.0.0.1", app_port, timeout)

    if args.bulk_mib:  # web declared tcp: the opaque path (CONNECT streams between agents)
        for state, node in ((a, "a"), (b, "b")):
            state.publish(mp.build(mp.catalog({"protocol": "tcp"}), node))
    outbound = Outbound(a, dial=dial_from_a)
    inbound = Inbound(b, dial=dial_from_b)

    async def serve_outbound(stream: trio.SocketStream) -> None:
        io = SocketIO.adopt(stream)
        try:
            await outbound.serve_connection(io, mp.APP)
        finally:
            io.close()

    async def serve_inbound(stream: trio.SocketStream) -> None:
        await inbound.serve_connection(SocketIO.adopt(stream), "127.0.0.1")

    async def serve(*, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(outbound.mux.serve)
            await nursery.start(inbound.h2apps.serve)
            if hasattr(outbound.idle, "serve"):  # revisions before the idle sweeper had none
                await nursery.start(outbound.idle.serve)
                await nursery.start(inbound.idle.serve)
            task_status.started()

    handlers = {"outbound": serve_outbound, "inbound": serve_inbound}
    return await measure(args, handlers, ports, serve)


async def measure(
    args: argparse.Namespace,
    handlers: dict[str, Callable[[Any], Awaitable[None]]],
    ports: dict[str, int],
    background: Callable[..., Awaitable[None]] | None = None,
) -> dict[str, object]:
    """Listen with ``handlers``, run the client against "outbound", and take this process's
    CPU time over the client's measured window (after its warm-up)."""
    import trio

    async with trio.open_nursery() as nursery:
        if background is not None:
            await nursery.start(background)
        for name, handler in handlers.items():
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            ports[name] = listeners[0].socket.getsockname()[1]
        profiler = cProfile.Profile() if args.profile else None
        argv = [sys.executable, __file__, "--client", str(ports["outbound"])]
        argv += ["--connections", str(args.connections), "--duration", str(args.duration)]
        argv += ["--bulk-mib", str(args.bulk_mib)]
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        out = b""
        while not out.startswith(WARM):  # bounded: the client says so within its warm-up
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                raise SystemExit("bench/datapath.py: the client ended before its warm-up did")
            out += chunk
        out = out[len(WARM) :]
        before = resource.getrusage(resource.RUSAGE_SELF)
        if profiler:
            profiler.enable()
        while chunk := await proc.stdout.receive_some(65536):
            out += chunk
        after = resource.getrusage(resource.RUSAGE_SELF)
        if profiler:
            profiler.disable()
        await proc.wait()
        nursery.cancel_scope.cancel()
    if profiler:
        dump = Path(tempfile.gettempdir()) / f"datapath-{os.getpid()}.prof"
        profiler.dump_stats(str(dump))
        print(f"bench/datapath.py: the whole profile is in {dump} (pstats)", file=sys.stderr)
        ps = pstats.Stats(profiler, stream=sys.stderr)
        ps.sort_stats("tottime").print_stats(35)
    result: dict[str, object] = json.loads(out)
    n = max(int(result["requests"]), 1)  # type: ignore[call-overload]
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    if "bytes" in result:
        gib = int(result["bytes"]) / 2**30  # type: ignore[call-overload]
        result["agents_cpu_s_per_gib"] = round((user + system) / gib, 2)
        return result
    result["rps"] = round(n / args.duration, 1)
    result["agents_us_per_request"] = {
        "user": round(1e6 * user / n, 1),
        "system": round(1e6 * system / n, 1),
        "total": round(1e6 * (user + system) / n, 1),
        "per_agent": round(1e6 * (user + system) / n / 2, 1),
    }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--floor",
        nargs="?",
        const="http",
        choices=("http", "codec", "l4"),
        help="the least proxies in place: an h11 relay (http, the default), the same relay "
        "with the agents' llhttp codec (codec), or bytes copied (l4)",
    )
    ap.add_argument("--bulk-mib", type=int, default=0, help="one opaque transfer of this size")
    ap.add_argument("--app", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.connections <= 1000 or not 0 < args.duration <= 600:
        ap.error("need 1 <= --connections <= 1000 and 0 < --duration <= 600")
    if args.app is not None:
        (sink if args.bulk_mib else app)(args.app, args.duration)
        return 0
    if args.client is not None:
        if args.bulk_mib:
            send_bulk(args.client, args.bulk_mib)
        else:
            client(args.client, args.connections, args.duration)
        return 0
    import structlog
    import trio

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        app_port = probe.getsockname()[1]
    if args.bulk_mib and args.floor:
        ap.error("--floor relays HTTP/1.1 requests only")
    app_argv = [sys.executable, __file__, "--app", str(app_port), "--bulk-mib", str(args.bulk_mib)]
    app_proc = subprocess.Popen([*app_argv, "--duration", str(args.duration + 30)])
    try:
        deadline = time.monotonic() + 10
        while True:  # bounded: until the app listens
            try:
                socket.create_connection(("127.0.0.1", app_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("bench/datapath.py: the app did not start") from None
                time.sleep(0.05)
        result = trio.run(floor if args.floor else agents, args, app_port)
    finally:
        app_proc.terminate()
        app_proc.wait(timeout=10)
    result["python"] = sys.version.split()[0]
    result["pid"] = os.getpid()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
