"""Ordinary app behaviours the agent must absorb without the app or its callers noticing.

    client on h1 ──> iptables ──> agent h1 ══ mTLS ══> agent h2 ──> quirky stdlib app on h2

Both apps are Python's own ``http.server`` as people write it, registered in Consul like any
service:

* ``pieces`` writes a response's head and body in two small writes with Nagle on (stdlib's
  defaults: ``wbufsize = 0``, no ``TCP_NODELAY``).  On a kept-alive connection the second write
  waits for the ACK of the first, which Linux delays by up to 40 ms unless the reader asks for
  it at once (``TCP_QUICKACK``).
* ``brief`` closes every kept-alive connection after ``IDLE`` seconds without a request (the
  handler's ``timeout``), far sooner than the agent forgets its pooled connections (60 s).

"Direct" calls run as the agent's uid, which interception skips: the same client and app with
no agent in between.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodemesh.lab import netns
from nodemesh.lab.mesh import NODEMESH_USER, Lab, LabSpec

pytestmark = pytest.mark.system

PIECES_PORT = 8081
BRIEF_PORT = 8082
IDLE = 0.5  # seconds: brief's idle timeout for a kept-alive connection
PAUSE = 1.0  # seconds between brief's requests: its connections have closed by then
CALLS = 30  # sequential keep-alive requests per path
STALL = 0.040  # seconds: Linux's minimum delayed-ACK timeout (TCP_DELACK_MIN)

APP = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ip, port, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seen = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    # Stock stdlib: Nagle stays on and wbufsize is 0, so end_headers() and wfile.write(body)
    # leave as two separate small writes.
    protocol_version = "HTTP/1.1"
    timeout = idle or None  # >0: close a kept-alive connection idle this long

    def log_message(self, format, *args):
        pass

    def _answer(self, extra):
        body = json.dumps({
            "client": self.client_address[0],
            "caller": self.headers.get("x-nodemesh-client-id", ""),
            **extra,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer({})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        rid = self.headers.get("x-request-id", "")
        with lock:
            seen[rid] = seen.get(rid, 0) + 1
            times = seen[rid]
        self._answer({"bytes": len(body), "times": times})


server = ThreadingHTTPServer((ip, port), Handler)
server.daemon_threads = True
print("listening", ip, port, flush=True)
server.serve_forever()
"""

# Sequential keep-alive GETs on one connection; each one's time in ms, and who the app saw.
TIMED_CALLS = """
import http.client, json, time
c = http.client.HTTPConnection("{ip}", {port}, timeout=10)
ms, clients, local = [], set(), set()
for i in range({n}):
    t = time.perf_counter()
    c.request("GET", "/?i=%d" % i)
    r = c.getresponse()
    body = r.read()
    ms.append((time.perf_counter() - t) * 1000)
    if r.status != 200:
        raise SystemExit("request %d answered %d: %r" % (i, r.status, body[:200]))
    clients.add(json.loads(body)["client"])
    local.add(c.sock.getsockname()[1])
print(json.dumps({{"ms": ms, "clients": sorted(clients), "connections": len(local)}}))
"""

