"""Config schema: every default, every parser's bad values, and the error sentence they produce."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from nodemesh import config
from nodemesh.config import (
    AGENT_KEYS,
    CONTROLLER_KEYS,
    DEFAULT_CONSUL_PORTS,
    DEFAULT_OPAQUE_PORTS,
    agent_config_from_mapping,
    controller_config_from_mapping,
    load_agent_config,
    load_controller_config,
    read_secret,
)
from nodemesh.errors import ConfigError


def _agent_error(section: str, key: str, value: Any) -> str:
    with pytest.raises(ConfigError) as info:
        agent_config_from_mapping({section: {key: value}})
    assert info.value.exit_code == 64
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------------


def test_agent_defaults_for_every_key() -> None:
    cfg = agent_config_from_mapping({})
    assert cfg.node == socket.gethostname()
    assert cfg.datacenter == "dc1"
    assert cfg.trust_domain == "nodemesh.local"
    assert cfg.state_dir == Path("/var/lib/nodemesh")
    assert cfg.proxy_uid is None
    assert cfg.outbound_addr == ("127.0.0.1", 4140)
    assert cfg.inbound_addr == ("0.0.0.0", 4143)
    assert cfg.admin_addr == ("127.0.0.1", 4191)
    assert cfg.advertise == ""
    assert cfg.outbound_connect_timeout == 1.0
    assert cfg.detect_timeout == 10.0
    assert cfg.outbound_idle_timeout == 60.0
    assert cfg.opaque_ports == frozenset(DEFAULT_OPAQUE_PORTS)
    assert cfg.opaque_ports == frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
    assert cfg.max_idle_per_peer == 64
    assert cfg.inbound_connect_timeout == pytest.approx(0.3)
    assert cfg.inbound_idle_timeout == 90.0
    assert cfg.interception is True
    assert cfg.exclude_ports == ()
    assert cfg.exclude_cidrs == ()
    assert cfg.consul_ports == DEFAULT_CONSUL_PORTS
    assert cfg.consul_addr == ("127.0.0.1", 8500)
    assert cfg.consul_token == ""
    assert cfg.controller_address == ""
    assert cfg.ca_file == Path("/etc/nodemesh/ca.pem")
    assert cfg.join_token_file == Path("/etc/nodemesh/join-token")
    assert cfg.shutdown_grace == 120.0
    assert cfg.log_level == "info"
    assert cfg.log_format == "console"


def test_controller_defaults_for_every_key() -> None:
    cfg = controller_config_from_mapping({})
    assert cfg.node == socket.gethostname()
    assert cfg.datacenter == "dc1"
    assert cfg.trust_domain == "nodemesh.local"
    assert cfg.state_dir == Path("/var/lib/nodemesh-controller")
    assert cfg.listen == ("0.0.0.0", 4190)
    assert cfg.advertise == ""
    assert cfg.join_token_file == Path("/etc/nodemesh/join-token")
    assert cfg.leaf_ttl == 24 * 3600.0
    assert cfg.ca_cert_file is None
    assert cfg.ca_key_file is None
    assert cfg.ca_chain_file is None
    assert cfg.consul_addr == ("127.0.0.1", 8500)
    assert cfg.consul_token == ""
    assert cfg.log_level == "info"
    assert cfg.log_format == "console"


def test_every_default_passes_its_own_parser() -> None:
    for schema in (AGENT_KEYS, CONTROLLER_KEYS):
        for key, (parser, default) in schema.items():
            if default is not None:
                parser(default)  # a default that its parser rejects would break every start
            assert key.count(".") == 1, key


def test_values_are_read_from_their_sections() -> None:
    cfg = agent_config_from_mapping(
        {
            "agent": {"node": "web-1", "datacenter": "east", "proxy_uid": 997},
            "listen": {"outbound": "[::1]:14140", "inbound": "198.18.0.2:4143"},
            "outbound": {"connect_timeout": "250ms", "opaque_ports": [5432], "idle_timeout": 5},
            "interception": {"exclude_cidrs": ["10.1.2.3/8"], "enabled": False},
            "shutdown": {"grace": "2m"},
            "log": {"level": "debug", "format": "json"},
        }
    )
    assert cfg.node == "web-1"
    assert cfg.datacenter == "east"
    assert cfg.proxy_uid == 997
    assert cfg.outbound_addr == ("::1", 14140)
    assert cfg.inbound_addr == ("198.18.0.2", 4143)
    assert cfg.outbound_connect_timeout == pytest.approx(0.25)
    assert cfg.outbound_idle_timeout == 5.0
    assert cfg.opaque_ports == frozenset({5432})
    assert cfg.exclude_cidrs == ("10.0.0.0/8",)  # host bits are tolerated and normalised
    assert cfg.interception is False
    assert cfg.shutdown_grace == 120.0
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (0, 0.0),
        (2.5, 2.5),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


# --- bad values: one sentence naming file, key, value and what is expected -----------------------

BAD_AGENT_VALUES = [
    ("outbound", "connect_timeout", "5x", 'outbound.connect_timeout = "5x" is not a duration'),
    ("outbound", "connect_timeout", -1, "outbound.connect_timeout = -1 is not a duration"),
    ("outbound", "connect_timeout", True, "outbound.connect_timeout = True is not a duration"),
    ("outbound", "detect_timeout", "10", 'outbound.detect_timeout = "10" is not a duration'),
    ("outbound", "idle_timeout", "1 s", 'outbound.idle_timeout = "1 s" is not a duration'),
    ("outbound", "idle_timeout", [], "outbound.idle_timeout = [] is not a duration"),
    ("listen", "outbound", "localhost:4140", "the host part must be an IP address"),
    ("listen", "outbound", "127.0.0.1", 'listen.outbound = "127.0.0.1" is not an address'),
    ("listen", "outbound", 4140, "listen.outbound = 4140 is not an address"),
    ("listen", "inbound", "0.0.0.0:0", 'listen.inbound = "0.0.0.0:0" is not a port number'),
    ("listen", "admin", "127.0.0.1:65536", "is not a port number (1-65535)"),
    ("listen", "admin", "127.0.0.1:http", 'listen.admin = "127.0.0.1:http" is not a port number'),
    ("listen", "admin", "127.0.0.1:", 'listen.admin = "127.0.0.1:" is not a port number'),
    ("listen", "advertise", 7, "listen.advertise = 7 is not a string"),
    ("outbound", "opaque_ports", 5432, "outbound.opaque_ports = 5432 is not a list of port"),
    ("outbound", "opaque_ports", [0], "outbound.opaque_ports = [0] is not a port number"),
    ("outbound", "opaque_ports", [70000], "outbound.opaque_ports = [70000] is not a port"),
    ("outbound", "opaque_ports", [True], "outbound.opaque_ports = [True] is not a port"),
    ("outbound", "opaque_ports", ["x"], "outbound.opaque_ports = ['x'] is not a port number"),
    ("outbound", "max_idle_per_peer", 0, "outbound.max_idle_per_peer = 0 is not a positive"),
    ("outbound", "max_idle_per_peer", True, "max_idle_per_peer = True is not a positive"),
    ("outbound", "max_idle_per_peer", 1.5, "max_idle_per_peer = 1.5 is not a positive integer"),
    ("interception", "exclude_cidrs", "10.0.0.0/8", "is not a list of CIDRs"),
    ("interception", "exclude_cidrs", ["10.0.0.0/33"], "is not a list of CIDRs"),
    ("interception", "exclude_cidrs", ["nope"], "interception.exclude_cidrs = ['nope'] is not"),
    ("interception", "enabled", "yes", 'interception.enabled = "yes" is not true or false'),
    ("interception", "enabled", 1, "interception.enabled = 1 is not true or false"),
    ("agent", "node", "-leading-dash", 'agent.node = "-leading-dash" is not a valid name'),
    ("agent", "node", "has space", "is not a valid name"),
    ("agent", "node", "x" * 128, "is not a valid name"),
    ("agent", "datacenter", "", 'agent.datacenter = "" is not a valid name'),
    ("agent", "trust_domain", "Upper.Case", "is not a valid trust domain"),
    ("agent", "trust_domain", "a/b", 'agent.trust_domain = "a/b" is not a valid trust domain'),
    ("agent", "proxy_uid", -1, "agent.proxy_uid = -1 is not a uid"),
    ("agent", "proxy_uid", 2**32, "is not a uid"),
    ("agent", "proxy_uid", "997", 'agent.proxy_uid = "997" is not a uid'),
    ("agent", "proxy_uid", False, "agent.proxy_uid = False is not a uid"),
    ("agent", "state_dir", 3, "agent.state_dir = 3 is not a string"),
    ("log", "level", "verbose", 'log.level = "verbose" is not a log level'),
    ("log", "level", "INFO", 'log.level = "INFO" is not a log level'),
    ("log", "format", "xml", 'log.format = "xml" is not a log format (console, json)'),
    ("consul", "address", "consul:8500", "the host part must be an IP address"),
    ("consul", "token", 1234, "consul.token = 1234 is not a string"),
]


@pytest.mark.parametrize(("section", "key", "value", "message"), BAD_AGENT_VALUES)
def test_bad_agent_value_names_file_key_value(
    section: str, key: str, value: Any, message: str
) -> None:
    text = _agent_error(section, key, value)
    assert text.startswith(f"agent.toml: {section}.{key} = ")
    assert message in text


def test_bad_value_names_the_source_passed_in() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/x\.toml: log\.level = \"loud\" is not a log"):
        agent_config_from_mapping({"log": {"level": "loud"}}, source="/etc/x.toml")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"outbound": {"conect_timeout": "1s"}}, "unknown key outbound.conect_timeout"),
        ({"bogus": {"x": 1}}, "unknown key bogus.x"),
        ({"agent": {"node": "a", "zz": 1, "aa": 2}}, "unknown key agent.aa"),  # first, sorted
        ({"outbound": {"pool": {"size": 3}}}, "unknown key outbound.pool"),  # nested table
        ({"agent": "node-1"}, "agent must be a [agent] table"),
        ({"connect_timeout": "1s"}, "connect_timeout must be a [connect_timeout] table"),
    ],
)
def test_unknown_keys_and_non_table_sections(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        agent_config_from_mapping(raw)
    assert str(info.value).startswith("agent.toml: ")
    assert message in str(info.value)
    assert info.value.exit_code == 64


def test_agent_keys_are_not_controller_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key agent\.node"):
        controller_config_from_mapping({"agent": {"node": "a"}})
    with pytest.raises(ConfigError, match=r"unknown key ca\.cert_file"):
        agent_config_from_mapping({"ca": {"cert_file": "/x"}})


@pytest.mark.parametrize(
    ("ca", "ok"),
    [
        ({}, True),
        ({"cert_file": "/ca.pem", "key_file": "/ca.key"}, True),
        ({"cert_file": "/ca.pem"}, False),
        ({"key_file": "/ca.key"}, False),
        ({"cert_file": "/ca.pem", "key_file": ""}, False),
        ({"chain_file": "/chain.pem"}, True),
    ],
)
def test_ca_cert_and_key_are_set_together(ca: dict[str, str], ok: bool) -> None:
    if ok:
        cfg = controller_config_from_mapping({"ca": ca})
        assert (cfg.ca_cert_file is None) == (cfg.ca_key_file is None)
        if "chain_file" in ca:
            assert cfg.ca_chain_file == Path("/chain.pem")
    else:
        with pytest.raises(ConfigError) as info:
            controller_config_from_mapping({"ca": ca})
        assert str(info.value) == (
            "controller.toml: ca.cert_file and ca.key_file must be set together"
        )
        assert info.value.exit_code == 64


def test_controller_bad_value() -> None:
    with pytest.raises(ConfigError, match=r'^controller.toml: controller.leaf_ttl = "1d" is not'):
        controller_config_from_mapping({"controller": {"leaf_ttl": "1d"}})


@pytest.mark.parametrize("ttl", ["0s", 0, "500ms", "721h", "87600h", 10**9])
def test_leaf_ttl_is_bounded(ttl: object) -> None:
    """A zero lifetime failed every signing at run time; ten years made identities that never
    rotate.  Both are refused at load, naming the key and the range."""
    with pytest.raises(
        ConfigError, match=r'controller.leaf_ttl = .* is not a lifetime from "1s" to "720h"'
    ):
        controller_config_from_mapping({"controller": {"leaf_ttl": ttl}})


@pytest.mark.parametrize(("ttl", "seconds"), [("1s", 1.0), ("24h", 86400.0), ("720h", 2592000.0)])
def test_leaf_ttl_bounds_are_inclusive(ttl: str, seconds: float) -> None:
    assert controller_config_from_mapping({"controller": {"leaf_ttl": ttl}}).leaf_ttl == seconds


# --- the loader on real files --------------------------------------------------------------------


def test_load_agent_config_from_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[agent]\nnode = "h1"\n[outbound]\nconnect_timeout = "2s"\n')
    cfg = load_agent_config(p)
    assert cfg.node == "h1"
    assert cfg.outbound_connect_timeout == 2.0


def test_load_names_the_path_in_value_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[outbound]\nconnect_timeout = "5x"\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(p)
    assert str(info.value).startswith(f'{p}: outbound.connect_timeout = "5x" is not a duration')


@pytest.mark.parametrize(
    "text",
    ["[agent\nnode = 1\n", 'node = "a"\nnode = "b"\n', "[agent]\nnode = \n", "\x00"],
)
def test_bad_toml(tmp_path: Path, text: str) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(p)
    assert str(info.value).startswith(f"{p}: not valid TOML: ")
    assert info.value.exit_code == 64


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such file; pass --config"):
        load_agent_config(p)
    with pytest.raises(ConfigError, match="no such file; pass --config"):
        load_controller_config(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text("")
    p.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_agent_config(p)


def _secret(tmp_path: Path, text: str | bytes, mode: int = 0o640) -> Path:
    p = tmp_path / "join-token"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    p.chmod(mode)
    return p


def test_read_secret(tmp_path: Path) -> None:
    assert read_secret(_secret(tmp_path, "  s3cret-join-token\n"), "join token") == (
        "s3cret-join-token"
    )
    assert read_secret(_secret(tmp_path, "x" * 4096 + "\n", 0o600), "join token") == "x" * 4096
    with pytest.raises(ConfigError, match=r"is empty; write the cluster's join token there"):
        read_secret(_secret(tmp_path, " \n"), "join token")
    with pytest.raises(ConfigError, match="no such file"):
        read_secret(tmp_path / "absent", "join token")


@pytest.mark.parametrize(
    ("text", "mode", "says"),
    [
        ("s3cret-join-token", 0o644, "mode 0644: every local user can read it; chmod 0640"),
        ("s3cret-join-token", 0o660, "mode 0660: others can change it"),
        ("s3cret-join-token", 0o602, "mode 0602: others can change it"),
        ("s3cret", 0o600, "has 6 characters, fewer than 16"),
        ("x" * 4097, 0o600, "longer than 4096 characters"),
        ("x" * 100_000, 0o600, "longer than 4096 characters"),
        ("two words-of-a-token", 0o600, "one line of printable ASCII, no spaces"),
        (b"\xff" * 20, 0o600, "one line of printable ASCII"),
    ],
)
def test_a_join_token_file_that_is_open_to_others_or_weak_is_refused(
    tmp_path: Path, text: str | bytes, mode: int, says: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        read_secret(_secret(tmp_path, text, mode), "join token")


# --- values that are accepted but should not be --------------------------------------------


def test_float_port_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is not a port number"):
        agent_config_from_mapping({"outbound": {"opaque_ports": [80.9]}})


def test_integer_cidr_is_rejected() -> None:
    with pytest.raises(ConfigError, match="is not a list of CIDRs"):
        agent_config_from_mapping({"interception": {"exclude_cidrs": [10]}})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_agent_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b'[agent]\nnode = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(p)


def test_reload_plan_applies_what_is_read_at_use_and_names_the_rest() -> None:
    from dataclasses import replace

    from nodemesh.config import RELOADABLE, agent_config_from_mapping, reload_plan

    old = agent_config_from_mapping({}, "agent.toml")
    new = replace(
        old,
        log_level="debug",
        inbound_idle_timeout=5.0,
        inbound_addr=("0.0.0.0", 9999),
        state_dir=old.state_dir / "elsewhere",
    )
    merged, applied, pending = reload_plan(old, new)
    assert sorted(applied) == ["inbound_idle_timeout", "log_level"]
    assert sorted(pending) == ["inbound_addr", "state_dir"]
    assert (merged.log_level, merged.inbound_idle_timeout) == ("debug", 5.0)
    assert (merged.inbound_addr, merged.state_dir) == (old.inbound_addr, old.state_dir)
    assert reload_plan(old, old) == (old, [], [])
    assert set(old.__dataclass_fields__) >= RELOADABLE
