"""The lab's pure parts and its loopback tools, testable without root: the TOML it writes (read
back by nodemesh's own loader), Consul agent configs, the load generator's pacing and counting,
and the sample app's routes on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.config import agent_config_from_mapping, controller_config_from_mapping
from nodemesh.errors import ConfigError
from nodemesh.lab import configs, load
from nodemesh.lab.consul import agent_config
from nodemesh.lab.netns import Host
from nodemesh.lab.sampleapp import service_definition

# --- configs ------------------------------------------------------------------------------------


def _agent(**overrides: dict[str, object]) -> dict[str, dict[str, object]]:
    return configs.agent_sections(
        node="h1",
        ip="198.18.0.4",
        state_dir=Path("/tmp/s"),
        proxy_uid=999,
        ca_file=Path("/tmp/ca.pem"),
        join_token_file=Path("/tmp/jt"),
        overrides=overrides,
    )


def test_agent_toml_round_trips_through_the_config_loader() -> None:
    cfg = agent_config_from_mapping(tomllib.loads(configs.to_toml(_agent())))
    assert cfg.node == "h1"
    assert cfg.admin_addr == ("198.18.0.4", 4191)
    assert cfg.proxy_uid == 999
    assert cfg.controller_address == ""
    assert cfg.ca_file == Path("/tmp/ca.pem")
    assert cfg.shutdown_grace == 5.0


def test_agent_overrides_merge_per_key_and_are_validated() -> None:
    cfg = agent_config_from_mapping(
        tomllib.loads(
            configs.to_toml(
                _agent(log={"level": "debug"}, interception={"exclude_ports": [22, 2222]})
            )
        )
    )
    assert (cfg.log_level, cfg.log_format) == ("debug", "console")
    assert cfg.exclude_ports == (22, 2222)
    with pytest.raises(
        ConfigError, match=re.escape('h1/agent.toml: outbound.connect_timeout = "5x"')
    ):
        _agent(outbound={"connect_timeout": "5x"})


def test_controller_toml_round_trips() -> None:
    sections = configs.controller_sections(
        node="ctl", ip="198.18.0.3", state_dir=Path("/tmp/c"), join_token_file=Path("/tmp/jt")
    )
    cfg = controller_config_from_mapping(tomllib.loads(configs.to_toml(sections)))
    assert cfg.advertise == "198.18.0.3:4190" and cfg.listen == ("0.0.0.0", 4190)


@pytest.mark.parametrize(
    "value, toml",
    [(True, "true"), (3, "3"), (0.5, "0.5"), ('a "q"\n', '"a \\"q\\"\\n"'), ([1, "x"], '[1, "x"]')],
)
def test_toml_values(value: object, toml: str) -> None:
    text = configs.to_toml({"s": {"k": value}})
    assert text == f"[s]\nk = {toml}\n"
    assert tomllib.loads(text) == {"s": {"k": value}}


def test_toml_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError, match=r"s\.k = None"):
        configs.to_toml({"s": {"k": None}})


def test_consul_configs_bind_the_host_and_join_the_servers() -> None:
    c1, h1 = Host("c1", "nm-x-c1", "198.18.0.2"), Host("h1", "nm-x-h1", "198.18.0.3")
    server = agent_config(c1, [c1], Path("/d"), server=True)
    client = agent_config(h1, [c1], Path("/d"), server=False)
    assert server["bootstrap_expect"] == 1 and "bootstrap_expect" not in client
    for cfg, host in ((server, c1), (client, h1)):
        assert cfg["bind_addr"] == cfg["advertise_addr"] == host.ip
        assert cfg["client_addr"] == "127.0.0.1"
        assert cfg["retry_join"] == ["198.18.0.2"]
        assert cfg["node_name"] == host.name


def test_service_definition_checks_the_app_every_second() -> None:
    d = service_definition("web", "h2", ("198.18.0.5", 8080))
    assert d["ID"] == "web-h2-8080"
    assert (d["Address"], d["Port"]) == ("198.18.0.5", 8080)
    assert d["Check"]["HTTP"] == "http://198.18.0.5:8080/health"
    assert d["Check"]["Interval"] == "1s"


# --- load generator -----------------------------------------------------------------------------


def test_schedule_paces_and_bounds() -> None:
    s = load.Schedule(start=100.0, rate=10.0, count=3, end=200.0)
    assert [s.next(100.0) for _ in range(4)] == [100.0, 100.1, 100.2, None]
    s = load.Schedule(start=100.0, rate=10.0, count=None, end=100.25)
    assert [s.next(100.0) for _ in range(4)] == [100.0, 100.1, 100.2, None]
    s = load.Schedule(start=100.0, rate=0.0, count=None, end=101.0)
    assert s.next(100.5) == 100.5 and s.next(101.0) is None
    s.stopped.set()
    assert load.Schedule.next(s, 100.6) is None


def test_stats_counts_ok_failed_and_windows() -> None:
    st = load.Stats(now=0.0)
    for outcome, lat in (("200", 0.001), ("404", 0.002), ("503", 0.003), ("error:X", 0.004)):
        st.record(outcome, lat)
    snap = st.snapshot(now=2.0)
    assert (snap["sent"], snap["ok"], snap["failed"]) == (4, 2, 2)
    assert snap["statuses"] == {"200": 1, "404": 1, "503": 1, "error:X": 1}
    assert snap["window"]["rps"] == 2.0
    assert 0.9 < snap["latency_ms"]["p50"] < 2.1
    again = st.snapshot(now=3.0)
    assert again["window"]["rps"] == 0.0 and again["sent"] == 4


def test_unbounded_load_is_refused() -> None:
    with pytest.raises(ValueError, match="bounded"):
        load.run("http://127.0.0.1:9/")


# --- the sample app on loopback -----------------------------------------------------------------


@pytest.fixture
def web() -> Iterator[tuple[str, int]]:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nodemesh.lab.sampleapp",
            "--name",
            "web",
            "--host",
            "t1",
            "--listen",
            "127.0.0.1:0",
            "--no-register",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()  # "listening name=web address=127.0.0.1:PORT"
        ip, _, port = line.split("address=")[1].strip().rpartition(":")
        yield ip, int(port)
    finally:
        p.terminate()
        assert p.wait(timeout=10) == 0
        if p.stdout is not None:
            p.stdout.close()


def _get(
    addr: tuple[str, int], path: str, conn: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    c = conn or http.client.HTTPConnection(*addr, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


def test_sample_app_routes_on_one_kept_alive_connection(web: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*web, timeout=5)
    status, body = _get(web, "/", conn)
    first = json.loads(body)
    assert status == 200 and first["service"] == "web" and first["host"] == "t1"
    status, body = _get(web, "/bytes?n=100000", conn)
    assert status == 200 and len(body) == 100000 and body[:3] == b"\x00\x01\x02"
    assert _get(web, "/status/418", conn)[0] == 418
    assert _get(web, "/bytes?n=-1", conn)[0] == 400
    assert _get(web, "/slow?ms=x", conn)[0] == 400
    assert _get(web, "/call", conn)[0] == 400  # no upstream configured
    status, body = _get(web, "/", conn)
    assert json.loads(body)["client"] == first["client"], "the connection was kept alive"
    conn.close()


def test_sample_app_echo_streams_back(web: tuple[str, int]) -> None:
    blob = os.urandom(300_000)
    conn = http.client.HTTPConnection(*web, timeout=5)
    conn.request("POST", "/echo", body=blob)
    assert conn.getresponse().read() == blob

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(blob), 50_000):
            yield blob[i : i + 50_000]

    conn.request("POST", "/echo", body=chunks(), encode_chunked=True)
    r = conn.getresponse()
    assert r.getheader("Transfer-Encoding") == "chunked" and r.read() == blob
    conn.close()


def test_load_against_the_sample_app(web: tuple[str, int], tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    stop = threading.Event()
    t = time.monotonic()
    final = load.run(
        f"http://{web[0]}:{web[1]}/",
        count=50,
        rate=100,
        concurrency=2,
        stats_file=stats,
        interval=0.1,
        stop=stop,
    )
    assert 0.4 < time.monotonic() - t < 5
    assert final["statuses"] == {"200": 50} and final["done"]
    assert json.loads(stats.read_text()) == final
