"""The lab's Consul agent config and LabSpec.consul_config merged over it (pure)."""

from __future__ import annotations

from pathlib import Path

from nodemesh.lab.consul import agent_config, merge_config
from nodemesh.lab.mesh import LabSpec
from nodemesh.lab.netns import Host

C1 = Host("c1", "nm-test-c1", "198.18.0.2")
H1 = Host("h1", "nm-test-h1", "198.18.0.3")


def test_without_overrides_the_lab_config_is_unchanged() -> None:
    cfg = agent_config(H1, [C1], Path("/d"), server=False)
    assert cfg == agent_config(H1, [C1], Path("/d"), server=False, overrides={})
    assert cfg["ports"] == {"grpc": -1}
    assert "connect" not in cfg and "bootstrap_expect" not in cfg


def test_overrides_add_keys_and_merge_nested_objects() -> None:
    extra = {"connect": {"enabled": True}, "ports": {"http": 18500}, "log_level": "debug"}
    cfg = agent_config(C1, [C1], Path("/d"), server=True, overrides=extra)
    assert cfg["connect"] == {"enabled": True}
    assert cfg["ports"] == {"grpc": -1, "http": 18500}  # the lab's grpc = -1 kept
    assert cfg["log_level"] == "debug"
    assert cfg["gossip_lan"]["probe_interval"] == "500ms"  # untouched sections stay
    assert cfg["bootstrap_expect"] == 1


def test_lists_and_scalars_replace_and_the_inputs_are_not_changed() -> None:
    base = {"retry_join": ["a"], "ports": {"grpc": -1}, "x": 1}
    extra = {"retry_join": ["b"], "ports": {"grpc": 8502}, "x": {"y": 2}}
    assert merge_config(base, extra) == {
        "retry_join": ["b"],
        "ports": {"grpc": 8502},
        "x": {"y": 2},
    }
    assert base == {"retry_join": ["a"], "ports": {"grpc": -1}, "x": 1}


def test_labspec_carries_consul_config_and_defaults_to_none() -> None:
    assert LabSpec().consul_config == {}
    spec = LabSpec(consul_config={"connect": {"enabled": True}})
    assert spec.consul_config["connect"] == {"enabled": True}
