"""A recorded controller for CLI tests: real mTLS, recorded ``GET /v1/metrics`` answers.

It serves the files in ``tests/fixtures/controller`` (``<by>-<window>.json``) on loopback over
HTTPS with a certificate from a real mesh CA, and demands a client certificate from that CA,
as the controller does.  ``stop()`` and ``start()`` on the same port play a controller going
away and coming back.  ``answers`` can be replaced while it runs (the next fetch sees it).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.ca import CertificateAuthority
from tests.fixtures.controller import answer

TD, DC = "nodemesh.local", "dc1"
RECORDED = {
    (by, window): answer(by, window)
    for by, window in [
        ("service", "1m"),
        ("route", "1m"),
        ("host", "1m"),
        ("edge", "1m"),
        ("edge", "10s"),
        ("edge_route", "1m"),
        ("edge_route", "10s"),
    ]
}


@dataclass
class Files:
    ca: Path  # the mesh CA, PEM
    cert: Path  # a node's key and certificate chain, one PEM (the agent's layout)


def write_credentials(ca: CertificateAuthority, where: Path, node: str = "ops") -> Files:
    ident = spiffe.node_id(TD, DC, node)
    key = keys.generate_key()
    chain = ca.sign_csr(keys.make_csr(key, ident), ident, 600)
    where.mkdir(parents=True, exist_ok=True)
    (where / "ca.pem").write_bytes(ca.roots_pem)
    (where / f"node-{node}.pem").write_bytes(key + chain)
    return Files(where / "ca.pem", where / f"node-{node}.pem")


class FakeController:
    def __init__(self, ca: CertificateAuthority) -> None:
        ident = spiffe.service_id(TD, DC, "nodemesh-controller")  # the controller's own ID
        key = keys.generate_key()
        chain = ca.sign_csr(
            keys.make_csr(key, ident), ident, 600, dns_names=("nodemesh-controller",)
        )
        self.ctx = tls.server_context(chain, key, ca.roots_pem, alpn=("http/1.1",))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.answers: dict[tuple[str, str], dict[str, Any]] = dict(RECORDED)
        self.queries: list[tuple[str, str, str]] = []  # (by, window, client SPIFFE ID)
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                found = fake.answers.get((q.get("by", ""), q.get("window", "")))
                if url.path != "/v1/metrics" or found is None:
                    self._send(400, {"error": f"no recorded answer for {self.path}"})
                    return
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                sans = [v for k, v in (peer or {}).get("subjectAltName", ()) if k == "URI"]
                fake.queries.append((q["by"], q["window"], sans[0] if sans else ""))
                self._send(200, found)

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.socket = self.ctx.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        self._server = self._thread = None


@contextmanager
def fake_controller(tmp: Path) -> Iterator[tuple[FakeController, Files]]:
    ca = CertificateAuthority.create(TD)
    fake = FakeController(ca)
    files = write_credentials(ca, tmp / "identity")
    fake.start()
    try:
        yield fake, files
    finally:
        fake.stop()
