"""The extended benchmark's parts: its parsers on fixed input, its medians and tables, its configs
and apps against the real programs on loopback (skipped where a program is missing)."""

from __future__ import annotations

import email.message
import io
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import apps
import loadgen
import mesh_http
import peers
import pytest
import summary
from measure import BenchError

BENCH = Path(__file__).resolve().parents[2] / "bench"
T0 = 1_700_000_000_000_000  # µs since the epoch

# start µs, status, µs until the end of the response: the first second is warm-up.
H2LOAD_LOG = "".join(
    [
        f"{T0}\t200\t90000\n",  # warm-up: dropped, however slow
        f"{T0 + 500_000}\t200\t80000\n",
        *(f"{T0 + 1_000_000 + i * 10_000}\t200\t{1000 + i}\n" for i in range(100)),
        f"{T0 + 2_000_000}\t503\t500\n",
        f"{T0 + 2_100_000}\t-1\t3000000\n",  # a stream h2load gave up on
        f"{T0 + 3_200_000}\t200\t1\n",  # in the last 0.5 s: left out like the ones cut off
    ]
)
H2LOAD_STDOUT = """\
finished in 3.00s, 45.33 req/s, 12.74KB/s
requests: 136 total, 138 started, 136 done, 134 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 138 2xx, 0 3xx, 0 4xx, 0 5xx
"""


def test_percentiles_are_nearest_rank_in_ms() -> None:
    q = loadgen.percentiles_ms(list(range(1000, 0, -1)))  # 1..1000 µs, unordered
    assert q == {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999, "max": 1.0}
    assert loadgen.percentiles_ms([7]) == {k: 0.007 for k in ("p50", "p90", "p99", "p99.9", "max")}
    assert loadgen.percentiles_ms([]) == {}


def test_h2load_log_drops_the_warm_up_and_counts_errors_and_missing_requests() -> None:
    run = loadgen.parse_h2load_log(
        H2LOAD_LOG, skip_s=1.0, duration_s=3.5, offered_rps=60.0, stdout=H2LOAD_STDOUT
    )
    assert run.window_s == 2.0
    assert run.ok == 100 and run.rps == 50.0
    assert run.bad_status == 2  # the 503 and the failed stream
    assert run.missing == 120 - 102  # offered 60/s over 2 s, 102 logged in the window
    assert run.errors == 2 + 18
    assert run.latency_ms["p50"] == pytest.approx(1.049)  # µs 1000..1099, the 50th
    assert run.latency_ms["max"] == pytest.approx(1.099)  # warm-up, failures, tail excluded
    assert run.summary["failed"] == 2 and run.summary["total"] == 136


def test_h2load_log_closed_loop_has_no_missing_and_bad_logs_fail_loudly() -> None:
    run = loadgen.parse_h2load_log(H2LOAD_LOG, skip_s=1.0, duration_s=3.5)
    assert run.missing == 0 and run.offered_rps is None and run.ok == 100
    with pytest.raises(BenchError, match="logged no request"):
        loadgen.parse_h2load_log("", skip_s=1.0, duration_s=3.0, stdout="connect refused")
    with pytest.raises(BenchError, match="not start/status"):
        loadgen.parse_h2load_log("a\tb\tc\n", skip_s=1.0, duration_s=3.0)
    with pytest.raises(BenchError, match="not more than"):
        loadgen.parse_h2load_log(H2LOAD_LOG, skip_s=3.0, duration_s=3.0)
    assert loadgen.parse_h2load_summary("no summary") == {}


def test_h2load_argv_open_loop_and_h2() -> None:
    open_loop = loadgen.h2load_argv(
        "http://198.18.0.5:8080/",
        clients=10,
        duration=6,
        log_file="/l",
        rps_per_client=100,
        h1=True,
    )
    assert open_loop == ["h2load", "--h1", "-c", "10", "-D", "6", "--log-file", "/l",
                         "--rps", "100", "http://198.18.0.5:8080/"]  # fmt: skip
    h2 = loadgen.h2load_argv("http://x:1/", clients=10, duration=7, log_file="/l", streams=10)
    assert h2[-3:] == ["-m", "10", "http://x:1/"] and "--h1" not in h2 and "--rps" not in h2


