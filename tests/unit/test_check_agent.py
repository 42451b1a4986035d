"""``nodemesh check`` on an agent host, judged from facts: every check, healthy and broken.

``healthy()`` is a host as the check would gather it: h1 runs the agent as uid 999 (pid 812)
and one service, shop; Consul, the controller, the clocks, the rules and the certificates are
as they should be.  Each case breaks one fact and names the result that must say so.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nodemesh.agent.iptables import (
    CHAIN,
    JUMP_RULE,
    InterceptionPlan,
    parse_status,
    restore_script,
)
from nodemesh.check.checks import config_failed, evaluate_agent
from nodemesh.check.facts import (
    AgentFacts,
    CertFacts,
    ControllerFacts,
    IptablesFacts,
    Owner,
    Reply,
    RootsFacts,
    Socket,
)
from nodemesh.check.results import Result, one_line, span
from nodemesh.config import agent_config_from_mapping

NOW = 1_800_000_005.0  # five seconds into a controller slot
DAY = 86400.0
PATH = Path("/etc/nodemesh/agent.toml")
CFG = agent_config_from_mapping(
    {
        "agent": {"node": "h1", "proxy_uid": 999, "state_dir": "/var/lib/nodemesh"},
        "listen": {"admin": "198.18.0.4:4191"},
    },
    str(PATH),
)
AGENT = Owner(812, "nodemesh", 999)
TD = "spiffe://nodemesh.local/dc/dc1"


def reply(doc: Any, status: int = 200, at: float = NOW, date: float | None = None) -> Reply:
    """A Consul answer: JSON with a Date header read at ``date`` (default: when it arrived)."""
    header = email.utils.formatdate(at if date is None else date, usegmt=True)
    return Reply(status, json.dumps(doc).encode(), header, at)


def catalog_node(*services: tuple[str, str, int]) -> Reply:
    return reply(
        {
            "Node": {"Node": "h1", "Address": "198.18.0.4"},
            "Services": {
                sid: {"ID": sid, "Service": name, "Port": port} for sid, name, port in services
            },
        }
    )


NODE_SERVICES = (("nodemesh-h1", "nodemesh", 4143), ("shop-h1-8090", "shop", 8090))


def check(
    check_id: str, status: str = "passing", service_id: str = "", output: str = ""
) -> dict[str, str]:
    return {
        "CheckID": check_id,
        "Name": "shop HTTP" if service_id.startswith("shop") else check_id,
        "Status": status,
        "Output": output,
        "ServiceID": service_id,
    }


HEALTHY_CHECKS = [
    check("serfHealth", output="Agent alive and reachable"),
    check("service:nodemesh-h1", service_id="nodemesh-h1", output="HTTP GET /ready: 200"),
    check("service:shop-h1-8090", service_id="shop-h1-8090", output="HTTP GET /health: 200"),
]


def nat_lines(plan: InterceptionPlan, jumps: int = 1, extra_output: int = 0) -> list[str]:
    """``iptables -t nat -S`` as it reads with the agent's rules installed."""
    jump = "-A OUTPUT " + " ".join(f'"{a}"' if " " in a else a for a in JUMP_RULE)
    lines = ["-P PREROUTING ACCEPT", "-P OUTPUT ACCEPT", f"-N {CHAIN}"]
    lines += ["-A OUTPUT -p udp -j RETURN"] * extra_output
    lines += [jump] * jumps
    lines += [ln for ln in restore_script(plan).splitlines() if ln.startswith("-A ")]
    return lines


def iptables_facts(lines: list[str]) -> IptablesFacts:
    text = "\n".join(lines) + "\n"
    return IptablesFacts(
        status=parse_status(text),
        lines=tuple(ln for ln in lines if "NODEMESH" in ln),
    )


def cert(what: str, uri: str, **changes: Any) -> CertFacts:
    kind, name = what.split()
    base = CertFacts(
        what,
        uri,
        Path(f"/var/lib/nodemesh/identity/{'node' if kind == 'node' else 'svc'}-{name}.pem"),
        identity=uri,
        not_before=NOW - 3600,
        not_after=NOW + 20 * 3600,
    )
    return replace(base, **changes)


