"""``nodemesh check --pre`` judged from facts: a host ready for the agent, then each thing that
would stop an install, one at a time."""

from __future__ import annotations

import email.utils
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nodemesh.agent.iptables import parse_status
from nodemesh.check.checks import evaluate_pre
from nodemesh.check.facts import IptablesFacts, Owner, PreFacts, Reply, Socket, StateDirFacts
from nodemesh.check.results import Result
from nodemesh.config import agent_config_from_mapping

NOW = 1_800_000_000.0
PATH = Path("/etc/nodemesh/agent.toml")
CFG = agent_config_from_mapping({}, str(PATH))


def ready() -> PreFacts:
    return PreFacts(
        cfg=CFG,
        config_path=PATH,
        config_found=True,
        now=NOW,
        euid=0,
        cap_net_admin=True,
        python=(3, 11, 2),
        user_uid=999,
        user_name="nodemesh",
        iptables_path="/usr/sbin/iptables",
        iptables=IptablesFacts(status=parse_status("-P OUTPUT ACCEPT\n")),
        matches=frozenset({"owner", "comment", "tcp"}),
        targets=frozenset({"REDIRECT", "DNAT"}),
        modules=frozenset(),
        state_dir=StateDirFacts(Path("/var/lib/nodemesh"), False, True, Path("/var/lib")),
        sockets=(Socket("127.0.0.1", 8500, 100, 1), Socket("0.0.0.0", 22, 0, 2)),
        owners={},
        consul_leader=Reply(
            200, b'"198.18.0.2:8300"', email.utils.formatdate(NOW, usegmt=True), NOW
        ),
    )


def one(got: list[Result], name: str) -> Result:
    (r,) = [r for r in got if r.name == name]
    return r


def test_a_ready_host_passes() -> None:
    got = evaluate_pre(ready())
    assert [(r.section, r.name) for r in got] == [
        ("config", "config"),
        ("host", "privileges"),
        ("host", "python"),
        ("host", "user"),
        ("host", "state-dir"),
        ("kernel", "iptables"),
        ("kernel", "kernel-owner"),
        ("kernel", "kernel-redirect"),
        ("ports", "port-outbound"),
        ("ports", "port-inbound"),
        ("ports", "port-admin"),
        ("consul", "consul-reachable"),
        ("consul", "consul-leader"),
        ("clock", "clock-consul"),
    ]
    assert all(r.ok for r in got), [r for r in got if not r.ok]
    assert one(got, "state-dir").message == (
        "state dir /var/lib/nodemesh can be created (/var/lib is writable)"
    )


