"""The lab with the mesh in it: the harness starts the controller and agents the way an operator
would (agents as the `nodemesh` user with only CAP_NET_ADMIN), the unmodified apps' calls go
through the agents, and teardown stops agents with SIGTERM so they remove their rules.

These are the harness's own checks; the mesh's behaviour is tested by the mesh's system tests.
"""

from __future__ import annotations

import pwd

import pytest

from nodemesh.lab.mesh import NODEMESH_USER, AppSpec, Lab, LabSpec

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(
        servers=1,
        hosts=2,
        apps=(AppSpec("h2", "web", 8080), AppSpec("h1", "shop", 8090, ("web",))),
    )


def _status(lab: Lab, host: str, pid: int) -> dict[str, str]:
    out = lab.exec(host, ["cat", f"/proc/{pid}/status"]).stdout.decode()
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


def test_agents_run_as_nodemesh_with_only_net_admin(lab: Lab) -> None:
    uid = pwd.getpwnam(NODEMESH_USER).pw_uid
    for host in lab.agent_hosts:
        proc = lab.agents[host]
        status = _status(lab, host, proc.pid)
        assert status["Uid"].split()[:2] == [str(uid), str(uid)]
        assert int(status["CapEff"], 16) == 1 << 12  # CAP_NET_ADMIN only
        assert lab.agent_ready(host)


def test_controller_is_healthy_in_consul(lab: Lab) -> None:
    (entry,) = lab.consul_api("h1", "/v1/health/service/nodemesh-controller?passing")
    assert entry["Node"]["Node"] == "ctl"


def test_agent_config_is_what_the_lab_promises(lab: Lab) -> None:
    text = (lab.dir / "h1" / "agent.toml").read_text()
    assert 'node = "h1"' in text
    assert f'admin = "{lab.host_ip("h1")}:4191"' in text
    assert "address" not in text.split("[controller]")[1].split("[")[0]
    token = lab.join_token_file.stat()
    assert oct(token.st_mode & 0o777) == "0o640" and token.st_uid == 0


def test_interception_is_installed_on_every_agent_host(lab: Lab) -> None:
    for host in lab.agent_hosts:
        nat = lab.exec(host, ["iptables-save", "-t", "nat"]).stdout.decode()
        assert "NODEMESH" in nat and "REDIRECT" in nat
    assert "NODEMESH" not in lab.exec("ctl", ["iptables-save", "-t", "nat"]).stdout.decode()


def test_shop_reaches_web_through_the_mesh(lab: Lab) -> None:
    r = lab.wait_http("ctl", lab.app_url("h1", "shop"))
    (call,) = r.json()["calls"]
    assert call["status"] == 200
    # Through the mesh, web's peer is the agent on its own host, not shop's host.
    assert call["body"]["client"].split(":")[0] != lab.host_ip("h1")
    metrics = lab.curl("ctl", lab.admin_url("h1", "/metrics"))
    assert metrics.status == 200 and "nodemesh_" in metrics.text


def test_stopped_agent_removes_its_rules_and_restarts(lab: Lab) -> None:
    assert lab.stop_agent("h2") == 0
    assert "NODEMESH" not in lab.exec("h2", ["iptables-save", "-t", "nat"]).stdout.decode()
    lab.start_agent("h2")
    assert "NODEMESH" in lab.exec("h2", ["iptables-save", "-t", "nat"]).stdout.decode()
    lab.wait_http("ctl", lab.app_url("h1", "shop"))