SOCKETS = (
    Socket("127.0.0.1", 4140, 999, 11),
    Socket("0.0.0.0", 4143, 999, 12),
    Socket("198.18.0.4", 4191, 999, 13),
    Socket("127.0.0.1", 8500, 100, 14),
)


def healthy() -> AgentFacts:
    return AgentFacts(
        cfg=CFG,
        config_path=PATH,
        now=NOW,
        consul_leader=reply("198.18.0.2:8300"),
        consul_node=catalog_node(*NODE_SERVICES),
        consul_checks=reply(HEALTHY_CHECKS),
        controller=ControllerFacts("198.18.0.3:4190", window_end=NOW - 5, at=NOW),
        roots=RootsFacts(CFG.ca_file, count=1, not_after=NOW + 3650 * DAY),
        certs=(
            cert("node h1", f"{TD}/node/h1"),
            cert("service shop", f"{TD}/svc/shop"),
        ),
        iptables=iptables_facts(nat_lines(InterceptionPlan(999))),
        sockets=SOCKETS,
        owners={11: (AGENT,), 12: (AGENT,), 13: (AGENT,)},
        live=Reply(200, b"live\n", at=NOW),
        ready=Reply(200, b"ready\n", at=NOW),
    )


def with_checks(*checks: dict[str, str]) -> Reply:
    return reply(list(checks))


def without_socket(f: AgentFacts, port: int) -> tuple[Socket, ...]:
    assert f.sockets is not None
    return tuple(s for s in f.sockets if s.port != port)


def rules_without(plan: InterceptionPlan, drop: str, jumps: int = 1) -> list[str]:
    return [ln for ln in nat_lines(plan, jumps) if drop not in ln]


def results(f: AgentFacts) -> list[Result]:
    return evaluate_agent(f)


def one(got: list[Result], name: str) -> Result:
    found = [r for r in got if r.name == name]
    assert len(found) == 1, f"{name}: {[r.name for r in got]}"
    return found[0]


# --- healthy --------------------------------------------------------------------------------------


def test_healthy_host_passes_every_check_in_section_order() -> None:
    got = results(healthy())
    assert [(r.section, r.name) for r in got] == [
        ("config", "config"),
        ("consul", "consul-reachable"),
        ("consul", "consul-leader"),
        ("consul", "consul-node"),
        ("clock", "clock-consul"),
        ("clock", "clock-controller"),
        ("agent", "listener-outbound"),
        ("agent", "listener-inbound"),
        ("agent", "listener-admin"),
        ("agent", "agent-live"),
        ("agent", "agent-ready"),
        ("agent", "agent-registered"),
        ("agent", "agent-check"),
        ("interception", "chain-present"),
        ("interception", "jump-once"),
        ("interception", "no-redirect-loop"),
        ("interception", "redirect-last"),
        ("identity", "ca-file"),
        ("identity", "cert-node-h1"),
        ("identity", "cert-service-shop"),
        ("services", "local-services"),
        ("services", "service-check-shop-h1-8090"),
        ("controller", "controller-reachable"),
    ]
    assert all(r.ok and r.hint == "" for r in got), [r for r in got if not r.ok]
    assert one(got, "listener-outbound").message == (
        "outbound listener is up on 127.0.0.1:4140 (nodemesh pid 812, uid 999)"
    )
    assert one(got, "no-redirect-loop").message == (
        "the agent's uid 999 is excluded before the REDIRECT: no redirect loop"
    )
    assert one(got, "local-services").message == (
        "services registered on node h1: shop (shop-h1-8090)"
    )


# --- every failure, induced one fact at a time ----------------------------------------------------