GRPC_LOG = (
    '{"concurrency": 10, "seconds": 2.0, "calls": 4, "errors": {"UNAVAILABLE": 1}, '
    '"error_details": {"UNAVAILABLE": "Connection reset by peer"}, '
    '"peer": "ipv4:198.18.0.5:40122 spiffe://nodemesh.local/dc/dc1/node/h1"}\n'
    "1000\n2000\n3000\n40000\n"
)


def test_grpc_log_gives_rate_percentiles_errors_and_the_peer() -> None:
    run = loadgen.parse_grpc_log(GRPC_LOG)
    assert run.rps == 2.0 and run.error_count == 1 and run.concurrency == 10
    assert run.error_details == {"UNAVAILABLE": "Connection reset by peer"}
    assert run.latency_ms["p50"] == 2.0 and run.latency_ms["p99"] == 40.0
    assert loadgen.grpc_peer_ip(run.peer) == "198.18.0.5"
    assert run.peer.endswith("node/h1")
    assert loadgen.grpc_peer_ip("error UNAVAILABLE: refused") == ""
    with pytest.raises(BenchError, match="4 calls but 3 latencies"):
        loadgen.parse_grpc_log(GRPC_LOG.rsplit("40000", 1)[0])
    with pytest.raises(BenchError, match="not a summary"):
        loadgen.parse_grpc_log("garbage\n")


def test_bulk_result_needs_the_sinks_confirmation_of_every_byte() -> None:
    ok = '{"bytes": 1073741824, "sent": 1073741824, "seconds": 4.0, "reply": "ok 1073741824 198.18.0.5\\n", "error": ""}'  # noqa: E501
    run = loadgen.parse_bulk(ok)
    assert run.mib_per_s == 256.0 and run.peer == "198.18.0.5"
    short = ok.replace("ok 1073741824", "ok 1000")
    with pytest.raises(BenchError, match="failed after 1073741824 sent"):
        loadgen.parse_bulk(short)
    reset = (
        '{"bytes": 10, "sent": 4, "seconds": 1.0, "reply": "", "error": "ConnectionResetError: x"}'
    )
    with pytest.raises(BenchError, match="ConnectionResetError"):
        loadgen.parse_bulk(reset)
    with pytest.raises(BenchError, match="wrote no result"):
        loadgen.parse_bulk("")


def _row(workload: str, setting: int, contender: str, rnd: int, **kw: object) -> dict[str, object]:
    return {"round": rnd, "workload": workload, "setting": setting, "contender": contender, **kw}


def test_medians_over_rounds_and_the_added_columns() -> None:
    lat = [{"p50": 1.0, "p90": 2.0, "p99": 3.0}, {"p50": 2.0, "p90": 3.0, "p99": 4.0},
           {"p50": 9.0, "p90": 9.0, "p99": 9.0}]  # fmt: skip
    procs = [{"label": "agent@h1", "cpu_us_per_request": v, "max_rss_mib": 50.0} for v in (1, 2, 3)]
    results = [
        *(_row("c1", 1, "direct", i, rps=1000.0 * (i + 1), latency_ms={"p50": 0.1, "p90": 0.2,
           "p99": 0.3}, error_count=0) for i in range(3)),
        *(_row("c1", 1, "nodemesh", i, rps=100.0, latency_ms=lat[i], error_count=0,
               processes=[procs[i]]) for i in range(3)),
        _row("bulk", 1 << 30, "nodemesh", 0, mib_per_s=100.0, seconds=10.24),
        _row("bulk", 1 << 30, "consul-connect", 0, mib_per_s=400.0, seconds=2.56),
        _row("bulk", 1 << 30, "direct", 0, error="skipped: the path was not usable (x)"),
    ]  # fmt: skip
    med = summary.medians(results)
    direct, mesh = med["c1", 1, "direct"], med["c1", 1, "nodemesh"]
    assert direct["rps"] == 2000.0 and direct["n"] == 3
    assert mesh["latency_ms.p50"] == 2.0 and mesh["latency_ms.p99"] == 4.0
    assert mesh["processes"]["agent@h1"]["cpu_us_per_request"] == 2
    assert med["bulk", 1 << 30, "direct"]["n"] == 0
    text = summary.tables(med, {"agent@h1": 60.0})
    line = next(ln for ln in text.splitlines() if ln.startswith("nodemesh") and "req/s" not in ln)
    assert "   1.90" in line  # added p50 over direct: 2.0 - 0.1
    bulk = text.split("== bulk")[1]
    assert "0.25" in bulk  # nodemesh / consul
    assert "FAILED 1x: skipped" in bulk