# Requests with pauses longer than the app's idle timeout before each, on one kept-alive client
# connection and on new ones.  Just before each pause a quick request leaves a fresh connection
# in h2's pool (a failed request would have taken the stale one out, and the next would pass on a
# new one), so every measured request meets a pooled connection the app has closed.  Every
# outcome is recorded; nothing here raises.
PAUSED_CALLS = """
import http.client, json, os, time
ip, port, pause, method = "{ip}", {port}, {pause}, "{method}"


def prime():
    for _ in range(2):
        c = http.client.HTTPConnection(ip, port, timeout=10)
        try:
            c.request("GET", "/prime")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                return True
        except Exception:
            pass
        finally:
            c.close()
    return False


kept = http.client.HTTPConnection(ip, port, timeout=10)
out = []
for i in range({rounds}):
    for conn in ("kept", "new"):
        primed = prime()
        time.sleep(pause)
        c = kept if conn == "kept" else http.client.HTTPConnection(ip, port, timeout=10)
        rid = os.urandom(6).hex()
        body = os.urandom(2048).hex().encode() if method == "POST" else None
        one = {{"round": i, "conn": conn, "method": method, "primed": primed}}
        try:
            c.request(method, "/?round=%d" % i, body=body, headers={{"x-request-id": rid}})
            r = c.getresponse()
            data = r.read()
            one.update(status=r.status, error=r.getheader("x-nodemesh-error"))
            if r.status == 200:
                one["answer"] = json.loads(data)
            else:
                one["answer"] = data[:200].decode(errors="replace")
        except Exception as e:
            one.update(status=0, error=repr(e))
            c.close()
        if conn == "new":
            c.close()
        out.append(one)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(servers=1, hosts=2, apps=())


@pytest.fixture(scope="module")
def apps(lab: Lab) -> Iterator[Lab]:
    """``pieces`` and ``brief`` on h2, registered and reachable through the mesh from h1."""
    script = lab.dir / "h2" / "quirky_app.py"
    script.write_text(APP)
    ip = lab.host_ip("h2")
    started: list[netns.Process] = []
    try:
        for name, port, idle in (("pieces", PIECES_PORT, 0.0), ("brief", BRIEF_PORT, IDLE)):
            started.append(
                netns.spawn(
                    lab.host("h2"),
                    [sys.executable, str(script), ip, str(port), str(idle)],
                    lab.log_path("h2", name),
                    name=name,
                )
            )
            lab.consul_api(
                "h2",
                "/v1/agent/service/register",
                method="PUT",
                body={
                    "ID": f"{name}-h2",
                    "Name": name,
                    "Address": ip,
                    "Port": port,
                    "Check": {"TCP": f"{ip}:{port}", "Interval": "1s"},
                },
            )
        for port in (PIECES_PORT, BRIEF_PORT):
            _wait_meshed(lab, port)
        yield lab
    finally:
        for name in ("pieces", "brief"):
            with contextlib.suppress(netns.LabError):
                lab.consul_api("h2", f"/v1/agent/service/deregister/{name}-h2", method="PUT")
        netns.stop_all(started)


def _wait_meshed(lab: Lab, port: int, timeout: float = 20.0) -> None:
    """Bounded: until h1's call reaches the app through h2's agent (the app sees h2's address),
    not as egress straight from h1, which is what happens before h1's agent knows the service."""
    url = f"http://{lab.host_ip('h2')}:{port}/"
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        r = lab.curl("h1", url)
        seen = r.json() if r.status == 200 else (r.status, r.error, r.text[:200])
        if isinstance(seen, dict) and seen["client"] == lab.host_ip("h2") and seen["caller"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} not reached through the mesh from h1 in {timeout:g}s: {seen}")


def _run(lab: Lab, code: str, *, user: str | None = None, timeout: float = 60.0) -> Any:
    p = lab.exec("h1", [sys.executable, "-c", textwrap.dedent(code)], timeout=timeout, user=user)
    return json.loads(p.stdout)


def _timed_calls(lab: Lab, *, direct: bool) -> dict[str, Any]:
    code = TIMED_CALLS.format(ip=lab.host_ip("h2"), port=PIECES_PORT, n=CALLS)
    out: dict[str, Any] = _run(lab, code, user=NODEMESH_USER if direct else None)
    return out


def test_app_writing_head_and_body_apart_is_not_stalled_by_delayed_acks(apps: Lab) -> None:
    """A regression check for a stall, not a speed target.

    ``pieces`` writes head and body separately with Nagle on: its body waits for the ACK of its
    head.  An agent that lets Linux delay that ACK on its kept-alive connection to the app adds
    ~40 ms to every request (44-47 ms median through the mesh at f6c6994, 1 ms now); the agent
    re-arms TCP_QUICKACK while it waits mid-response.  Anything near 40 ms is the stall; anything
    well under it is not, however slow the machine.

    The direct calls are the control, not a bound: the same stall hits http.client talking to
    the app itself (~44 ms median here: the client delays its ACK of the head too), while
    through the mesh the client reads from its own agent, which sets TCP_NODELAY."""
    lab = apps
    mesh = _timed_calls(lab, direct=False)
    direct = _timed_calls(lab, direct=True)
    # The paths are what they claim: through h2's agent, and not.
    assert mesh["clients"] == [lab.host_ip("h2")], mesh["clients"]
    assert direct["clients"] == [lab.host_ip("h1")], direct["clients"]
    assert mesh["connections"] == direct["connections"] == 1  # kept alive throughout
    m, d = statistics.median(mesh["ms"]), statistics.median(direct["ms"])
    assert m < STALL * 1000 / 2, (
        f"median {m:.1f} ms a request through the mesh against {d:.2f} ms direct over "
        f"{CALLS} keep-alive requests: the app's body waits for a delayed ACK "
        f"(~{STALL * 1000:.0f} ms) of its head on the agent's connection to it; "
        f"mesh ms={[round(x, 1) for x in mesh['ms']]}"
    )


def _paused_calls(lab: Lab, method: str, rounds: int) -> list[dict[str, Any]]:
    code = PAUSED_CALLS.format(
        ip=lab.host_ip("h2"), port=BRIEF_PORT, pause=PAUSE, rounds=rounds, method=method
    )
    out: list[dict[str, Any]] = _run(lab, code, timeout=30 + rounds * 2 * PAUSE)
    return out


def _failures(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls if c["status"] != 200]


def test_app_closing_idle_keep_alives_costs_no_request(apps: Lab) -> None:
    """``brief`` has closed the agent's pooled connection by the time each GET comes (it was
    idle PAUSE > IDLE): the agent must notice, or retry the body-less GET once on a fresh
    connection, never answer 502.  On one kept-alive client connection and on new ones."""
    calls = _paused_calls(apps, "GET", rounds=5)
    assert len(calls) == 10
    assert not _failures(calls), (
        f"{len(_failures(calls))} of {len(calls)} GETs after {PAUSE:g}s idle (the app closes "
        f"after {IDLE:g}s) failed: {_failures(calls)}"
    )
    assert {c["answer"]["client"] for c in calls} == {apps.host_ip("h2")}


def test_post_after_the_app_closed_idle_keep_alives_arrives_once(apps: Lab) -> None:
    """A POST must not be lost, nor replayed: the app closed the pooled connection cleanly while
    it was idle, so the agent can tell before it sends (a retry would be allowed only if the
    request cannot have reached the app).  The app counts each request id it sees."""
    calls = _paused_calls(apps, "POST", rounds=3)
    assert len(calls) == 6
    assert not _failures(calls), (
        f"{len(_failures(calls))} of {len(calls)} POSTs after {PAUSE:g}s idle (the app closes "
        f"after {IDLE:g}s) failed: {_failures(calls)}"
    )
    for c in calls:
        assert c["answer"]["bytes"] == 4096, c  # the whole body reached the app ...
        assert c["answer"]["times"] == 1, c  # ... exactly once
