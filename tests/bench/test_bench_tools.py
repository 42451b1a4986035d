"""The benchmark's own checks: its parsers on fixed input, its configs and wrk report against the
real programs (skipped where a program is missing).  Run: .venv/bin/pytest tests/bench
"""

from __future__ import annotations

import contextlib
import http.server
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ingest
import measure
import peers
import pyspy
import pytest
import recording

from nodemesh.controller import metrics as fleet_metrics
from nodemesh.identity import spiffe
from nodemesh.telemetry.metrics import Recorder

HERE = Path(__file__).resolve().parents[2] / "bench"

WRK_STDOUT = """\
Running 10s test @ http://198.18.0.5:8080/
  1 threads and 16 connections
  1161046 requests in 10.00s, 188.22MB read
NODEMESH_BENCH {"requests":20000,"duration_us":10000000,"bytes":1,"errors":{"connect":0,\
"read":2,"write":0,"status":3,"timeout":1},"latency_us":{"min":50,"mean":400.5,"stdev":10.0,\
"max":9000,"p50":350,"p75":450,"p90":600,"p99":1500,"p99.9":4000}}
Requests/sec: 2000.00
"""


def test_parse_wrk_reads_the_report_line() -> None:
    r = measure.parse_wrk(WRK_STDOUT)
    assert r.requests == 20000
    assert r.rps == pytest.approx(2000.0)
    assert r.latency_ms["p50"] == pytest.approx(0.35)
    assert r.latency_ms["p99"] == pytest.approx(1.5)
    assert r.error_count == 6
    assert "NODEMESH_BENCH" not in r.text
    assert "Requests/sec" in r.text


@pytest.mark.parametrize("stdout", ["Requests/sec: 1\n", WRK_STDOUT + WRK_STDOUT])
def test_parse_wrk_wants_exactly_one_report_line(stdout: str) -> None:
    with pytest.raises(measure.BenchError, match="report lines instead of 1"):
        measure.parse_wrk(stdout)


RAW = [
    "<module> (nodemesh:8);run (trio/_core/_run.py:2532);"
    "EpollIOManager.get_events (trio/_core/_io_epoll.py:220) 40\n",
    "<module> (nodemesh:8);forward (nodemesh/proxy/http1.py:195);SSLObject.read (ssl.py:1100) 30\n",
    "<module> (nodemesh:8);forward (nodemesh/proxy/http1.py:195);"
    "next_event (nodemesh/proxy/http1.py:99);Connection._process_event (h11/_connection.py:1) 20\n",
    "forward (nodemesh/proxy/http1.py:196);forward (nodemesh/proxy/http1.py:197) 10\n",
    "garbage without a count\n",
]


def test_pyspy_summary_charges_leaves_and_counts_recursion_once() -> None:
    prof = pyspy.summarize(RAW)
    assert prof.samples == 100
    assert prof.self_by_layer == {
        "epoll wait / run queue": 40,
        "TLS": 30,
        "h11": 20,
        "nodemesh": 10,
    }
    assert prof.self_by_package["nodemesh.proxy"] == 10
    assert prof.self_by_function["SSLObject.read (ssl.py)"] == 30
    # forward is on 60 samples' stacks; line numbers merge and recursion counts once.
    assert prof.inclusive_nodemesh["forward (nodemesh/proxy/http1.py)"] == 60
    assert pyspy.report(prof)["self_by_layer_pct"][0] == ("epoll wait / run queue", 40.0)


def test_cpu_seconds_grow_with_work() -> None:
    before = measure.cpu_seconds(os.getpid())
    machine_before = measure.machine_busy_seconds()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert measure.cpu_seconds(os.getpid()) - before >= 0.2
    assert measure.machine_busy_seconds() - machine_before >= 0.2
    assert measure.rss_bytes(os.getpid()) > 1 << 20


def test_sidecar_definition_delivers_to_the_service_address() -> None:
    nginx = peers.UPSTREAMS["nginx"]
    plain = peers.service_definition("198.18.0.5", nginx, sidecar=False)
    assert "Connect" not in plain and "Meta" not in plain
    assert plain["Check"]["HTTP"] == f"http://198.18.0.5:{peers.PORT}/"
    side = peers.service_definition("198.18.0.5", nginx, sidecar=True)
    proxy = side["Connect"]["SidecarService"]["Proxy"]
    assert proxy == {"LocalServiceAddress": "198.18.0.5", "LocalServicePort": peers.PORT}
    assert len(peers.BODY) == 100