def test_the_plot_is_a_png_of_the_open_loop_point(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    lat = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0}
    results = [_row("open", 1000, c, 0, rps=1000.0, latency_ms=lat, error_count=0)
               for c in ("direct", "nodemesh", "consul-connect", "haproxy")]  # fmt: skip
    med = summary.medians(results)
    png = tmp_path / "open.png"
    assert summary.plot_open_loop(med, 1000, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not summary.plot_open_loop(med, 2000, tmp_path / "none.png")


def test_arguments_quick_mode_and_workload_choice() -> None:
    quick = mesh_http.parse_args(["--quick", "--out", "/tmp/x.json"])
    assert (quick.rounds, quick.duration, quick.wait_quiet) == (1, 2.0, 0.0)
    assert quick.workloads == list(mesh_http.WORKLOADS) and quick.bulk_bytes == 1 << 28
    full = mesh_http.parse_args(["--workloads", "c1,open", "--rates", "1000"])
    assert (full.rounds, full.duration, full.warmup, full.bulk_bytes) == (3, 5.0, 2.0, 1 << 30)
    assert full.workloads == ["c1", "open"] and full.rates == [1000]
    with pytest.raises(SystemExit):
        mesh_http.parse_args(["--workloads", "c1,nope"])


def test_upstreams_declare_their_protocol_and_connect_gets_one_upstream_each() -> None:
    defs = {k: peers.service_definition("198.18.0.5", u, sidecar=True)
            for k, u in peers.UPSTREAMS.items()}  # fmt: skip
    assert defs["sink"]["Meta"] == {"protocol": "tcp"}
    assert defs["grpc"]["Meta"] == {"protocol": "grpc"}
    assert defs["h2c"]["Meta"] == {"protocol": "http2"}
    assert defs["h2c"]["Check"]["TCP"] == "198.18.0.5:8081"  # no HTTP/1.1 on an h2c port
    ports = [d["Connect"]["SidecarService"]["Port"] for d in defs.values()]
    assert len(set(ports)) == len(ports)
    argv = peers.connect_proxy_argv(Path("/consul"), list(peers.UPSTREAMS.values()))
    ups = [argv[i + 1] for i, a in enumerate(argv) if a == "-upstream"]
    assert ups == [f"{u.service}:{u.connect_port}" for u in peers.UPSTREAMS.values()]


def test_the_bench_extra_check_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    msg = mesh_http.check_bench_extra()
    assert "matplotlib missing" in msg and "pip install -e '.[bench]'" in msg


# --- apps.py against real sockets on loopback ----------------------------------------------------


class _Recorder(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(b))
        return len(b)


def test_pieces_writes_the_head_and_the_body_apart() -> None:
    h = apps.PiecesHandler.__new__(apps.PiecesHandler)  # no socket: the writes are what counts
    h.wfile = _Recorder()
    h.request_version = "HTTP/1.1"
    h.requestline = "GET / HTTP/1.1"
    h.command = "GET"
    h.client_address = ("198.18.0.4", 4000)
    h.headers = email.message.Message()
    h.do_GET()
    head, body = h.wfile.writes
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert b"x-bench-peer: 198.18.0.4" in head and b"Content-Length: 100" in head
    assert body == apps.BODY and len(body) == 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def app_server(request: pytest.FixtureRequest) -> Iterator[str]:
    cmd = request.param
    if cmd == "grpc-server":
        pytest.importorskip("grpc")
    listen = f"127.0.0.1:{_free_port()}"
    p = subprocess.Popen([sys.executable, str(BENCH / "apps.py"), cmd, "--listen", listen])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(apps.addr(listen), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise
                time.sleep(0.05)
        yield listen
    finally:
        p.terminate()
        p.wait(timeout=10)


@pytest.mark.parametrize("app_server", ["sink"], indirect=True)
def test_bulk_sender_and_sink_agree_on_every_byte(app_server: str, tmp_path: Path) -> None:
    out = tmp_path / "bulk.json"
    apps.send_bulk(app_server, 5 * apps.CHUNK + 123, out, timeout=10.0)
    run = loadgen.parse_bulk(out.read_text())
    assert run.bytes == 5 * apps.CHUNK + 123 and run.peer == "127.0.0.1"


@pytest.mark.parametrize("app_server", ["grpc-server"], indirect=True)
def test_grpc_client_against_the_echo_server(app_server: str, tmp_path: Path) -> None:
    out = tmp_path / "grpc.txt"
    argv = [sys.executable, str(BENCH / "apps.py"), "grpc-client", "--target", app_server,
            "--concurrency", "2", "--warmup", "0.1", "--duration", "0.5",
            "--out", str(out)]  # fmt: skip
    subprocess.run(argv, check=True, timeout=60)
    run = loadgen.parse_grpc_log(out.read_text())
    assert run.calls > 10 and run.error_count == 0
    assert loadgen.grpc_peer_ip(run.peer) == "127.0.0.1"


@pytest.mark.parametrize("app_server", ["pieces"], indirect=True)
def test_holder_keeps_its_connections_answered_and_open(app_server: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    apps.hold(app_server, 20, ready, hold_s=0.1)
    assert '"open": 20' in ready.read_text() and '"200": 20' in ready.read_text()


def _need(name: str) -> str:
    path = shutil.which(name, path=peers.SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} is not installed (bench/mesh_http.py installs it)")
    return path


def test_nginx_serves_h2c_prior_knowledge_and_h2load_logs_it(tmp_path: Path) -> None:
    """The h2c server block with the real nginx, measured with the real h2load, parsed."""
    nginx, h2load = _need("nginx"), _need("h2load")
    import os

    if os.geteuid() != 0:
        pytest.skip("nginx with a `user` directive needs root")
    (tmp_path / "nginx-tmp").mkdir()
    tmp_path.chmod(0o755)
    port, h2c = _free_port(), _free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(peers.nginx_conf("127.0.0.1", port, tmp_path, h2c_port=h2c))
    argv = [nginx, "-e", str(tmp_path / "e.log"), "-p", str(tmp_path), "-c", str(conf)]
    p = subprocess.Popen(argv)
    try:
        log = tmp_path / "h2load.log"
        url = f"http://127.0.0.1:{h2c}/"
        for _ in range(50):  # bounded: until nginx listens
            r = subprocess.run([h2load, "-c", "2", "-m", "4", "-D", "2", "--log-file", str(log),
                                url], capture_output=True, text=True, timeout=30)  # fmt: skip
            if "succeeded" in r.stdout and log.exists() and log.stat().st_size:
                break
            time.sleep(0.1)
        run = loadgen.parse_h2load_log(log.read_text(), skip_s=1, duration_s=2, stdout=r.stdout)
        assert "Application protocol: h2c" in r.stdout
        assert run.ok > 10 and run.bad_status == 0
        assert run.summary["failed"] == 0
    finally:
        p.terminate()
        p.wait(timeout=10)
