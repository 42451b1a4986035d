"""The spine, end to end: unmodified apps on namespace hosts talk through real agents.

    curl on h1 ──> iptables ──> agent h1 ══ mTLS ══> agent h2/h3 ──> web on h2/h3

Every test uses real peers: curl, the stdlib sample app, a real Consul cluster, the real
controller, agents as the ``nodemesh`` user with real iptables, and tcpdump on the wire.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.lab.mesh import AppSpec, Lab, LabSpec

pytestmark = pytest.mark.system

TRUST = "spiffe://nodemesh.local/dc/dc1"
BIG_DOWNLOAD = 256 * 1024 * 1024  # bytes; far more than 5 s at 256 KiB/s


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(
        servers=1,
        hosts=3,
        apps=(AppSpec("h2", "web", 8080), AppSpec("h3", "web", 8080)),
    )


def _web(lab: Lab, host: str = "h2", path: str = "/") -> str:
    return lab.app_url(host, "web", path)


def _py(lab: Lab, host: str, code: str, timeout: float = 20.0) -> str:
    """Run a Python snippet inside ``host`` (as root: intercepted like any app)."""
    p = lab.exec(host, [sys.executable, "-c", textwrap.dedent(code)], timeout=timeout)
    return p.stdout.decode()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Capture:
    """tcpdump in one lab host, writing a pcap we read as bytes afterwards."""

    def __init__(self, lab: Lab, host: str, path: Path, bpf: str) -> None:
        self.path = path
        argv = [
            "ip",
            "netns",
            "exec",
            lab.host(host).netns,
            "tcpdump",
            "-i",
            "eth0",
            "-U",
            "--immediate-mode",
        ]
        argv += ["-s", "0", "-w", str(path), bpf]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        line = b""
        while b"listening on" not in line and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("tcpdump exited before listening")

    def stop(self) -> bytes:
        time.sleep(0.3)  # let the last packets land in the file (-U flushes per packet)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.path.read_bytes()


@pytest.fixture
def capture(lab: Lab, tmp_path: Path) -> Iterator[list[Capture]]:
    started: list[Capture] = []
    try:
        yield started
    finally:
        for c in started:
            if c.proc.poll() is None or (c.proc.stderr and not c.proc.stderr.closed):
                c.stop()


# --- the path ---------------------------------------------------------------------------------


def test_request_travels_through_both_agents(lab: Lab) -> None:
    r = lab.wait_http("h1", _web(lab))
    seen = r.json()
    # The app on h2/h3 was reached by its own host's agent, not by h1 directly ...
    assert seen["client"].split(":")[0] in (lab.host_ip("h2"), lab.host_ip("h3"))
    # ... and it was told who called, verified by mTLS: h1 runs no service, so its node.
    assert seen["headers"]["x-nodemesh-client-id"] == f"{TRUST}/node/h1"
    metrics = lab.curl("ctl", lab.admin_url("h1", "/metrics")).text
    assert _metric(metrics, "nodemesh_requests_total", direction="outbound", service="web") >= 1


def test_metrics_are_valid_for_the_prometheus_parser(lab: Lab) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    lab.wait_http("h1", _web(lab))
    text = lab.curl("ctl", lab.admin_url("h1", "/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["nodemesh_requests"]
    assert requests.type == "counter"
    assert any(s.labels.get("service") == "web" and s.value >= 1 for s in requests.samples)
    latency = families["nodemesh_request_duration_seconds"]
    assert latency.type == "summary"
    quantiles = {s.labels.get("quantile") for s in latency.samples if "quantile" in s.labels}
    assert {"0.5", "0.99"} <= quantiles
    assert families["nodemesh_ready"].samples[0].value == 1


def test_requests_are_balanced_over_every_healthy_instance(lab: Lab) -> None:
    # The app always dials h2's address; under concurrent load the mesh spreads the calls over
    # h2 and h3 (peak-EWMA cost grows with requests in flight).  Sequential calls go to
    # whichever instance is currently faster, which is the point of latency-aware balancing.
    lab.wait_http("h1", _web(lab))
    out = _py(
        lab,
        "h1",
        f"""
        import http.client, json, threading, collections
        hosts = collections.Counter()
        lock = threading.Lock()
        def worker():
            for _ in range(15):
                c = http.client.HTTPConnection("{lab.host_ip("h2")}", 8080, timeout=10)
                c.request("GET", "/slow?ms=20")
                r = c.getresponse()
                body = json.loads(r.read())
                with lock:
                    hosts[(r.status, body["host"])] += 1
                c.close()
        ts = [threading.Thread(target=worker) for _ in range(8)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(json.dumps({{f"{{s}} {{h}}": n for (s, h), n in hosts.items()}}))
        """,
        timeout=60,
    )
    hosts = json.loads(out)
    assert set(hosts) == {"200 h2", "200 h3"}, hosts
    assert min(hosts.values()) >= 10, hosts


def test_bytes_between_hosts_are_tls_not_the_request(
    lab: Lab, capture: list[Capture], tmp_path: Path
) -> None:
    marker = "plaintext-marker-" + os.urandom(6).hex()
    lab.wait_http("h1", _web(lab))
    cap = Capture(lab, "h1", tmp_path / "h1.pcap", "tcp and not port 8301 and not port 8300")
    capture.append(cap)
    for _ in range(5):
        r = lab.curl("h1", _web(lab, "h2", f"/?q={marker}"), headers={"x-marker": marker})
        assert r.status == 200 and marker in r.text  # the app did see it, in the clear, locally
    pcap = cap.stop()
    assert marker.encode() not in pcap
    # The calls left h1 to port 4143 as TLS records (content type 23 = application data) ...
    assert re.search(rb"\x17\x03\x03", pcap)
    # ... and nothing went from h1 to an app port directly.
    h1 = lab.host_ip("h1")
    out = lab.exec("h1", ["tcpdump", "-nn", "-r", str(cap.path), f"src {h1} and dst port 8080"])
    assert out.stdout.strip() == b""
    mesh = lab.exec("h1", ["tcpdump", "-nn", "-r", str(cap.path), f"src {h1} and dst port 4143"])
    assert mesh.stdout.count(b"\n") > 0


def _mesh_conns(lab: Lab, host: str) -> set[str]:
    ss = lab.exec(host, ["ss", "-Htn", "state", "established", "( dport = :4143 )"]).stdout
    return {" ".join(line.split()[-2:]) for line in ss.decode().splitlines() if line.strip()}


def test_pooled_connections_between_agents(lab: Lab) -> None:
    lab.wait_http("h1", _web(lab))
    before = _mesh_conns(lab, "h1")
    assert before  # the warm-up left pooled agent-to-agent connections open
    # 30 separate app connections (one curl each) ...
    for _ in range(30):
        assert lab.curl("h1", _web(lab, "h2")).status == 200
    # ... reuse the pooled agent-to-agent connections instead of opening 30 new ones.
    after = _mesh_conns(lab, "h1")
    assert len(after - before) <= 1, (before, after)


# --- who may talk to :4143 ---------------------------------------------------------------------


def _inbound(lab: Lab, host: str = "h2") -> str:
    return f"https://{lab.host_ip(host)}:4143/"


def test_client_without_mesh_certificate_is_refused_and_listener_survives(
    lab: Lab, tmp_path: Path
) -> None:
    ca = lab.dir / "h1" / "ca.pem"
    # No client certificate at all (TLS 1.3 sends the refusal after the handshake).
    r = lab.curl("ctl", _inbound(lab), extra=["-k", "--cacert", str(ca)])
    assert r.status == 0, r
    # Not TLS at all.
    r = lab.curl("ctl", f"http://{lab.host_ip('h2')}:4143/")
    assert r.status == 0, r
    # A certificate from another CA.
    from nodemesh.identity import keys, spiffe
    from nodemesh.identity.ca import CertificateAuthority

    rogue = CertificateAuthority.create("nodemesh.local")
    key = keys.generate_key()
    ident = spiffe.node_id("nodemesh.local", "dc1", "h1")
    cert = rogue.sign_csr(keys.make_csr(key, ident), ident, 3600)
    (tmp_path / "rogue.pem").write_bytes(cert)
    (tmp_path / "rogue.key").write_bytes(key)
    r = lab.curl(
        "ctl",
        _inbound(lab),
        extra=["-k", "--cert", str(tmp_path / "rogue.pem"), "--key", str(tmp_path / "rogue.key")],
    )
    assert r.status == 0, r
    # The listener is still serving the mesh.
    assert lab.curl("h1", _web(lab, "h2")).status == 200


def test_unknown_server_name_is_refused_and_listener_survives(lab: Lab, tmp_path: Path) -> None:
    # A genuine mesh certificate (h1's node identity) asking for a service h2 does not serve.
    pem = (lab.dir / "h1" / "agent-state" / "identity" / "node-h1.pem").read_bytes()
    key_end = pem.index(b"-----END PRIVATE KEY-----") + len(b"-----END PRIVATE KEY-----\n")
    (tmp_path / "node.key").write_bytes(pem[:key_end])
    (tmp_path / "node.pem").write_bytes(pem[key_end:])
    ip = lab.host_ip("h2")
    # HTTP/1.1 over TLS, as an agent's pooled connection for an app's HTTP/1.1 calls speaks it.
    tls = [
        "-k",
        "--http1.1",
        "--cert",
        str(tmp_path / "node.pem"),
        "--key",
        str(tmp_path / "node.key"),
    ]
    name = "nosuch.svc.dc1.nodemesh.local"
    r = lab.curl("ctl", f"https://{name}:4143/", extra=[*tls, "--resolve", f"{name}:4143:{ip}"])
    assert r.status == 0, r
    # With the right name the same client gets through TLS to HTTP: the target check answers.
    good = "web.svc.dc1.nodemesh.local"
    r = lab.curl("ctl", f"https://{good}:4143/", extra=[*tls, "--resolve", f"{good}:4143:{ip}"])
    assert r.status == 200, r  # no x-nodemesh-dst: the one local web instance
    assert r.json()["headers"]["x-nodemesh-client-id"] == f"{TRUST}/node/h1"
    r = lab.curl(
        "ctl",
        f"https://{good}:4143/",
        headers={"x-nodemesh-dst": f"{lab.host_ip('h3')}:8080"},
        extra=[*tls, "--resolve", f"{good}:4143:{ip}"],
    )
    assert r.status == 403 and "not an instance of web on this node" in r.text
    assert lab.curl("h1", _web(lab, "h2")).status == 200


# --- HTTP/1.1 at L7 ----------------------------------------------------------------------------


def test_large_bodies_stream_both_ways_intact(lab: Lab, tmp_path: Path) -> None:
    body = os.urandom(24 * 1024 * 1024)
    digest = hashlib.sha256(body).hexdigest()
    src = tmp_path / "body.bin"
    src.write_bytes(body)
    out = tmp_path / "out.bin"
    for extra in ([], ["-H", "Transfer-Encoding: chunked"], ["-H", "Expect: 100-continue"]):
        p = lab.exec(
            "h1",
            [
                "curl",
                "-sS",
                "-o",
                str(out),
                "-w",
                "%{http_code}",
                "--data-binary",
                f"@{src}",
                *extra,
                "-H",
                "Content-Type: application/octet-stream",
                _web(lab, "h2", "/echo"),
            ],
            timeout=60,
        )
        assert p.stdout == b"200", (extra, p.stderr)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest, extra
    r = lab.curl("h1", _web(lab, "h2", "/bytes?n=33554432"), timeout=30)
    assert r.status == 200 and len(r.body) == 33554432


def test_expect_100_continue_is_relayed(lab: Lab) -> None:
    p = lab.exec(
        "h1",
        [
            "curl",
            "-sv",
            "-o",
            "/dev/null",
            "--data-binary",
            "hello",
            "-H",
            "Expect: 100-continue",
            _web(lab, "h2", "/echo"),
        ],
    )
    assert b"HTTP/1.1 100 Continue" in p.stderr
    assert b"HTTP/1.1 200" in p.stderr


def test_hop_by_hop_and_mesh_headers_do_not_cross(lab: Lab) -> None:
    r = lab.curl(
        "h1",
        _web(lab, "h2"),
        headers={
            "Connection": "keep-alive, x-drop-me",
            "x-drop-me": "1",
            "Keep-Alive": "timeout=5",
            "x-nodemesh-client-id": "spiffe://evil/dc/dc1/svc/admin",
            "x-nodemesh-dst": "198.18.0.99:22",
            "x-kept": "yes",
        },
    )
    assert r.status == 200, r.text
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert "x-drop-me" not in seen and "keep-alive" not in seen
    assert seen["x-nodemesh-client-id"] == f"{TRUST}/node/h1"
    assert seen["x-kept"] == "yes"


def test_keep_alive_on_the_app_side(lab: Lab) -> None:
    # curl reuses one connection for several URLs when the proxy keeps it alive.
    url = _web(lab, "h2")
    p = lab.exec(
        "h1",
        ["curl", "-sv", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", url, url, url],
    )
    assert (
        p.stderr.count(b"Re-using existing connection") + p.stderr.count(b"Reusing existing") >= 2
    ), p.stderr


def _rss_mib(lab: Lab, host: str) -> float:
    status = lab.exec(host, ["cat", f"/proc/{lab.agents[host].pid}/status"]).stdout.decode()
    (line,) = [x for x in status.splitlines() if x.startswith("VmRSS:")]
    return int(line.split()[1]) / 1024


def test_a_slow_reader_never_makes_the_agents_buffer(lab: Lab) -> None:
    # A client reading at 256 KiB/s pulls a large body through both agents: flow control
    # (HTTP/2 windows between agents, TCP towards the apps) must hold the sender back instead
    # of letting either agent buffer the body.
    lab.wait_http("h1", _web(lab))
    before = {h: _rss_mib(lab, h) for h in ("h1", "h2", "h3")}
    url = _web(lab, "h2", f"/bytes?n={BIG_DOWNLOAD}")
    slow = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.host("h1").netns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--limit-rate",
            "256k",
            "--max-time",
            "8",
            url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)
        during = {h: _rss_mib(lab, h) for h in ("h1", "h2", "h3")}
        assert slow.poll() is None, "the download ended early: nothing was slow"
        # Bounded: the windows are 1 MiB per stream; allow generous slack for the runtime.
        for h in during:
            assert during[h] - before[h] < 32, (before, during)
        # ... and other traffic is unaffected meanwhile.
        assert lab.curl("h1", _web(lab, "h3")).status == 200
    finally:
        slow.kill()
        slow.wait(timeout=10)


# --- bad input from the app never harms other connections ------------------------------------


def test_malformed_request_gets_400_and_others_keep_working(lab: Lab) -> None:
    ip = lab.host_ip("h2")
    out = _py(
        lab,
        "h1",
        f"""
        import socket
        s = socket.create_connection(("{ip}", 8080), timeout=10)
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nno colon here\\r\\n\\r\\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        print(data.decode(errors="replace"))
        """,
    )
    assert out.startswith("HTTP/1.1 400"), out
    assert "x-nodemesh-error: bad request" in out.lower()
    assert lab.curl("h1", _web(lab, "h2")).status == 200


def test_client_reset_mid_request_harms_nothing(lab: Lab) -> None:
    ip = lab.host_ip("h2")
    _py(
        lab,
        "h1",
        f"""
        import socket, struct
        for _ in range(20):
            s = socket.create_connection(("{ip}", 8080), timeout=10)
            head = b"POST /echo HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 100000\\r\\n\\r\\n"
            s.sendall(head + b"x" * 5000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST with the body half sent
        """,
    )
    # No lasting harm: the mesh serves again at once and stays serving.  A single 504 right
    # after the resets has been seen twice in fresh-clone CI runs (the inbound agent's 0.3 s
    # connect to the local app timed out; not reproduced locally in 7 runs and a probe of
    # 100 resets, with no listen-queue overflow), so the first answer gets a few seconds,
    # and then five in a row must be 200.
    deadline = time.monotonic() + 5
    first = lab.curl("h1", _web(lab, "h2"))
    while first.status != 200 and time.monotonic() < deadline:
        assert first.status == 504, first  # a connect timeout, not a broken agent
        time.sleep(0.2)
        first = lab.curl("h1", _web(lab, "h2"))
    assert first.status == 200, first
    for _ in range(5):
        assert lab.curl("h1", _web(lab, "h2")).status == 200
    for host in ("h1", "h2", "h3"):
        log = lab.logs(host, "agent")
        assert "connection_handler_failed" not in log, log[-2000:]


# --- opaque TCP, egress ------------------------------------------------------------------------


def test_opaque_tcp_through_the_mesh(lab: Lab) -> None:
    ip = lab.host_ip("h3")
    # A line-echo server on h3, registered as a TCP service (Meta.protocol = tcp).
    echo = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.host("h3").netns,
            "socat",
            f"TCP-LISTEN:7000,bind={ip},fork,reuseaddr",
            "EXEC:cat",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lab.consul_api(
            "h3",
            "/v1/agent/service/register",
            method="PUT",
            body={
                "Name": "echo",
                "Address": ip,
                "Port": 7000,
                "Meta": {"protocol": "tcp"},
                "Check": {"TCP": f"{ip}:7000", "Interval": "1s"},
            },
        )
        # Until h1's agent has seen the registration, the connection is egress; until h3's
        # agent holds echo's certificate, the tunnel is refused.  Both take moments.
        deadline = time.monotonic() + 20
        out = ""
        while time.monotonic() < deadline:
            out = _py(
                lab,
                "h1",
                f"""
                import socket
                try:
                    s = socket.create_connection(("{ip}", 7000), timeout=5)
                    s.sendall(b"ping through the mesh\\n")
                    print(s.recv(100).decode().strip())
                except OSError as e:  # refused until echo's check passes
                    print("error", e)
            """,
            )
            metrics = lab.curl("ctl", lab.admin_url("h1", "/metrics")).text
            meshed = _metric(
                metrics, "nodemesh_tcp_connections_total", direction="outbound", service="echo"
            )
            if meshed and out.strip() == "ping through the mesh":
                break
            time.sleep(0.5)
        assert out.strip() == "ping through the mesh"
        metrics = lab.curl("ctl", lab.admin_url("h3", "/metrics")).text
        assert (
            _metric(metrics, "nodemesh_tcp_connections_total", direction="inbound", service="echo")
            >= 1
        )
    finally:
        lab.consul_api("h3", "/v1/agent/service/deregister/echo", method="PUT")
        echo.terminate()
        echo.wait(timeout=10)


def test_unknown_destination_passes_through_as_egress(lab: Lab) -> None:
    ip = lab.host_ip("h3")
    srv = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.host("h3").netns,
            sys.executable,
            "-m",
            "http.server",
            "9000",
            "--bind",
            ip,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        before = _metric(
            lab.curl("ctl", lab.admin_url("h1", "/metrics")).text,
            "nodemesh_tcp_connections_total",
            direction="egress",
        )
        r = lab.wait_http("h1", f"http://{ip}:9000/")
        assert "Directory listing" in r.text
        after = _metric(
            lab.curl("ctl", lab.admin_url("h1", "/metrics")).text,
            "nodemesh_tcp_connections_total",
            direction="egress",
        )
        assert after > before
    finally:
        srv.terminate()
        srv.wait(timeout=10)


# --- failover; runs last in this module because it kills an instance ---------------------------


def _passing(lab: Lab, service: str) -> set[str]:
    entries = lab.consul_api("h1", f"/v1/health/service/{service}?passing")
    return {e["Node"]["Node"] for e in entries}


def test_y_deregistered_instance_stops_getting_traffic(lab: Lab) -> None:
    lab.stop_app("h3", "web")  # SIGTERM: the app deregisters itself from Consul
    deadline = time.monotonic() + 15
    while "h3" in _passing(lab, "web") and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    try:
        hosts = Counter()
        for _ in range(20):
            r = lab.curl("h1", _web(lab, "h2"))
            assert r.status == 200, r.text
            hosts[r.json()["host"]] += 1
        assert hosts == {"h2": 20}
    finally:
        lab.start_app("h3", "web", 8080)  # back, for the last test
    lab.wait_http("h1", _web(lab, "h3"))


def test_z_killed_instance_stops_getting_traffic(lab: Lab) -> None:
    proc = lab.apps[("h3", "web")]
    proc.signal(signal.SIGKILL)  # no deregistration: Consul's check must notice
    deadline = time.monotonic() + 30
    while "h3" in _passing(lab, "web") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _passing(lab, "web") == {"h2"}
    time.sleep(1.0)  # the agents' blocking queries return within moments of the change
    hosts = Counter()
    for _ in range(30):
        r = lab.curl("h1", _web(lab, "h3"))  # the app still dials the dead instance's address
        assert r.status == 200, r.text
        hosts[r.json()["host"]] += 1
    assert hosts == {"h2": 30}
    stats = json.loads(lab.curl("ctl", lab.admin_url("h1", "/stats.json")).body)
    assert stats["node"] == "h1"