SD = Path("/var/lib/nodemesh")
BROKEN = [
    pytest.param(
        lambda f: replace(f, config_found=False),
        "config",
        "warning",
        "no config at /etc/nodemesh/agent.toml: checking the defaults",
        "write /etc/nodemesh/agent.toml",
        id="no-config-yet",
    ),
    pytest.param(
        lambda f: replace(f, euid=1000, cap_net_admin=False),
        "privileges",
        "error",
        "running as uid 1000 without CAP_NET_ADMIN",
        "as root",
        id="not-root",
    ),
    pytest.param(
        lambda f: replace(f, python=(3, 10, 12)),
        "python",
        "error",
        "Python 3.10.12 is older than 3.11",
        "install Python 3.11",
        id="old-python",
    ),
    pytest.param(
        lambda f: replace(f, user_uid=None),
        "user",
        "error",
        "user nodemesh does not exist",
        "useradd --system",
        id="no-user",
    ),
    pytest.param(
        lambda f: replace(f, state_dir=StateDirFacts(SD, True, False, SD.parent)),
        "state-dir",
        "error",
        "exists but is not writable",
        "chown nodemesh",
        id="state-dir-not-writable",
    ),
    pytest.param(
        lambda f: replace(f, state_dir=StateDirFacts(SD, False, False, Path("/var"))),
        "state-dir",
        "error",
        "does not exist and /var is not writable",
        "install -d -o nodemesh",
        id="state-dir-parent-not-writable",
    ),
    pytest.param(
        lambda f: replace(f, iptables_path=None),
        "iptables",
        "error",
        "iptables is not installed",
        "apt-get install iptables",
        id="no-iptables",
    ),
    pytest.param(
        lambda f: replace(f, iptables=IptablesFacts(error="iptables -t nat -S failed (no nat)")),
        "iptables",
        "error",
        "cannot read the nat table",
        "CONFIG_IP_NF_NAT",
        id="no-nat-table",
    ),
    pytest.param(
        lambda f: replace(f, matches=frozenset({"comment"})),
        "kernel-owner",
        "error",
        "the kernel has no owner match",
        "CONFIG_NETFILTER_XT_MATCH_OWNER",
        id="no-owner-match",
    ),
    pytest.param(
        lambda f: replace(f, matches=None),
        "kernel-owner",
        "warning",
        "cannot read /proc/net/ip_tables_matches",
        "modinfo xt_owner",
        id="owner-match-unknown",
    ),
    pytest.param(
        lambda f: replace(f, targets=frozenset({"DNAT"})),
        "kernel-redirect",
        "error",
        "the kernel has no REDIRECT target",
        "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
        id="no-redirect-target",
    ),
    pytest.param(
        lambda f: replace(
            f,
            sockets=(*(f.sockets or ()), Socket("0.0.0.0", 4191, 0, 7)),
            owners={7: (Owner(55, "linkerd2-proxy", 2102),)},
        ),
        "port-admin",
        "error",
        "listen.admin 127.0.0.1:4191 is taken: port 4191 is held on 0.0.0.0 by linkerd2-proxy",
        "set listen.admin in /etc/nodemesh/agent.toml",
        id="admin-port-taken",
    ),
    pytest.param(
        lambda f: replace(f, sockets=(*(f.sockets or ()), Socket("198.18.0.4", 4143, 0, 8))),
        "port-inbound",
        "error",
        "listen.inbound 0.0.0.0:4143 is taken",
        "stop that program",
        id="inbound-port-taken-on-one-address",
    ),
    pytest.param(
        lambda f: replace(f, sockets=None),
        "port-outbound",
        "warning",
        "cannot list TCP listeners",
        "/proc mounted",
        id="no-proc",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=Reply(error="connection refused")),
        "consul-reachable",
        "error",
        "consul is not reachable at 127.0.0.1:8500",
        "start the local Consul agent",
        id="consul-down",
    ),
    pytest.param(
        lambda f: replace(
            f,
            consul_leader=replace(
                f.consul_leader, date=email.utils.formatdate(NOW - 120, usegmt=True)
            ),
        ),
        "clock-consul",
        "error",
        "clock is 1m 59s ahead of Consul's",
        "synchronise",
        id="clock-skew",
    ),
]


@pytest.mark.parametrize(("brk", "name", "level", "message", "hint"), BROKEN)
def test_each_broken_fact_fails_its_check(
    brk: Any, name: str, level: str, message: str, hint: str
) -> None:
    r = one(evaluate_pre(brk(ready())), name)
    assert r.level == level, r
    assert message in r.message, r.message
    assert hint in r.hint, r.hint


def test_cap_net_admin_without_root_is_enough() -> None:
    r = one(evaluate_pre(replace(ready(), euid=1000)), "privileges")
    assert r.ok and r.message == "running as uid 1000 with CAP_NET_ADMIN"


def test_owner_match_as_a_loadable_module_is_enough() -> None:
    f = replace(
        ready(),
        matches=frozenset(),
        targets=frozenset(),
        modules=frozenset({"xt_owner", "xt_REDIRECT"}),
    )
    got = evaluate_pre(f)
    assert (
        one(got, "kernel-owner").ok
        and "loadable module (xt_owner)" in one(got, "kernel-owner").message
    )
    assert one(got, "kernel-redirect").ok


def test_existing_state_dir_is_fine() -> None:
    r = one(
        evaluate_pre(replace(ready(), state_dir=StateDirFacts(SD, True, True, SD.parent))),
        "state-dir",
    )
    assert r.ok and r.message == "state dir /var/lib/nodemesh exists"