PLAN = InterceptionPlan(999)
BROKEN = [
    # consul
    pytest.param(
        lambda f: replace(f, consul_leader=Reply(error="connection refused")),
        "consul-reachable",
        "error",
        "consul is not reachable at 127.0.0.1:8500: connection refused",
        "start the local Consul agent",
        id="consul-down",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=reply("ACL not found", status=403)),
        "consul-reachable",
        "error",
        "refused to answer (403",
        "set consul.token",
        id="consul-acl",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=reply("boom", status=500)),
        "consul-reachable",
        "error",
        "answered 500",
        "Consul agent's log",
        id="consul-500",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=reply("")),
        "consul-leader",
        "error",
        "consul has no leader",
        "lost quorum",
        id="no-leader",
    ),
    pytest.param(
        lambda f: replace(f, consul_node=reply(None)),
        "consul-node",
        "error",
        "consul does not know node h1",
        "set agent.node in",
        id="no-node",
    ),
    pytest.param(
        lambda f: replace(f, consul_node=reply("No cluster leader", status=500)),
        "consul-node",
        "error",
        "cannot read node h1 from Consul's catalog",
        "Consul agent's log",
        id="node-unreadable",
    ),
    pytest.param(
        lambda f: replace(f, consul_node=reply(["not", "a", "node"])),
        "consul-node",
        "error",
        "not a node",
        "Consul agent's log",
        id="node-garbled",
    ),
    pytest.param(
        lambda f: replace(
            f,
            consul_checks=with_checks(
                check("serfHealth", "critical", output="Agent not live or unreachable"),
                *HEALTHY_CHECKS[1:],
            ),
        ),
        "consul-node-health",
        "error",
        "consul marks node h1 critical: Agent not live",
        "gossip port",
        id="serf-critical",
    ),
    # clock
    pytest.param(
        lambda f: replace(f, consul_leader=reply("198.18.0.2:8300", date=NOW - 95)),
        "clock-consul",
        "error",
        "clock is 1m 34s ahead of Consul's",
        "synchronise",
        id="clock-ahead-of-consul",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=reply("198.18.0.2:8300", date=NOW + 40)),
        "clock-consul",
        "error",
        "clock is 40s behind Consul's",
        "chrony",
        id="clock-behind-consul",
    ),
    pytest.param(
        lambda f: replace(f, consul_leader=Reply(200, b'"198.18.0.2:8300"', None, NOW)),
        "clock-consul",
        "warning",
        "no Date header",
        "timedatectl",
        id="no-date-header",
    ),
    pytest.param(
        lambda f: replace(f, controller=replace(f.controller, window_end=NOW - 60)),
        "clock-controller",
        "error",
        "at least 50s ahead of the controller's",
        "synchronise",
        id="clock-ahead-of-controller",
    ),
    pytest.param(
        lambda f: replace(f, controller=replace(f.controller, window_end=NOW + 45)),
        "clock-controller",
        "error",
        "at least 45s behind the controller's",
        "synchronise",
        id="clock-behind-controller",
    ),
    # agent: listeners, admin, registration
    pytest.param(
        lambda f: replace(f, sockets=without_socket(f, 4140)),
        "listener-outbound",
        "error",
        "outbound listener is down: nothing listens on 127.0.0.1:4140",
        "`nodemesh iptables remove`",
        id="outbound-down-rules-stay",
    ),
    pytest.param(
        lambda f: replace(f, sockets=without_socket(f, 4143)),
        "listener-inbound",
        "error",
        "inbound listener is down: nothing listens on 0.0.0.0:4143",
        "systemctl start nodemesh",
        id="inbound-down",
    ),
    pytest.param(
        lambda f: replace(
            f,
            sockets=(*without_socket(f, 4140), Socket("0.0.0.0", 4140, 33, 99)),
            owners={**f.owners, 99: (Owner(77, "nginx", 33),)},
        ),
        "listener-outbound",
        "error",
        "port 4140 is held on 0.0.0.0 by nginx pid 77, uid 33",
        "set listen.outbound in /etc/nodemesh/agent.toml",
        id="outbound-port-taken",
    ),
    pytest.param(
        lambda f: replace(f, owners={**f.owners, 12: (Owner(1, "systemd", 0),)}),
        "listener-inbound",
        "error",
        "held by systemd pid 1, uid 0 only: no agent process",
        "systemctl start nodemesh",
        id="socket-activated-agent-not-running",
    ),
    pytest.param(
        lambda f: replace(f, sockets=None),
        "listener-admin",
        "error",
        "cannot list this host's TCP listeners",
        "/proc mounted",
        id="no-proc",
    ),
    pytest.param(
        lambda f: replace(f, live=Reply(error="no answer within 3s")),
        "agent-live",
        "error",
        "agent does not answer /live on 198.18.0.4:4191: no answer",
        "systemctl restart nodemesh",
        id="live-wedged",
    ),
    pytest.param(
        lambda f: replace(f, ready=Reply(503, b"not ready\n", at=NOW)),
        "agent-ready",
        "error",
        "agent is not ready: /ready answers 503: not ready",
        "Consul snapshot, its node certificate",
        id="not-ready",
    ),
    pytest.param(
        lambda f: replace(f, consul_node=catalog_node(NODE_SERVICES[1])),
        "agent-registered",
        "error",
        "the agent is not registered in Consul on node h1",
        "registers itself once it is ready",
        id="not-registered",
    ),
    pytest.param(
        lambda f: replace(
            f,
            consul_checks=with_checks(
                HEALTHY_CHECKS[0],
                check("service:nodemesh-h1", "critical", "nodemesh-h1", "HTTP GET /ready: 503"),
                HEALTHY_CHECKS[2],
            ),
        ),
        "agent-check",
        "error",
        "Consul's check of the agent is critical: HTTP GET /ready: 503",
        "Consul probes the agent's /ready on 198.18.0.4:4191",
        id="agent-check-critical",
    ),
    pytest.param(
        lambda f: replace(f, consul_checks=with_checks(HEALTHY_CHECKS[0], HEALTHY_CHECKS[2])),
        "agent-check",
        "warning",
        "no health check for nodemesh-h1",
        "restart the agent",
        id="agent-without-check",
    ),
    # interception
    pytest.param(
        lambda f: replace(
            f,
            iptables=IptablesFacts(
                error="iptables needs CAP_NET_ADMIN; run the agent as root or grant the capability"
            ),
        ),
        "iptables-readable",
        "error",
        "cannot read the nat table",
        "run nodemesh check as root",
        id="iptables-not-root",
    ),
    pytest.param(
        lambda f: replace(f, iptables=IptablesFacts(error="iptables not found; install it")),
        "iptables-readable",
        "error",
        "iptables not found",
        "apt-get install iptables",
        id="iptables-missing",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(["-P OUTPUT ACCEPT"])),
        "chain-present",
        "error",
        "chain NODEMESH_OUTPUT is missing from the nat table",
        "restart the agent (systemctl restart nodemesh)",
        id="chain-missing",
    ),
    pytest.param(
        lambda f: replace(
            f,
            iptables=iptables_facts(
                [ln for ln in nat_lines(PLAN) if not ln.startswith("-A NODEMESH_OUTPUT")]
            ),
        ),
        "chain-present",
        "error",
        "chain NODEMESH_OUTPUT is empty",
        "restart the agent",
        id="chain-flushed",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(nat_lines(PLAN, jumps=0))),
        "jump-once",
        "error",
        "OUTPUT does not jump to NODEMESH_OUTPUT",
        "restart the agent",
        id="no-jump",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(nat_lines(PLAN, jumps=2))),
        "jump-once",
        "error",
        "OUTPUT jumps to NODEMESH_OUTPUT 2 times",
        "exactly one",
        id="jump-twice",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(nat_lines(PLAN, extra_output=1))),
        "jump-once",
        "warning",
        "at position 2",
        "first in OUTPUT",
        id="jump-not-first",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(rules_without(PLAN, "--uid-owner"))),
        "no-redirect-loop",
        "error",
        "no rule excludes the agent's uid 999 before the REDIRECT",
        "reinstalls the chain",
        id="uid-rule-removed",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(nat_lines(InterceptionPlan(4242)))),
        "no-redirect-loop",
        "error",
        "the rules exclude uid 4242 but the agent runs as uid 999",
        "set agent.proxy_uid = 999",
        id="uid-mismatch",
    ),
    pytest.param(
        lambda f: replace(
            f,
            iptables=iptables_facts(
                [ln for ln in nat_lines(PLAN) if "--uid-owner" not in ln]
                + [ln for ln in nat_lines(PLAN) if "--uid-owner" in ln]
            ),
        ),
        "no-redirect-loop",
        "error",
        "no rule excludes the agent's uid 999",
        "reinstalls the chain",
        id="uid-rule-after-redirect",
    ),
    pytest.param(
        lambda f: replace(f, iptables=iptables_facts(rules_without(PLAN, "REDIRECT"))),
        "redirect-last",
        "error",
        "has no REDIRECT rule",
        "reinstalls the chain",
        id="no-redirect",
    ),
    pytest.param(
        lambda f: replace(
            f,
            iptables=iptables_facts(
                [*nat_lines(PLAN), "-A NODEMESH_OUTPUT -d 10.0.0.0/8 -j RETURN"]
            ),
        ),
        "redirect-last",
        "error",
        "the REDIRECT is rule 11 of 12, not the last",
        "reinstalls the chain",
        id="redirect-not-last",
    ),
    pytest.param(
        lambda f: replace(
            f, iptables=iptables_facts(nat_lines(InterceptionPlan(999, outbound_port=15001)))
        ),
        "redirect-last",
        "error",
        "sends to port 15001 but listen.outbound is port 4140",
        "reinstalls the chain",
        id="redirect-wrong-port",
    ),
    # identity
    pytest.param(
        lambda f: replace(f, roots=RootsFacts(CFG.ca_file, error="no such file or directory")),
        "ca-file",
        "error",
        "cannot use the mesh CA /etc/nodemesh/ca.pem",
        "copy the controller's",
        id="ca-file-missing",
    ),
    pytest.param(
        lambda f: replace(f, roots=replace(f.roots, not_after=NOW - 1)),
        "ca-file",
        "error",
        "expired at",
        "rotate the mesh CA",
        id="ca-expired",
    ),
    pytest.param(
        lambda f: replace(f, roots=replace(f.roots, not_after=NOW + 10 * DAY)),
        "ca-file",
        "warning",
        "expires in 10d 0h",
        "rotate the mesh CA",
        id="ca-expiring",
    ),
    pytest.param(
        lambda f: replace(
            f, certs=(replace(f.certs[0], error="no file /x/node-h1.pem"), f.certs[1])
        ),
        "cert-node-h1",
        "error",
        "certificate for node h1: no file",
        "join token valid",
        id="node-cert-missing",
    ),
    pytest.param(
        lambda f: replace(
            f, certs=(f.certs[0], replace(f.certs[1], error="no file /x/svc-shop.pem"))
        ),
        "cert-service-shop",
        "error",
        "certificate for service shop: no file",
        "once Consul lists the service",
        id="service-cert-missing",
    ),
    pytest.param(
        lambda f: replace(f, certs=(f.certs[0], replace(f.certs[1], identity=f"{TD}/svc/web"))),
        "cert-service-shop",
        "error",
        "names spiffe://nodemesh.local/dc/dc1/svc/web, not",
        "delete the file",
        id="cert-names-other",
    ),
    pytest.param(
        lambda f: replace(f, certs=(replace(f.certs[0], key_matches=False), f.certs[1])),
        "cert-node-h1",
        "error",
        "does not belong to its certificate",
        "delete the file",
        id="key-mismatch",
    ),
    pytest.param(
        lambda f: replace(
            f, certs=(replace(f.certs[0], chain_error="signed by another CA"), f.certs[1])
        ),
        "cert-node-h1",
        "error",
        "does not chain to the mesh CA /etc/nodemesh/ca.pem",
        "install the controller's current ca.pem",
        id="chain-broken",
    ),
    pytest.param(
        lambda f: replace(f, certs=(f.certs[0], replace(f.certs[1], not_after=NOW - 7200))),
        "cert-service-shop",
        "error",
        "expired 2h 0m ago",
        "renews at 70 %",
        id="cert-expired",
    ),
    pytest.param(
        lambda f: replace(f, certs=(replace(f.certs[0], not_before=NOW + 300), f.certs[1])),
        "cert-node-h1",
        "error",
        "not valid before",
        "synchronise",
        id="cert-not-yet-valid",
    ),
    pytest.param(
        lambda f: replace(
            f,
            certs=(
                f.certs[0],
                replace(f.certs[1], not_before=NOW - 20 * 3600, not_after=NOW + 3600),
            ),
        ),
        "cert-service-shop",
        "warning",
        "expires in 1h 0m, past 80 % of its 21h 0m lifetime",
        "identity_request_failed",
        id="cert-renewal-overdue",
    ),
    # services
    pytest.param(
        lambda f: replace(
            f,
            consul_checks=with_checks(
                *HEALTHY_CHECKS[:2],
                check(
                    "service:shop-h1-8090",
                    "critical",
                    "shop-h1-8090",
                    'Get "http://198.18.0.4:8090/health": context deadline exceeded',
                ),
            ),
        ),
        "service-check-shop-h1-8090",
        "error",
        "shop instance shop-h1-8090: check 'shop HTTP' is critical: Get",
        "fix shop on this host or deregister it",
        id="service-check-critical",
    ),
    pytest.param(
        lambda f: replace(f, consul_checks=reply("rpc error", status=500)),
        "agent-check",
        "error",
        "cannot read the agent's Consul check",
        "Consul agent's log",
        id="checks-unreadable",
    ),
    # controller: warnings, the data path works without it
    pytest.param(
        lambda f: replace(
            f,
            controller=ControllerFacts(
                error="Consul has no passing nodemesh-controller", kind="no-controller"
            ),
        ),
        "controller-reachable",
        "warning",
        "no controller to ask",
        "start nodemesh-controller",
        id="no-controller",
    ),
    pytest.param(
        lambda f: replace(
            f,
            controller=ControllerFacts(
                error="cannot read a client certificate", kind="credentials"
            ),
        ),
        "controller-reachable",
        "warning",
        "cannot present a client certificate",
        "fix this host's node certificate",
        id="controller-no-credentials",
    ),
    pytest.param(
        lambda f: replace(
            f,
            controller=ControllerFacts(
                "198.18.0.3:4190",
                "controller at 198.18.0.3:4190 unreachable: connection refused",
                kind="unreachable",
            ),
        ),
        "controller-reachable",
        "warning",
        "controller at 198.18.0.3:4190 is not reachable",
        "the mesh keeps serving",
        id="controller-down",
    ),
]


