"""An *unmodified* sample service: plain HTTP/1.1 on the stdlib, knowing nothing of nodemesh.

    python -m nodemesh.lab.sampleapp --name web --listen 198.18.0.3:8080
    python -m nodemesh.lab.sampleapp --name shop --listen 198.18.0.2:8090 --upstream web

It is what the mesh must carry without any change: a ThreadingHTTPServer with keep-alive that
registers itself with the local Consul agent (an HTTP check every second) and, for upstreams,
finds instances in Consul's health API and calls one directly at its ip:port, the way an app
on a VM does before anyone installs a mesh.

Routes (every answer is JSON unless it is a byte stream):
    GET  /             {service, host, address, pid, client, method, path, headers, requests}
                       with --upstream: calls every upstream's GET / and adds "calls"
    GET  /call?path=P  calls P on the first upstream; its status is passed through
    POST /echo         the request body back, streamed as it arrives (chunked in, chunked out)
    GET  /bytes?n=N    N bytes of a repeating pattern, streamed
    GET  /slow?ms=N    answers after N ms
    GET  /status/NNN   answers with status NNN
    GET  /health       the Consul check
On SIGTERM it deregisters from Consul, then exits.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_BYTES = 1 << 30  # /bytes and /echo stop at 1 GiB: a lab app must not fill the disk or RAM
MAX_SLOW_MS = 60_000
CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 10.0  # seconds; longer than /slow's useful range in tests, still bounded
PATTERN = bytes(range(256)) * (CHUNK // 256)


class Upstreams:
    """Finds healthy instances in the local Consul agent and keeps one connection per instance
    per thread alive, as an ordinary client library would."""

    def __init__(self, names: list[str], consul: tuple[str, int]) -> None:
        self.names = names
        self.consul = consul
        self._local = threading.local()

    def _conns(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        conns: dict[tuple[str, int], http.client.HTTPConnection] | None
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = {}
            self._local.conns = conns
        return conns

    def instances(self, service: str) -> list[tuple[str, int]]:
        status, body, _ = self._request(self.consul, "GET", f"/v1/health/service/{service}?passing")
        if status != 200:
            raise OSError(f"consul answered {status} for service {service}")
        out = []
        for entry in json.loads(body):
            addr = entry["Service"]["Address"] or entry["Node"]["Address"]
            out.append((addr, int(entry["Service"]["Port"])))
        return out

    def call(self, service: str, path: str) -> dict[str, Any]:
        instances = self.instances(service)
        if not instances:
            return {"service": service, "status": 503, "error": f"no healthy {service} instance"}
        addr = random.choice(instances)
        where = f"{addr[0]}:{addr[1]}"
        try:
            status, body, attempts = self._request(addr, "GET", path)
        except (OSError, http.client.HTTPException) as e:
            return {"service": service, "address": where, "status": 502, "error": repr(e)}
        try:
            decoded: Any = json.loads(body)
        except ValueError:
            decoded = body.decode(errors="replace")
        return {
            "service": service,
            "address": where,
            "status": status,
            "attempts": attempts,
            "body": decoded,
        }

    def _request(self, addr: tuple[str, int], method: str, path: str) -> tuple[int, bytes, int]:
        """One request on the kept-alive connection to ``addr``.

        A reused connection the server already closed fails before any response byte; that (and
        only that) is retried once on a fresh connection, as urllib3 and most clients do.
        """
        conns = self._conns()
        for attempt in (1, 2):
            conn = conns.get(addr)
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(addr[0], addr[1], timeout=UPSTREAM_TIMEOUT)
                conns[addr] = conn
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                body = resp.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                conn.close()
                del conns[addr]
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.close()
                del conns[addr]
                raise
            if resp.will_close:
                conn.close()
                del conns[addr]
            return resp.status, body, attempt
        raise AssertionError("unreachable")


class App(ThreadingHTTPServer):
    daemon_threads = True  # a stuck keep-alive client must not block exit
    allow_reuse_address = True

    def __init__(self, name: str, host: str, listen: tuple[str, int], upstreams: Upstreams) -> None:
        super().__init__(listen, Handler)
        self.name = name
        self.host = host
        self.upstreams = upstreams
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        ip, port = self.socket.getsockname()[:2]
        return str(ip), int(port)

    def count(self) -> int:
        with self._lock:
            self.requests += 1
            return self.requests


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    # Headers and body go out in separate writes; with Nagle on, the second one waits for the
    # client's delayed ACK (~40 ms on Linux) on every kept-alive request.
    disable_nagle_algorithm = True
    server: App

    def log_message(self, format: str, *args: Any) -> None:
        # One line per request would dominate the log under load; errors still go to stderr.
        pass

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _about(self) -> dict[str, Any]:
        addr = self.server.address
        return {
            "service": self.server.name,
            "host": self.server.host,
            "address": f"{addr[0]}:{addr[1]}",
            "pid": os.getpid(),
            "client": f"{self.client_address[0]}:{self.client_address[1]}",
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "requests": self.server.count(),
        }

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")
        if url.path == "/":
            about = self._about()
            calls = [self.server.upstreams.call(u, "/") for u in self.server.upstreams.names]
            if calls:
                about["calls"] = calls
            ok = all(200 <= c["status"] < 300 for c in calls)
            self._send_json(200 if ok else 502, about)
        elif url.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif url.path == "/call":
            if not self.server.upstreams.names:
                self._send_json(400, {"error": "this app has no --upstream to call"})
                return
            target = query.get("path", ["/"])[0]
            call = self.server.upstreams.call(self.server.upstreams.names[0], target)
            self._send_json(call["status"], {**self._about(), "calls": [call]})
        elif url.path == "/bytes":
            n = _int_arg(query, "n", 0, MAX_BYTES)
            if n is None:
                self._send_json(400, {"error": f"n must be an integer 0..{MAX_BYTES}"})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            for chunk in _pattern(n):
                self.wfile.write(chunk)
        elif url.path == "/slow":
            ms = _int_arg(query, "ms", 0, MAX_SLOW_MS)
            if ms is None:
                self._send_json(400, {"error": f"ms must be an integer 0..{MAX_SLOW_MS}"})
                return
            time.sleep(ms / 1000)
            self._send_json(200, {**self._about(), "slept_ms": ms})
        elif len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            code = int(parts[1])
            if not 200 <= code <= 599:
                self._send_json(400, {"error": "status must be 200..599"})
                return
            self._send_json(code, {**self._about(), "status": code})
        else:
            self._send_json(404, {"error": f"no route {url.path}"})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/echo":
            self._send_json(404, {"error": f"no route {self.path}"})
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._echo_chunked()
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BYTES:
            self.close_connection = True
            self._send_json(400, {"error": f"Content-Length must be 0..{MAX_BYTES}"})
            return
        self.send_response(200)
        self.send_header(
            "Content-Type", self.headers.get("Content-Type", "application/octet-stream")
        )
        self.send_header("Content-Length", str(length))
        self.end_headers()
        left = length
        while left > 0:
            chunk = self.rfile.read1(min(CHUNK, left))
            if not chunk:
                self.close_connection = True
                return
            self.wfile.write(chunk)
            left -= len(chunk)

    def _echo_chunked(self) -> None:
        self.send_response(200)
        self.send_header(
            "Content-Type", self.headers.get("Content-Type", "application/octet-stream")
        )
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                return
            total += size
            if size == 0 or total > MAX_BYTES:
                break
            while size > 0:
                data = self.rfile.read1(min(size, CHUNK))
                if not data:
                    self.close_connection = True
                    return
                size -= len(data)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.rfile.read(2)  # the CRLF that ends each chunk
        # Skip trailers up to the empty line that ends the request.
        for _ in range(100):
            if self.rfile.readline(1024) in (b"\r\n", b"\n", b""):
                break
        self.wfile.write(b"0\r\n\r\n")


def _int_arg(query: dict[str, list[str]], key: str, lo: int, hi: int) -> int | None:
    try:
        v = int(query.get(key, ["0"])[0])
    except ValueError:
        return None
    return v if lo <= v <= hi else None


def _pattern(n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = PATTERN[: min(n, len(PATTERN))]
        n -= len(chunk)
        yield chunk


# --- Consul registration: the service definition a VM's config management would install ----------


def service_definition(name: str, host: str, listen: tuple[str, int]) -> dict[str, Any]:
    ip, port = listen
    return {
        "ID": f"{name}-{host}-{port}",
        "Name": name,
        "Address": ip,
        "Port": port,
        "Meta": {"lab_host": host},
        "Check": {
            "Name": f"{name} HTTP",
            "HTTP": f"http://{ip}:{port}/health",
            "Interval": "1s",
            "Timeout": "1s",
        },
    }


def _consul(consul: tuple[str, int], method: str, path: str, body: Any = None) -> None:
    conn = http.client.HTTPConnection(consul[0], consul[1], timeout=5)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body))
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise OSError(f"consul {method} {path} answered {resp.status}: {text.strip()}")
    finally:
        conn.close()


def _addr(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{v!r} is not ip:port (like 198.18.0.3:8080)")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nodemesh.lab.sampleapp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--name", required=True, help="service name, registered in Consul")
    ap.add_argument("--listen", required=True, type=_addr, help="ip:port to serve on")
    ap.add_argument("--upstream", action="append", default=[], help="service to call (repeat)")
    ap.add_argument("--host", default=socket.gethostname(), help="host name to report")
    ap.add_argument("--consul", type=_addr, default=("127.0.0.1", 8500), help="local agent")
    ap.add_argument("--no-register", action="store_true", help="do not register in Consul")
    args = ap.parse_args(argv)

    app = App(args.name, args.host, args.listen, Upstreams(args.upstream, args.consul))
    definition = service_definition(args.name, args.host, app.address)

    def on_term(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever, which runs in this same thread: raise instead.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if not args.no_register:
            _consul(args.consul, "PUT", "/v1/agent/service/register", definition)
        print(
            f"listening name={args.name} address={app.address[0]}:{app.address[1]}",
            flush=True,
        )
        app.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.server_close()
        if not args.no_register:
            try:
                _consul(args.consul, "PUT", f"/v1/agent/service/deregister/{definition['ID']}")
            except OSError as e:
                print(f"deregister_failed service={definition['ID']} error={e!r}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
