"""The pure parsers behind ``nodemesh check``: kernel tables, HTTP dates, Consul's answers."""

from __future__ import annotations

import json
import sys

import pytest

from nodemesh.check.facts import (
    Owner,
    Reply,
    Socket,
    admin_target,
    agent_process,
    listener_at,
    parse_capabilities,
    parse_catalog_node,
    parse_effective_uid,
    parse_http_date,
    parse_names,
    parse_node_checks,
    parse_proc_net_tcp,
    port_holders,
)
from nodemesh.config import agent_config_from_mapping

# Real lines from a lab host (x86, little-endian): listeners, one established, one TIME_WAIT.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:102C 00000000:0000 0A 00000000:0000 00:00000000 00000000   999        0 418231 1 0
   1: 00000000:102F 00000000:0000 0A 00000000:0000 00:00000000 00000000   999        0 418232 1 0
   2: 040012C6:104F 00000000:0000 0A 00000000:0000 00:00000000 00000000   999        0 418233 1 0
   3: 0100007F:2134 00000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 417001 1 0
   4: 0100007F:2134 0100007F:A0C2 01 00000000:0000 00:00000000 00000000     0        0 417777 1 0
   5: 040012C6:1F90 030012C6:C350 06 00000000:0000 03:00000F2A 00000000     0        0 0 3 0
   garbage line
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 5151 1 0
   1: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:0000 00:00000000 00000000     0        0 5152 1 0
"""  # noqa: E501


@pytest.mark.skipif(sys.byteorder != "little", reason="the lines were read on a little-endian host")
def test_proc_net_tcp_lists_listeners_only() -> None:
    assert parse_proc_net_tcp(PROC_NET_TCP) == [
        Socket("127.0.0.1", 4140, 999, 418231),
        Socket("0.0.0.0", 4143, 999, 418232),
        Socket("198.18.0.4", 4175, 999, 418233),
        Socket("127.0.0.1", 8500, 0, 417001),
    ]
    assert parse_proc_net_tcp(PROC_NET_TCP6) == [
        Socket("::1", 8080, 0, 5151),
        Socket("::", 22, 0, 5152),
    ]
    assert parse_proc_net_tcp("") == []


SOCKS = (
    Socket("127.0.0.1", 4140, 999, 1),
    Socket("0.0.0.0", 4143, 999, 2),
    Socket("198.18.0.4", 4191, 999, 3),
    Socket("::", 8080, 0, 4),
)


@pytest.mark.parametrize(
    ("addr", "exact", "holders"),
    [
        (("127.0.0.1", 4140), 1, [1]),
        (("0.0.0.0", 4140), None, [1]),  # a wildcard bind collides with a specific one
        (("198.18.0.9", 4140), None, []),  # another address, same port: no collision
        (("0.0.0.0", 4143), 2, [2]),
        (("127.0.0.1", 4143), None, [2]),
        (("198.18.0.4", 4191), 3, [3]),
        (("127.0.0.1", 4191), None, []),
        (("::", 8080), 4, [4]),
        (("127.0.0.1", 9999), None, []),
    ],
)
def test_listener_at_and_port_holders(
    addr: tuple[str, int], exact: int | None, holders: list[int]
) -> None:
    s = listener_at(SOCKS, addr)
    assert (s.inode if s else None) == exact
    assert [h.inode for h in port_holders(SOCKS, addr)] == holders


def test_agent_process_is_not_systemd() -> None:
    systemd, agent = Owner(1, "systemd", 0), Owner(812, "nodemesh", 999)
    assert agent_process((systemd, agent)) == agent
    assert agent_process((agent,)) == agent
    assert agent_process((systemd,)) is None
    assert agent_process(()) is None


def test_admin_target_turns_wildcards_into_loopback() -> None:
    cfg = agent_config_from_mapping({"listen": {"admin": "0.0.0.0:4191"}})
    assert admin_target(cfg) == ("127.0.0.1", 4191)
    cfg = agent_config_from_mapping({"listen": {"admin": "198.18.0.4:9191"}})
    assert admin_target(cfg) == ("198.18.0.4", 9191)


@pytest.mark.parametrize(
    ("header", "epoch"),
    [
        ("Fri, 15 Jan 2027 08:00:00 GMT", 1800000000.0),
        ("Fri, 15 Jan 2027 09:00:00 +0100", 1800000000.0),
        (None, None),
        ("", None),
        ("yesterday", None),
    ],
)
def test_http_date(header: str | None, epoch: float | None) -> None:
    assert parse_http_date(header) == epoch


def test_status_files() -> None:
    status = "Name:\tnodemesh\nUid:\t999\t998\t997\t996\nCapEff:\t0000000000001000\n"
    assert parse_effective_uid(status) == 998
    assert parse_capabilities(status) == 1 << 12
    assert parse_effective_uid("Name: x\n") is None
    assert parse_capabilities("CapEff: zz\n") == 0
    assert parse_names("owner\n\ncomment\nowner\n") == frozenset({"owner", "comment"})


def _reply(doc: object) -> Reply:
    return Reply(200, json.dumps(doc).encode())


def test_catalog_node() -> None:
    node = parse_catalog_node(
        _reply(
            {
                "Node": {"Node": "h1", "Address": "198.18.0.4"},
                "Services": {
                    "web-2": {"Service": "web", "Port": 8081},
                    "web-1": {"Service": "web", "Port": 8080},
                    "odd": {"Service": "", "Port": 1},
                    "odd2": "not an object",
                },
            }
        )
    )
    assert node is not None and node.address == "198.18.0.4"
    assert [(i.id, i.service, i.port) for i in node.instances] == [
        ("web-1", "web", 8080),
        ("web-2", "web", 8081),
    ]
    assert parse_catalog_node(_reply(None)) is None
    with pytest.raises(ValueError, match="no Node"):
        parse_catalog_node(_reply([1]))
    with pytest.raises(ValueError):
        parse_catalog_node(Reply(200, b"<html>"))


def test_node_checks() -> None:
    checks = parse_node_checks(
        _reply(
            [
                {"CheckID": "serfHealth", "Status": "passing", "Output": "Agent alive"},
                {
                    "CheckID": "service:web-1",
                    "Name": "web HTTP",
                    "Status": "critical",
                    "ServiceID": "web-1",
                },
                "junk",
            ]
        )
    )
    assert [(c.check_id, c.name, c.status, c.service_id) for c in checks] == [
        ("serfHealth", "serfHealth", "passing", ""),
        ("service:web-1", "web HTTP", "critical", "web-1"),
    ]
    with pytest.raises(ValueError, match="not a list"):
        parse_node_checks(_reply({"CheckID": "x"}))