@pytest.mark.parametrize(("brk", "name", "level", "message", "hint"), BROKEN)
def test_each_broken_fact_fails_its_check_with_a_hint(
    brk: Any, name: str, level: str, message: str, hint: str
) -> None:
    got = results(brk(healthy()))
    r = one(got, name)
    assert r.level == level, r
    assert message in r.message, r.message
    assert hint in r.hint, r.hint
    assert "\n" not in r.hint and not r.hint.endswith(".")  # one line, one sentence


def test_consul_down_leaves_out_what_depends_on_it() -> None:
    got = results(replace(healthy(), consul_leader=Reply(error="connection refused")))
    names = [r.name for r in got]
    for dependent in (
        "consul-leader",
        "consul-node",
        "clock-consul",
        "agent-registered",
        "local-services",
    ):
        assert dependent not in names
    assert [r.name for r in got if not r.ok] == ["consul-reachable"]


def test_agent_stopped_shows_listeners_registration_and_rules() -> None:
    f = healthy()
    stopped = replace(
        f,
        sockets=tuple(s for s in SOCKETS if s.port == 8500),
        owners={},
        live=Reply(error="connection refused"),
        ready=Reply(error="connection refused"),
        consul_node=catalog_node(NODE_SERVICES[1]),
        iptables=iptables_facts(["-P OUTPUT ACCEPT"]),  # a clean stop removed them
    )
    got = results(stopped)
    assert [r.name for r in got if not r.ok] == [
        "listener-outbound",
        "listener-inbound",
        "listener-admin",
        "agent-registered",
        "chain-present",
    ]
    # Rules gone too: the outbound hint does not talk about removing them.
    assert "iptables remove" not in one(got, "listener-outbound").hint
    assert (
        "start the agent (systemctl start nodemesh): it installs" in one(got, "chain-present").hint
    )


