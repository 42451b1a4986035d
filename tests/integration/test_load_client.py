"""The lab's load client behaves as RFC 9112 section 9.3.1 asks of HTTP clients, against a
loopback server that closes keep-alive connections the ways a restarting server does."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from nodemesh.lab import load

pytestmark = pytest.mark.integration
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Server:
    """Answers per connection according to ``plan``: for the i-th request on a connection,
    "ok" answers, "close" answers and then closes (FIN while idle), "drop" reads the request
    and closes without a byte (the race a restart opens)."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.requests = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/x"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                for step in self.plan:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    self.requests += 1
                    if step == "drop":
                        break
                    conn.sendall(OK)
                    if step == "close":
                        break
                self.plan = ["ok"] * 100  # later connections behave

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the thread
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("server", [["ok", "close"]], indirect=True)
def test_an_idle_connection_the_server_closed_is_not_reused(server: Server) -> None:
    final = load.run(server.url, count=4, rate=20)
    assert (final["sent"], final["failed"], final["retried"]) == (4, 0, 0)
    assert server.connections == 2


@pytest.mark.parametrize("server", [["ok", "drop"]], indirect=True)
def test_an_idempotent_request_lost_on_a_reused_connection_is_sent_once_more(
    server: Server,
) -> None:
    final = load.run(server.url, count=3, rate=20)
    assert (final["sent"], final["failed"], final["retried"]) == (3, 0, 1)
    assert server.requests == 4  # the dropped one reached the server, then its retry


@pytest.mark.parametrize("server", [["drop"]], indirect=True)
def test_a_failure_on_a_fresh_connection_is_a_failure(server: Server) -> None:
    final = load.run(server.url, count=1, rate=20)
    assert (final["sent"], final["failed"], final["retried"]) == (1, 1, 0)


@pytest.mark.parametrize("server", [["ok", "drop"]], indirect=True)
def test_a_post_is_never_sent_twice(server: Server) -> None:
    final = load.run(server.url, count=2, rate=20, method="POST")
    assert (final["sent"], final["failed"], final["retried"]) == (2, 1, 0)
