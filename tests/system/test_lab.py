"""The lab itself, before any mesh: hosts on the bridge, a real Consul cluster, apps calling
each other directly, a bounded load generator, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nodemesh.lab import netns
from nodemesh.lab.mesh import AppSpec, Lab, LabSpec
from nodemesh.lab.netns import LabError

pytestmark = pytest.mark.system

HOSTS = ["c1", "ctl", "h1", "h2", "h3"]


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(
        servers=1,
        hosts=3,
        controller=False,
        agents=False,
        apps=(
            AppSpec("h2", "web", 8080),
            AppSpec("h3", "web", 8080),
            AppSpec("h1", "shop", 8090, ("web",)),
        ),
    )


def _root_links() -> set[str]:
    out = subprocess.run(
        ["ip", "-j", "link"], capture_output=True, text=True, timeout=10, check=True
    )
    return {link["ifname"] for link in json.loads(out.stdout)}


def _connect(lab: Lab, src: str, ip: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({ip!r}, {port}), timeout=2).close()"
    return lab.exec(src, [sys.executable, "-c", code], check=False).returncode == 0


def test_every_host_has_its_address_and_no_route_out(lab: Lab) -> None:
    assert sorted(lab.net.hosts) == sorted(HOSTS)
    ips = {lab.host_ip(h) for h in HOSTS}
    assert len(ips) == len(HOSTS)
    for h in HOSTS:
        addrs = json.loads(lab.exec(h, ["ip", "-j", "-4", "addr"]).stdout)
        by_if = {a["ifname"]: [i["local"] for i in a["addr_info"]] for a in addrs}
        assert by_if == {"lo": ["127.0.0.1"], "eth0": [lab.host_ip(h)]}
        routes = json.loads(lab.exec(h, ["ip", "-j", "-4", "route"]).stdout)
        assert [r["dst"] for r in routes] == ["198.18.0.0/24"], "a lab host must not route out"


def test_hosts_reach_each_other_over_the_bridge(lab: Lab) -> None:
    # Every Consul agent listens for gossip on its host's address (TCP 8301).
    for src in ("h1", "c1"):
        for dst in HOSTS:
            assert _connect(lab, src, lab.host_ip(dst), 8301), f"{src} cannot reach {dst}"
    assert not _connect(lab, "h1", lab.host_ip("h2"), 8399), "a closed port must refuse"


def test_root_namespace_has_no_lab_interface(lab: Lab) -> None:
    assert not _root_links() & {"br0", *HOSTS}
    assert lab.net.switch in netns.list_netns()


def test_consul_cluster_has_a_leader_and_every_member_alive(lab: Lab) -> None:
    assert lab.consul is not None
    assert lab.consul.leader() == f"{lab.host_ip('c1')}:8300"
    for via in ("c1", "h3"):
        assert lab.consul.members(via) == dict.fromkeys(HOSTS, 1)
    # Each host's apps find *their own* agent on 127.0.0.1:8500.
    for h in HOSTS:
        assert lab.consul_api(h, "/v1/agent/self")["Config"]["NodeName"] == h


def test_apps_are_registered_and_passing(lab: Lab) -> None:
    entries = lab.consul_api("h1", "/v1/health/service/web?passing")
    got = sorted(
        (e["Node"]["Node"], e["Service"]["Address"], e["Service"]["Port"]) for e in entries
    )
    assert got == [("h2", lab.host_ip("h2"), 8080), ("h3", lab.host_ip("h3"), 8080)]


def test_shop_calls_web_directly_and_reaches_both_instances(lab: Lab) -> None:
    seen = set()
    for _ in range(30):
        r = lab.curl("ctl", lab.app_url("h1", "shop"))
        assert r.status == 200, r.text
        body = r.json()
        assert body["service"] == "shop" and body["host"] == "h1"
        (call,) = body["calls"]
        assert call["status"] == 200
        web = call["body"]
        # No mesh: web sees shop's own address as the client.
        assert web["client"].split(":")[0] == lab.host_ip("h1")
        seen.add(web["host"])
    assert seen == {"h2", "h3"}


def test_web_routes_across_hosts(lab: Lab) -> None:
    url = lab.app_url("h2", "web")
    blob = os.urandom(200_000)
    r = lab.curl("h1", url + "echo", method="POST", data=blob)
    assert (r.status, r.body) == (200, blob)
    r = lab.curl(
        "h1", url + "echo", method="POST", data=blob, headers={"Transfer-Encoding": "chunked"}
    )
    assert (r.status, r.body) == (200, blob)
    r = lab.curl("h1", url + "bytes?n=1000000")
    assert (r.status, len(r.body)) == (200, 1_000_000)
    assert lab.curl("h1", url + "status/503").status == 503
    t = time.monotonic()
    assert lab.curl("h1", url + "slow?ms=300").status == 200
    assert time.monotonic() - t >= 0.3
    assert lab.curl("h1", url + "nope").status == 404


def test_load_generator_counts_every_request(lab: Lab) -> None:
    load = lab.start_load("h3", lab.app_url("h1", "shop"), count=100, rate=200, concurrency=2)
    final = load.wait(timeout=30)
    assert final["sent"] == 100
    assert final["statuses"] == {"200": 100}
    assert 0 < final["latency_ms"]["p50"] <= final["latency_ms"]["p99"]


def test_stopped_app_leaves_the_catalog_and_comes_back(lab: Lab) -> None:
    lab.stop_app("h3", "web")
    try:
        passing = lab.consul_api("h1", "/v1/health/service/web?passing")
        assert [e["Node"]["Node"] for e in passing] == ["h2"]
        for _ in range(10):
            assert (
                lab.curl("ctl", lab.app_url("h1", "shop")).json()["calls"][0]["body"]["host"]
                == "h2"
            )
        assert lab.curl("h1", lab.app_url("h3", "web")).status == 0
    finally:
        lab.start_app("h3", "web", 8080)
    hosts = {e["Node"]["Node"] for e in lab.consul_api("h1", "/v1/health/service/web?passing")}
    assert hosts == {"h2", "h3"}


def test_lab_helpers_name_bad_input(lab: Lab) -> None:
    with pytest.raises(LabError, match="no lab host 'h9'"):
        lab.host_ip("h9")
    with pytest.raises(LabError, match="must be bounded"):
        lab.start_load("h1", lab.app_url("h2", "web"))
    with pytest.raises(LabError, match="no app nope running on h1"):
        lab.stop_app("h1", "nope")
    assert "listening name=web" in lab.logs("h2", "web")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_teardown_leaves_no_namespace_process_or_file(make_lab: Callable[[LabSpec], Lab]) -> None:
    links_before = _root_links()
    lab = make_lab(
        LabSpec(servers=1, hosts=1, controller=False, agents=False, apps=(AppSpec("h1", "web"),))
    )
    load = lab.start_load("h1", lab.app_url("h1", "web"), duration=60, rate=5)
    assert lab.consul is not None
    pids = [p.pid for p in lab.apps.values()] + [load.process.pid]
    pids += [a.process.pid for a in lab.consul.agents.values() if a.process]
    names = lab.net.namespaces
    assert all(_alive(p) for p in pids) and len(names) == 4
    lab.close()
    assert not set(names) & netns.list_netns()
    assert not [p for p in pids if _alive(p)]
    assert not lab.dir.exists()
    assert _root_links() == links_before
    lab.close()  # a second close is harmless


def test_failed_start_tears_down_and_keeps_the_logs(lab_consul_binary: Path) -> None:
    before = netns.list_netns()
    # The app cannot bind a port Consul's own agent already holds on that host.
    spec = LabSpec(
        servers=1,
        hosts=1,
        controller=False,
        agents=False,
        apps=(AppSpec("h1", "web", 8301),),
        ready_timeout=10,
        consul_binary=lab_consul_binary,
    )
    lab = Lab(spec)
    try:
        with pytest.raises(LabError, match="web on h1 exited"):
            lab.__enter__()
        assert netns.list_netns() <= before
        assert "Address already in use" in lab.logs("h1", "web")
    finally:
        shutil.rmtree(lab.dir, ignore_errors=True)