def test_redirect_loop_judged_from_config_when_the_agent_is_not_running() -> None:
    f = healthy()
    down = replace(f, sockets=without_socket(f, 4140))
    assert one(results(down), "no-redirect-loop").message == (
        "agent.proxy_uid 999 is excluded before the REDIRECT: no redirect loop"
    )
    stale = replace(down, iptables=iptables_facts(nat_lines(InterceptionPlan(4242))))
    r = one(results(stale), "no-redirect-loop")
    assert r.level == "error" and "agent.proxy_uid is 999" in r.message
    assert r.hint.startswith("start the agent (systemctl start nodemesh): it installs the rules")
    no_uid = replace(stale, cfg=replace(CFG, proxy_uid=None))
    r = one(results(no_uid), "no-redirect-loop")
    assert r.ok and "uid 4242 is excluded" in r.message and "not running" in r.message


def test_socket_activation_takes_the_uid_from_the_agent_process() -> None:
    """systemd (pid 1, root) and the agent both hold the listeners; the socket says uid 0."""
    f = healthy()
    systemd = Owner(1, "systemd", 0)
    sockets = tuple(replace(s, uid=0) if s.port != 8500 else s for s in SOCKETS)
    owners = {i: (systemd, AGENT) for i in (11, 12, 13)}
    got = results(replace(f, sockets=sockets, owners=owners))
    assert all(r.ok for r in got), [r for r in got if not r.ok]
    assert (
        "systemd pid 1, uid 0 and nodemesh pid 812, uid 999"
        in one(got, "listener-outbound").message
    )


