"""nodemesh's iptables rules installed for real, inside a fresh network namespace.

Every test gets its own namespace (per-run name, deleted in a finally) and drives the real
`iptables` there through the `iptables` CLI group, run with `ip netns exec`.  The root
namespace's nat table is checked before and after: it never holds a NODEMESH line.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemesh.agent.iptables import InterceptionPlan, rules

pytestmark = pytest.mark.system

CLI = [sys.executable, "-B", "-m", "nodemesh.agent.iptables"]
TIMEOUT = 30  # seconds, for any one command


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr}")
    return proc


def _root_nat_nodemesh_lines() -> list[str]:
    return [ln for ln in _run("iptables", "-t", "nat", "-S").stdout.splitlines()
            if "NODEMESH" in ln]


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
        pytest.skip("needs root, iproute2 and iptables")
    assert _root_nat_nodemesh_lines() == []
    name = f"nm-ipt-{os.getpid()}-{secrets.token_hex(3)}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _run("ip", "netns", "del", name, check=False)
        assert _root_nat_nodemesh_lines() == []


def cli(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *CLI, *args, check=check)


def nat_lines(ns: str) -> list[str]:
    return _run("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S").stdout.splitlines()


def comments(lines: list[str], prefix: str) -> list[str]:
    out = []
    for ln in lines:
        if ln.startswith(prefix):
            args = shlex.split(ln)
            out.append(args[args.index("--comment") + 1])
    return out


def expected_comments(plan: InterceptionPlan) -> list[str]:
    return [r[r.index("--comment") + 1] for r in rules(plan)]


PLAN = InterceptionPlan(proxy_uid=998, exclude_ports=(22,), exclude_cidrs=("10.0.0.0/8",))
INSTALL = ["install", "--proxy-uid", "998", "--exclude-port", "22", "--exclude-cidr", "10.0.0.0/8"]


def test_install_twice_is_idempotent_and_remove_leaves_nothing(netns: str) -> None:
    before = nat_lines(netns)
    assert not [ln for ln in before if "NODEMESH" in ln]

    cli(netns, *INSTALL)
    first = nat_lines(netns)
    cli(netns, *INSTALL)
    second = nat_lines(netns)
    assert second == first

    assert second.count("-N NODEMESH_OUTPUT") == 1
    jumps = [ln for ln in second if ln.startswith("-A OUTPUT ")]
    assert len(jumps) == 1 and jumps[0].endswith("-j NODEMESH_OUTPUT")
    assert "-p tcp" in jumps[0]
    # Same rules, same order, one copy each: the comments identify them.
    assert comments(second, "-A NODEMESH_OUTPUT ") == expected_comments(PLAN)
    assert "REDIRECT --to-ports 4140" in second[-1]

    removed = cli(netns, "remove").stdout
    assert "removed: -N NODEMESH_OUTPUT" in removed
    assert f"removed: {jumps[0]}" in removed
    assert nat_lines(netns) == before
    assert cli(netns, "remove").stdout.startswith("nothing to remove")
    assert nat_lines(netns) == before


def test_install_with_a_new_plan_replaces_the_rules(netns: str) -> None:
    cli(netns, *INSTALL)
    cli(netns, "install", "--proxy-uid", "997", "--outbound-port", "15001",
        "--consul-port", "8500", "--exclude-port", "2222")
    lines = nat_lines(netns)
    new = InterceptionPlan(proxy_uid=997, outbound_port=15001, consul_ports=(8500,),
                           exclude_ports=(2222,))
    assert comments(lines, "-A NODEMESH_OUTPUT ") == expected_comments(new)
    assert sum(ln.startswith("-A OUTPUT ") for ln in lines) == 1


def test_install_repairs_stale_jumps_and_leaves_foreign_rules(netns: str) -> None:
    ipt = ["ip", "netns", "exec", netns, "iptables", "-t", "nat"]
    foreign = "-A OUTPUT -p udp -m udp --dport 53 -j ACCEPT"
    _run(*ipt, "-N", "NODEMESH_OUTPUT")
    _run(*ipt, *shlex.split(foreign))
    # What an older version or a half-finished run might have left: two jumps, none current.
    _run(*ipt, "-A", "OUTPUT", "-p", "tcp", "-j", "NODEMESH_OUTPUT")
    _run(*ipt, "-A", "OUTPUT", "-p", "tcp", "-m", "comment", "--comment", "nodemesh: old",
         "-j", "NODEMESH_OUTPUT")

    cli(netns, *INSTALL)
    status = json.loads(cli(netns, "show", "-o", "json").stdout)
    assert status["installed"] is True
    assert (status["jump_count"], status["jump_position"]) == (1, 1)
    assert status["rule_count"] == len(rules(PLAN))
    assert status["redirect_last"] is True
    assert foreign in nat_lines(netns)

    cli(netns, "remove")
    assert [ln for ln in nat_lines(netns) if ln.startswith("-A") or ln.startswith("-N")] == [
        foreign
    ]


def test_show_reports_partial_and_absent_state(netns: str) -> None:
    absent = json.loads(cli(netns, "show", "-o", "json").stdout)
    assert absent == {"chain_present": False, "jump_present": False, "jump_count": 0,
                      "jump_position": None, "rule_count": 0, "redirect_last": False,
                      "installed": False, "rules": []}
    assert "interception not installed" in cli(netns, "show").stdout

    cli(netns, *INSTALL)
    text = cli(netns, "show").stdout
    assert text.splitlines()[0] == "-N NODEMESH_OUTPUT"
    assert f"interception installed: {len(rules(PLAN))} rules, jump at OUTPUT position 1" in text

    # A jump deleted by hand (or by another tool) shows up as partial, not installed.
    jump = next(ln for ln in nat_lines(netns) if ln.startswith("-A OUTPUT "))
    _run("ip", "netns", "exec", netns, "iptables", "-t", "nat", "-D", *shlex.split(jump)[1:])
    partial = json.loads(cli(netns, "show", "-o", "json").stdout)
    assert (partial["installed"], partial["chain_present"], partial["jump_present"]) == (
        False, True, False)
    assert "interception partial" in cli(netns, "show").stdout


def test_without_cap_net_admin_the_error_names_the_fix(netns: str) -> None:
    proc = _run("ip", "netns", "exec", netns, "setpriv", "--reuid=65534", "--regid=65534",
                "--clear-groups", *CLI, *INSTALL, check=False)
    assert proc.returncode == 1
    assert "iptables-restore needs CAP_NET_ADMIN; run the agent as root or grant the capability" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [ln for ln in nat_lines(netns) if "NODEMESH" in ln]


def test_bad_cidr_is_refused_before_touching_iptables(netns: str) -> None:
    proc = cli(netns, "install", "--proxy-uid", "998", "--exclude-cidr", "10.0.0/33", check=False)
    assert proc.returncode == 1
    assert "exclude CIDR '10.0.0/33' is not a network" in proc.stderr
    assert not [ln for ln in nat_lines(netns) if "NODEMESH" in ln]


def test_an_unprivileged_user_with_cap_net_admin_can_install(netns: str) -> None:
    # How the agent runs under systemd: its own uid, AmbientCapabilities=CAP_NET_ADMIN.
    nobody_with_cap = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                       "--inh-caps=+net_admin", "--ambient-caps=+net_admin"]
    _run("ip", "netns", "exec", netns, *nobody_with_cap, *CLI, "install", "--proxy-uid", "65534")
    status = json.loads(cli(netns, "show", "-o", "json").stdout)
    assert status["installed"] is True
    assert status["rule_count"] == len(rules(InterceptionPlan(proxy_uid=65534)))
    assert _run("ip", "netns", "exec", netns, *nobody_with_cap, *CLI, "remove").stdout
    assert not [ln for ln in nat_lines(netns) if "NODEMESH" in ln]


def test_install_from_the_agent_config(netns: str, tmp_path: Path) -> None:
    """What nodemesh-iptables.service runs: every value from agent.toml, the uid from --user."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        '[listen]\noutbound = "127.0.0.1:15001"\n'
        "[interception]\nexclude_ports = [22]\nconsul_ports = [8500]\n"
        'exclude_cidrs = ["10.9.0.0/16"]\n'
    )
    cli(netns, "install", "--config", str(cfg), "--user", "root")
    want = InterceptionPlan(proxy_uid=0, outbound_port=15001, consul_ports=(8500,),
                            exclude_ports=(22,), exclude_cidrs=("10.9.0.0/16",))
    assert comments(nat_lines(netns), "-A NODEMESH_OUTPUT ") == expected_comments(want)

    cfg.write_text('[agent]\nproxy_uid = 4242\n')  # the config's uid wins over --user
    cli(netns, "install", "--config", str(cfg), "--user", "root")
    assert "--uid-owner 4242" in "\n".join(nat_lines(netns))

    bad = cli(netns, "install", "--config", str(cfg), "--user", "no-such-user-x", check=False)
    assert bad.returncode == 0  # proxy_uid set: the user is not needed
    cfg.write_text("")
    bad = cli(netns, "install", "--config", str(cfg), "--user", "no-such-user-x", check=False)
    assert bad.returncode == 64
    assert "user 'no-such-user-x' does not exist" in bad.stderr
    cfg.write_text('[interception]\ninstall = "sometimes"\n')
    bad = cli(netns, "install", "--config", str(cfg), check=False)
    assert bad.returncode == 64 and "interception.install" in bad.stderr
    assert "--uid-owner 4242" in "\n".join(nat_lines(netns))  # a bad config changes nothing
    cli(netns, "remove")
