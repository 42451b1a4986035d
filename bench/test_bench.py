"""The benchmark's own checks: its parsers on fixed input, its configs and wrk report against the
real programs (skipped where a program is missing).  Run: .venv/bin/pytest bench/test_bench.py
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import measure
import peers
import pyspy
import pytest

HERE = Path(__file__).resolve().parent

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
    plain = peers.service_definition("198.18.0.5", sidecar=False)
    assert "Connect" not in plain
    side = peers.service_definition("198.18.0.5", sidecar=True)
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
    conf.write_text(peers.nginx_conf("127.0.0.1", 18080, tmp_path))
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