def test_interception_disabled_is_not_checked() -> None:
    f = healthy()
    got = results(
        replace(
            f,
            cfg=replace(CFG, interception=False),
            iptables=IptablesFacts(error="iptables not found"),
        )
    )
    r = one(got, "interception")
    assert r.ok and "interception.enabled = false" in r.message
    assert not [x for x in got if x.section == "interception" and x.name != "interception"]


def test_no_local_services_is_fine() -> None:
    got = results(
        replace(healthy(), consul_node=catalog_node(NODE_SERVICES[0]), certs=healthy().certs[:1])
    )
    assert one(got, "local-services").message == (
        "no services are registered on node h1 (nothing to serve inbound)"
    )
    assert all(r.ok for r in got)


def test_two_services_at_one_address_fail_naming_both() -> None:
    node = catalog_node(*NODE_SERVICES, ("aaa-h1-8090", "aaa", 8090))
    got = results(replace(healthy(), consul_node=node))
    r = one(got, "service-address-198.18.0.4:8090")
    assert r.level == "error"
    assert r.message == (
        "198.18.0.4:8090 is registered by 2 services: aaa (aaa-h1-8090), shop (shop-h1-8090); "
        "the mesh refuses calls to it until only one claims it"
    )
    assert "consul services deregister -id" in r.hint


