"""The interception rules as tables: plan → iptables arguments, iptables -S text → status."""

from __future__ import annotations

import shlex

import pytest

from nodemesh.agent import iptables
from nodemesh.agent.iptables import (
    InterceptionError,
    InterceptionPlan,
    InterceptionStatus,
    parse_status,
    removal_commands,
    restore_script,
    rules,
)
from nodemesh.errors import NodemeshError


def _c(why: str) -> list[str]:
    return ["-m", "comment", "--comment", f"nodemesh: {why}"]


A = ["-A", "NODEMESH_OUTPUT"]
UID_998 = [*A, "-m", "owner", "--uid-owner", "998", "-j", "RETURN",
           *_c("skip the agent uid 998 so it never loops into itself")]
LO = [*A, "-o", "lo", "-j", "RETURN", *_c("skip traffic to local addresses")]
LOOPBACK = [*A, "-d", "127.0.0.0/8", "-j", "RETURN", *_c("skip loopback")]


def _port(port: int, what: str) -> list[str]:
    return [*A, "-p", "tcp", "--dport", str(port), "-j", "RETURN", *_c(f"skip {what} {port}")]


def _cidr(cidr: str) -> list[str]:
    return [*A, "-d", cidr, "-j", "RETURN", *_c(f"skip excluded CIDR {cidr}")]


def _redirect(port: int) -> list[str]:
    return [*A, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port),
            *_c(f"redirect outbound TCP to the agent on port {port}")]


CASES = [
    pytest.param(
        InterceptionPlan(proxy_uid=998, consul_ports=()),
        [UID_998, LO, LOOPBACK, _redirect(4140)],
        id="bare",
    ),
    pytest.param(
        InterceptionPlan(proxy_uid=998),
        [UID_998, LO, LOOPBACK,
         *(_port(p, "Consul port") for p in (8300, 8301, 8302, 8500, 8501, 8502, 8600)),
         _redirect(4140)],
        id="defaults-skip-consul",
    ),
    pytest.param(
        InterceptionPlan(proxy_uid=998, outbound_port=15001, consul_ports=(8500,),
                         exclude_ports=(22, 5432), exclude_cidrs=("10.0.0.0/8", "198.18.7.0/24")),
        [UID_998, LO, LOOPBACK, _port(8500, "Consul port"),
         _port(22, "excluded port"), _port(5432, "excluded port"),
         _cidr("10.0.0.0/8"), _cidr("198.18.7.0/24"), _redirect(15001)],
        id="exclusions-in-order",
    ),
    pytest.param(
        # Duplicates collapse, host bits are dropped, IPv6 is not intercepted so not excluded.
        InterceptionPlan(proxy_uid=998, consul_ports=(8500, 8500), exclude_ports=(22, 22),
                         exclude_cidrs=("10.1.2.3/8", "10.0.0.0/8", "fd00::/8")),
        [UID_998, LO, LOOPBACK, _port(8500, "Consul port"), _port(22, "excluded port"),
         _cidr("10.0.0.0/8"), _redirect(4140)],
        id="dedup-and-ipv6",
    ),
]


@pytest.mark.parametrize(("plan", "expected"), CASES)
def test_rules_table(plan: InterceptionPlan, expected: list[list[str]]) -> None:
    assert rules(plan) == expected


@pytest.mark.parametrize(("plan", "expected"), CASES)
def test_every_rule_is_commented_and_redirect_is_last(
    plan: InterceptionPlan, expected: list[list[str]]
) -> None:
    got = rules(plan)
    for rule in got:
        i = rule.index("--comment")
        assert rule[i - 2: i] == ["-m", "comment"]
        assert rule[i + 1].startswith("nodemesh: ")
    assert [r[r.index("-j") + 1] for r in got] == ["RETURN"] * (len(got) - 1) + ["REDIRECT"]


def test_restore_script_exact_text() -> None:
    plan = InterceptionPlan(proxy_uid=0, consul_ports=(8500,), exclude_ports=(22,),
                            exclude_cidrs=("198.18.0.0/15",))
    assert restore_script(plan) == (
        "*nat\n"
        ":NODEMESH_OUTPUT - [0:0]\n"
        "-F NODEMESH_OUTPUT\n"
        "-A NODEMESH_OUTPUT -m owner --uid-owner 0 -j RETURN -m comment --comment"
        ' "nodemesh: skip the agent uid 0 so it never loops into itself"\n'
        '-A NODEMESH_OUTPUT -o lo -j RETURN -m comment --comment'
        ' "nodemesh: skip traffic to local addresses"\n'
        '-A NODEMESH_OUTPUT -d 127.0.0.0/8 -j RETURN -m comment --comment'
        ' "nodemesh: skip loopback"\n'
        '-A NODEMESH_OUTPUT -p tcp --dport 8500 -j RETURN -m comment --comment'
        ' "nodemesh: skip Consul port 8500"\n'
        '-A NODEMESH_OUTPUT -p tcp --dport 22 -j RETURN -m comment --comment'
        ' "nodemesh: skip excluded port 22"\n'
        '-A NODEMESH_OUTPUT -d 198.18.0.0/15 -j RETURN -m comment --comment'
        ' "nodemesh: skip excluded CIDR 198.18.0.0/15"\n'
        '-A NODEMESH_OUTPUT -p tcp -j REDIRECT --to-ports 4140 -m comment --comment'
        ' "nodemesh: redirect outbound TCP to the agent on port 4140"\n'
        "COMMIT\n"
    )