def _need(name: str) -> str:
    path = shutil.which(name, path=peers.SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} is not installed (bench/mesh_http.py installs it)")
    return path


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    nginx = _need("nginx")
    if os.geteuid() != 0:
        pytest.skip("nginx -t with a `user` directive needs root")
    (tmp_path / "nginx-tmp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(peers.nginx_conf("127.0.0.1", 18080, tmp_path, h2c_port=18081))
    argv = [nginx, "-t", "-e", str(tmp_path / "e.log"), "-p", str(tmp_path), "-c", str(conf)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr


def test_haproxy_accepts_its_config(tmp_path: Path) -> None:
    haproxy = _need("haproxy")
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(peers.haproxy_conf("127.0.0.1:18088", "127.0.0.1:18080"))
    p = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stdout + p.stderr


class _Quick(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/" else 500)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quick)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


@pytest.mark.parametrize(("path", "bad"), [("/", False), ("/fail", True)])
def test_wrk_report_script_against_a_real_server(
    loopback_server: str, path: str, bad: bool
) -> None:
    wrk = _need("wrk")
    argv = measure.wrk_argv(
        loopback_server + path,
        threads=1,
        connections=2,
        duration=1,
        script=HERE / "wrk_report.lua",
    )
    p = subprocess.run([wrk, *argv[1:]], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    r = measure.parse_wrk(p.stdout)
    assert r.requests > 10
    assert 0 < r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
    # wrk counts non-2xx/3xx answers as status errors: a broken path cannot pass as fast.
    assert (r.errors["status"] > 0) == bad


# --- recording.py and ingest.py: their pure parts ------------------------------------------------


def test_label_mix_is_deterministic_and_spans_the_mix() -> None:
    calls = recording.label_mix(5000)
    assert calls == recording.label_mix(5000)
    assert {c[3] for c in calls} == {s for s, _ in recording.STATUSES}
    seconds = [c[4] for c in calls]
    assert min(seconds) < 100e-6 and max(seconds) > 1.0  # µs to seconds
    for d, service, peer, _, _, route, endpoint in calls:
        assert route in recording.SERVICES[service] and peer in recording.PEERS
        assert (endpoint in recording.HOSTS) if d == "outbound" else endpoint == ""
    rec = Recorder()
    for c in calls:
        rec.request(*c)
    # A bounded label mix: a few hundred series, as an agent has, far under the overflow cap.
    assert 100 < len(list(rec.series())) < 1000
    assert rec.overflowed == 0


def test_spread_gives_median_extremes_and_quartiles() -> None:
    s = recording.spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.low, s.high, s.q1, s.q3, s.n) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert recording.spread([1.0, 2.0]).median == 1.5
    with pytest.raises(ValueError):
        recording.spread([])


def test_an_interval_fills_each_series_evenly_with_the_mix_latencies() -> None:
    mix = recording.label_mix(50)
    calls = recording.interval_calls(3, 4, mix)
    assert calls == recording.interval_calls(3, 4, mix) and len(calls) == 12
    rec = Recorder()
    for c in calls:
        rec.request(*c)
    assert sorted(s.count for s in rec.series()) == [4, 4, 4]
    assert {c[4] for c in calls[::3]} == {mix[k * 3][4] for k in range(4)}  # series 0, in order
    assert {c[3] for c in calls} == {200}


def test_buckets_and_per_request_shares() -> None:
    d, svc, peer, status, _, route, host = recording.label_mix(1)[0]
    seconds = (1e-6, 1.9e-6, 0.01, 0.010001, 0.011, 1e3)
    at = [(d, svc, peer, status, s, route, host) for s in seconds]
    # 1 and 1 µs; 10,000 and 10,001 µs share an 8 µs wide bucket; 11,000; 60 s (clamped).
    assert recording.distinct_buckets(at) == 4
    assert recording.per_request(5_000, 10) == 500
    with pytest.raises(ValueError, match="0 requests"):
        recording.per_request(5_000, 0)


def test_markdown_shows_the_interval_rows_and_reads_older_results() -> None:
    s = {"median": 1.0, "low": 1.0, "high": 1.0, "q1": 1.0, "q3": 1.0, "n": 1}
    mem = {"open_traced_bytes": 2048, "cut_traced_bytes": 1024}
    result = {
        "per_call": {"ns_per_call": {"empty": s}, "recorder_minus_empty_ns": s},
        "new_series": {"ns_per_first_request": s},
        "cut_and_report": [],
        "interval": [{"series": 100, "requests_per_series": 10, "buckets_per_series": 9,
                      "cut_ns_per_request": s | {"median": 4321.0},
                      "recorder_minus_empty_plus_cut_ns": 4900.0, "memory": mem}],
    }  # fmt: skip
    text = recording.markdown(result)
    assert "| 100 × 10 | 9 | 4,321 (1 – 1) | 4,900 | 2.0, 1.0 |" in text
    del result["interval"]
    assert "series × requests" not in recording.markdown(result)


def test_agent_series_are_distinct_and_half_inbound() -> None:
    for i in (0, 1, 57, 299):
        labels = ingest.agent_series(i, 300, 50)
        assert labels == ingest.agent_series(i, 300, 50)
        assert len({tuple(sorted(lab.items())) for lab in labels}) == 50
        inbound = [lab for lab in labels if lab["direction"] == "inbound"]
        assert len(inbound) == 25
        own = {lab["service"] for lab in inbound}
        assert len(own) == 1 and own == {ingest.own_service(i, 300)}
        callers = {spiffe.parse(lab["peer"]) for lab in inbound}
        assert None not in callers and own.isdisjoint(c.name for c in callers if c)
        outbound = [lab for lab in labels if lab["direction"] == "outbound"]
        assert {lab["peer"] for lab in outbound} == {ingest.service_uri(i % ingest.n_services(300))}
        assert all(lab["endpoint"] for lab in labels if lab["direction"] == "outbound")
    with pytest.raises(ValueError, match="series = 500"):
        ingest.agent_series(0, 300, 500)


def test_simulated_reports_pass_the_controllers_parser_and_add_up() -> None:
    pool = ingest.histogram_pool(8)
    fleet = fleet_metrics.FleetMetrics()
    sent = 0
    for i in range(3):
        labels = ingest.agent_series(i, 100, 50)
        doc = ingest.make_report(i, 0, 1000.0, 10.0, labels, pool, random.Random(i))
        report = fleet_metrics.parse_report(doc)  # raises on anything the real API refuses
        assert report.host == ingest.agent_name(i) and len(report.series) == 50
        own = frozenset({ingest.own_service(i, 100)})  # what register_fleet puts in Consul
        assert fleet_metrics.attribute(report, own)[0] is report  # every series attributable
        assert {s.labels[3] for s in report.series} >= {"2xx"}
        fleet.ingest(report, now=1000.0)
        sent += sum(s["count"] for s in doc["series"] if s["labels"]["direction"] == "inbound")
    rows = fleet.query(now=1015.0, window_s=60, by="edge")["rows"]
    assert sum(r["requests"] for r in rows) == sent


def test_offsets_spread_evenly_over_one_interval() -> None:
    offs = ingest.offsets(1000, 10.0)
    assert offs == ingest.offsets(1000, 10.0) and len(offs) == 1000
    per_second = [0] * 10
    for o in offs:
        per_second[int(o)] += 1
    assert per_second == [100] * 10


def test_quantiles_are_nearest_rank_in_ms() -> None:
    q = ingest.quantiles_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert (q["p50"], q["p90"], q["p99"], q["max"], q["n"]) == pytest.approx((50, 90, 99, 100, 100))
    assert ingest.quantiles_ms([]) == {}


def test_an_attempt_overlaps_a_query_window_only_if_they_share_time() -> None:
    a = ingest.Attempt(0, 0, start=10.0, seconds=1.0, outcome="ok")
    assert ingest.overlaps(a, [(10.5, 20.0)])
    assert not ingest.overlaps(a, [(11.0, 20.0), (0.0, 10.0)])


def test_profile_shares_count_a_part_once_per_sample_and_skip_idle() -> None:
    lines = [
        "run (trio/_core/_run.py:1);EpollIOManager.get_events (trio/_core/_io_epoll.py:2) 50\n",
        "_serve_connection (nodemesh/controller/api.py:9);SSLObject.do_handshake (ssl.py:3) 30\n",
        "_serve_connection (nodemesh/controller/api.py:9);parse_report (nodemesh/controller/"
        "metrics.py:5);parse_report (nodemesh/controller/metrics.py:6) 10\n",
        "_serve_metrics_upkeep (nodemesh/controller/daemon.py:1);"
        "FleetMetrics.compact (nodemesh/controller/metrics.py:7) 10\n",
    ]
    busy, shares = ingest.profile_shares(lines)
    assert busy == 50
    assert shares["API connections (`_serve_connection`)"] == 80.0
    assert shares["TLS handshake (`do_handshake`)"] == 60.0
    assert shares["`parse_report`"] == 20.0  # recursion counts once
    assert shares["compaction (`FleetMetrics.compact`)"] == 20.0


def test_timeline_markdown_averages_rates_per_ten_seconds() -> None:
    cols = list(ingest.TIMELINE_COLUMNS)
    rows = [[2.0, 0.5, 100.0, 0, 0, 1, 1], [8.0, 0.7, 80.0, 0, 10.0, 40, 45]]
    rows += [[12.0, 0.9, 0.0, 0, 100.0, 1000, 2000]]
    result = {"agents": 1000, "measured_from_s": 10.0, "phases": [("query by=service", 11, 12)],
              "timeline": {"columns": cols, "rows": rows}}  # fmt: skip
    text = ingest.timeline_markdown(result)
    assert "| 0–10 | 0.60 | 90 | 0 | 5 | 40 (45) |" in text
    assert "| 10–20 | 0.90 | 0 | 0 | 100 | 1000 (2000) |" in text
    assert "query by=service 11–12 s" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the floor relay exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened on {port}")


FLOOR = Path(__file__).resolve().parents[2] / "bench" / "floor.py"


def _serve_each(server: Any, handle: Callable[[Any], None]) -> None:
    """Accept on ``server`` until it is closed, each connection (the readiness probes' too)
    handled in a thread of its own."""

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


@contextlib.contextmanager
def _floor_pair(certs: Path, app_port: int, *hop: str) -> Iterator[tuple[int, int]]:
    """floor.py's relay pair in front of ``app_port``, certificates in ``certs``: yields
    ("in"'s mTLS port, "out"'s plain port) once both listen; both stopped after."""
    py = sys.executable
    subprocess.run([py, str(FLOOR), "certs", str(certs)], check=True, timeout=60)
    tls_port, plain_port = _free_port(), _free_port()
    relay = [py, str(FLOOR), "relay", *hop, "--certs", str(certs)]
    procs = [
        subprocess.Popen([*relay, "--role", role, "--route", route])
        for role, route in (
            ("in", f"127.0.0.1:{tls_port}=127.0.0.1:{app_port}"),
            ("out", f"127.0.0.1:{plain_port}=127.0.0.1:{tls_port}"),
        )
    ]
    try:
        for port, proc in zip((tls_port, plain_port), procs, strict=True):
            _wait_listening(port, proc)
        yield tls_port, plain_port
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


def test_floor_relays_carry_bytes_both_ways_over_mtls(tmp_path: Path) -> None:
    """floor.py's pair end to end: an echo server behind "in", a client in front of "out"; and
    "in" refuses a TLS client without a certificate from the floor's CA (it is mTLS)."""
    import socket
    import ssl

    echo = socket.create_server(("127.0.0.1", 0))

    def echo_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    _serve_each(echo, echo_one)
    try:
        with _floor_pair(tmp_path, echo.getsockname()[1]) as (tls_port, plain_port):
            payload = os.urandom(3 << 20)
            with socket.create_connection(("127.0.0.1", plain_port), timeout=10.0) as c:
                threading.Thread(target=c.sendall, args=(payload,), daemon=True).start()
                got = bytearray()
                while len(got) < len(payload):
                    chunk = c.recv(1 << 20)
                    assert chunk, f"closed after {len(got)} of {len(payload)} bytes"
                    got += chunk
            assert got == payload
            ctx = ssl.create_default_context(cafile=str(tmp_path / "roots.pem"))
            ctx.check_hostname = False
            with (
                socket.create_connection(("127.0.0.1", tls_port), timeout=10.0) as raw,
                pytest.raises((ssl.SSLError, ConnectionError)),
                ctx.wrap_socket(raw) as tls,
            ):
                tls.sendall(b"x")
                assert tls.recv(1) == b""  # TLS 1.3: the refusal comes after the handshake
                raise ConnectionError("closed")
    finally:
        echo.close()


def test_floor_h1_relays_parse_and_reframe_each_request(tmp_path: Path) -> None:
    """floor.py --hop h1 end to end: two GETs on one kept-alive client connection reach an app
    re-framed by the agents' codec (names lower-cased) and both answers come back whole; a
    request with a body ends the connection (the relay serves GETs only)."""
    import socket

    app = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"

    def serve_one(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while data := conn.recv(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    seen.append(head)
                    conn.sendall(answer)

    _serve_each(app, serve_one)
    try:
        with _floor_pair(tmp_path, app.getsockname()[1], "--hop", "h1") as (_, plain_port):
            seen.clear()  # the readiness probes' connections carried no request
            with socket.create_connection(("127.0.0.1", plain_port), timeout=10.0) as c:
                for path in (b"/one", b"/two"):
                    c.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: app\r\nX-Thing: 1\r\n\r\n")
                    got = b""
                    while not got.endswith(b"hello"):
                        chunk = c.recv(65536)
                        assert chunk, f"closed after {got!r}"
                        got += chunk
                    assert got.startswith(b"HTTP/1.1 200 OK\r\n")
                c.sendall(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi")
                assert c.recv(65536) == b""
        assert [h.split(b"\r\n")[0] for h in seen] == [b"GET /one HTTP/1.1", b"GET /two HTTP/1.1"]
        assert b"x-thing: 1" in seen[0]
    finally:
        app.close()