def test_service_without_checks_is_fine() -> None:
    got = results(replace(healthy(), consul_checks=with_checks(*HEALTHY_CHECKS[:2])))
    r = one(got, "service-check-shop-h1-8090")
    assert r.ok and r.message == "shop instance shop-h1-8090: no health checks"


def test_config_failure_names_the_file() -> None:
    r = config_failed(PATH, f"{PATH}: unknown key listen.outbund (known keys are in docs)")
    assert (r.section, r.name, r.level) == ("config", "config", "error")
    assert r.hint.startswith(f"fix what is named above in {PATH}")
    missing = config_failed(PATH, f"{PATH}: no such file", missing=True)
    assert "pass --config" in missing.hint


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (61, "1m 1s"),
        (3600, "1h 0m"),
        (86400 + 7200, "1d 2h"),
        (-95, "1m 35s"),
    ],
)
def test_span(seconds: float, text: str) -> None:
    assert span(seconds) == text


def test_one_line_flattens_and_bounds_consul_output() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 300, 20) == "x" * 17 + "..."


def test_external_installs_are_fixed_by_their_own_unit() -> None:
    external = replace(CFG, interception_install="external")
    f = replace(healthy(), cfg=external)
    flushed = replace(f, iptables=iptables_facts(nat_lines(PLAN, jumps=2)))
    r = one(results(flushed), "jump-once")
    assert r.hint.startswith("run systemctl restart nodemesh-iptables")
    assert 'interception.install = "external"' in r.hint
    stale = replace(f, iptables=iptables_facts(nat_lines(InterceptionPlan(4242))))
    r = one(results(stale), "no-redirect-loop")
    assert r.hint.endswith("and systemctl restart nodemesh-iptables")