@pytest.mark.parametrize(("plan", "expected"), CASES)
def test_restore_script_round_trips_to_rules(
    plan: InterceptionPlan, expected: list[list[str]]
) -> None:
    lines = restore_script(plan).splitlines()
    assert lines[:3] == ["*nat", ":NODEMESH_OUTPUT - [0:0]", "-F NODEMESH_OUTPUT"]
    assert lines[-1] == "COMMIT"
    assert [shlex.split(ln) for ln in lines[3:-1]] == expected


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"proxy_uid": -1}, "proxy_uid -1 is not a uid"),
        ({"proxy_uid": 0, "outbound_port": 0}, "port 0 is not a port number"),
        ({"proxy_uid": 0, "exclude_ports": (70000,)}, "port 70000 is not a port number"),
        ({"proxy_uid": 0, "consul_ports": (True,)}, "port True is not a port number"),
        ({"proxy_uid": 0, "exclude_cidrs": ("10.0.0/33",)}, "'10.0.0/33' is not a network"),
    ],
)
def test_bad_plans_name_the_value(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InterceptionError, match=fragment) as exc:
        InterceptionPlan(**kwargs)  # type: ignore[arg-type]
    assert isinstance(exc.value, NodemeshError)


# `iptables -t nat -S` as iptables-nft 1.8.9 prints it after install (abridged chain).
JUMP = ('-A OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment'
        ' "nodemesh: send outbound TCP through the nodemesh agent" -j NODEMESH_OUTPUT')
INSTALLED = "\n".join([
    "-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P OUTPUT ACCEPT", "-P POSTROUTING ACCEPT",
    "-N DOCKER",
    "-N NODEMESH_OUTPUT",
    JUMP,
    "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
    '-A NODEMESH_OUTPUT -m owner --uid-owner 998 -m comment --comment "nodemesh: x" -j RETURN',
    '-A NODEMESH_OUTPUT -p tcp -m tcp --dport 8500 -m comment --comment "nodemesh: y" -j RETURN',
    '-A NODEMESH_OUTPUT -p tcp -m comment --comment "nodemesh: z" -j REDIRECT --to-ports 4140',
]) + "\n"
EMPTY = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
# A crash between creating the chain and adding the jump, plus a foreign rule before ours.
PARTIAL = EMPTY + "-N NODEMESH_OUTPUT\n-A OUTPUT -p udp -j ACCEPT\n"
# Two jumps (one with an old comment) and a chain whose last rule is not the redirect.
DOUBLED = (EMPTY + "-N NODEMESH_OUTPUT\n-A OUTPUT -p udp -j ACCEPT\n" + JUMP + "\n"
           + "-A OUTPUT -p tcp -m comment --comment \"nodemesh: old -j words\" -j NODEMESH_OUTPUT\n"
           + "-A NODEMESH_OUTPUT -o lo -j RETURN\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (INSTALLED, InterceptionStatus(True, True, 1, 1, 3, True)),
        (EMPTY, InterceptionStatus(False, False, 0, None, 0, False)),
        (PARTIAL, InterceptionStatus(True, False, 0, None, 0, False)),
        (DOUBLED, InterceptionStatus(True, True, 2, 2, 1, False)),
    ],
    ids=["installed", "empty", "partial", "doubled"],
)
def test_parse_status(text: str, expected: InterceptionStatus) -> None:
    assert parse_status(text) == expected
    assert parse_status(text).installed == (text is INSTALLED)


def test_removal_commands() -> None:
    jump_spec = ["-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN",
                 "-m", "comment", "--comment",
                 "nodemesh: send outbound TCP through the nodemesh agent", "-j", "NODEMESH_OUTPUT"]
    assert removal_commands(INSTALLED) == [
        ["-D", "OUTPUT", *jump_spec],
        ["-F", "NODEMESH_OUTPUT"],
        ["-X", "NODEMESH_OUTPUT"],
    ]
    assert removal_commands(EMPTY) == []
    assert removal_commands(PARTIAL) == [["-F", "NODEMESH_OUTPUT"], ["-X", "NODEMESH_OUTPUT"]]
    assert removal_commands(DOUBLED) == [
        ["-D", "OUTPUT", *jump_spec],
        ["-D", "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "nodemesh: old -j words",
         "-j", "NODEMESH_OUTPUT"],
        ["-F", "NODEMESH_OUTPUT"],
        ["-X", "NODEMESH_OUTPUT"],
    ]


def test_jump_rule_matches_what_install_adds() -> None:
    # iptables -S spells --syn out as the tcp match it stands for.
    syn = ("-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN")
    rule = iptables.JUMP_RULE
    i = rule.index("--syn")
    assert tuple(shlex.split(JUMP)[2:]) == (*rule[:i], *syn, *rule[i + 1 :])


def test_missing_binary_says_how_to_fix() -> None:
    missing = "/nonexistent/nodemesh-test/iptables"
    with pytest.raises(InterceptionError, match="iptables-restore not found; install the iptables"):
        iptables.install(InterceptionPlan(proxy_uid=0), iptables=missing)
    for call in (iptables.remove, iptables.show, iptables.status):
        with pytest.raises(InterceptionError, match="not found; install the iptables package"):
            call(iptables=missing)
