"""The mesh keeps serving on what it knows when the controller or Consul goes away."""

from __future__ import annotations

import time

import pytest

from nodemesh.lab.mesh import AppSpec, Lab, LabSpec

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(servers=1, hosts=2, apps=(AppSpec("h2", "web", 8080),))


def _calls_ok(lab: Lab, n: int = 10) -> None:
    for _ in range(n):
        r = lab.curl("h1", lab.app_url("h2", "web"))
        assert r.status == 200, r
        assert r.json()["headers"]["x-nodemesh-client-id"].endswith("/node/h1")


def test_traffic_flows_while_the_controller_is_down(lab: Lab) -> None:
    lab.wait_http("h1", lab.app_url("h2", "web"))
    lab.stop_controller()
    try:
        _calls_ok(lab)
        # New app connections still get mTLS: certificates are held, not fetched per call.
        assert lab.agent_ready("h1") and lab.agent_ready("h2")
    finally:
        lab.start_controller()


def test_traffic_flows_while_the_local_consul_agent_is_down(lab: Lab) -> None:
    assert lab.consul is not None
    lab.wait_http("h1", lab.app_url("h2", "web"))
    lab.consul.kill_agent("h1")
    try:
        time.sleep(1.0)  # the agent's watches have noticed and are backing off
        _calls_ok(lab)
        assert "consul_unreachable" in lab.logs("h1", "agent")
    finally:
        lab.consul.start_agent("h1")
    lab.wait_http("h1", lab.app_url("h2", "web"))


def test_restarted_agent_serves_with_persisted_certificates_while_controller_is_down(
    lab: Lab,
) -> None:
    lab.wait_http("h1", lab.app_url("h2", "web"))
    lab.stop_controller()
    try:
        assert lab.stop_agent("h1") == 0
        lab.start_agent("h1")  # waits for /ready: it must not need the controller for that
        lab.wait_http("h1", lab.app_url("h2", "web"))
        _calls_ok(lab)
    finally:
        lab.start_controller()
