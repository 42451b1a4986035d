"""What the running processes answer: the agent's listeners and admin endpoint, the clocks of
Consul and the controller, and the controller itself.  Pure.
"""

from __future__ import annotations

from pathlib import Path

from nodemesh.check.facts import (
    AgentFacts,
    ControllerFacts,
    IptablesFacts,
    Reply,
    admin_target,
    agent_process,
    listener_at,
    parse_http_date,
    port_holders,
)
from nodemesh.check.results import (
    AGENT,
    CLOCK,
    CLOCK_HINT,
    CONTROLLER,
    START_AGENT,
    Result,
    addr,
    fail,
    holder,
    ok,
    one_line,
    span,
    warn,
)
from nodemesh.controller.metrics import SLOT_S

MAX_CLOCK_SKEW = 30.0  # seconds; certificates are back-dated 60 s, metric slots are 10 s


def clock_vs_consul(leader: Reply) -> list[Result]:
    if not leader.answered:
        return []  # the consul section says why
    date = parse_http_date(leader.date)
    if date is None:
        return [
            warn(
                CLOCK,
                "clock-consul",
                "consul's answer carried no Date header: cannot compare clocks",
                "check the clocks by hand (timedatectl) on this host and a Consul server",
            )
        ]
    # Date has whole seconds: Consul's clock read somewhere in [date, date + 1).
    skew = leader.at - (date + 0.5)
    if abs(skew) > MAX_CLOCK_SKEW:
        side = "ahead of" if skew > 0 else "behind"
        return [
            fail(
                CLOCK,
                "clock-consul",
                f"this host's clock is {span(skew)} {side} Consul's",
                CLOCK_HINT,
            )
        ]
    return [ok(CLOCK, "clock-consul", f"clock agrees with Consul's (skew {abs(skew):.0f}s)")]


def clock_vs_controller(ctl: ControllerFacts) -> list[Result]:
    if ctl.window_end is None:
        return []  # not reached: the controller section warns
    # The controller's newest closed slot ends at the last multiple of SLOT_S before its now,
    # so its clock read somewhere in [end, end + SLOT_S) when it answered.
    ahead = ctl.at - (ctl.window_end + SLOT_S)
    behind = ctl.window_end - ctl.at
    if ahead > MAX_CLOCK_SKEW or behind > MAX_CLOCK_SKEW:
        side, by = ("ahead of", ahead) if ahead > 0 else ("behind", behind)
        return [
            fail(
                CLOCK,
                "clock-controller",
                f"this host's clock is at least {span(by)} {side} the controller's",
                CLOCK_HINT,
            )
        ]
    return [
        ok(
            CLOCK,
            "clock-controller",
            f"clock agrees with the controller's (to its {SLOT_S}s resolution)",
        )
    ]


def _chain_installed(ipt: IptablesFacts) -> bool:
    return ipt.status is not None and ipt.status.jump_count > 0 and ipt.status.rule_count > 0


def listeners(f: AgentFacts) -> list[Result]:
    """The agent's three listeners: each bound, by the agent process (not only by systemd)."""
    cfg, path = f.cfg, f.config_path
    out = []
    for name, where in (
        ("outbound", cfg.outbound_addr),
        ("inbound", cfg.inbound_addr),
        ("admin", cfg.admin_addr),
    ):
        check = f"listener-{name}"
        if f.sockets is None:
            out.append(
                fail(
                    AGENT,
                    check,
                    f"cannot list this host's TCP listeners to find {name}",
                    "run nodemesh check on the agent's host, with /proc mounted",
                )
            )
            continue
        s = listener_at(f.sockets, where)
        if s is not None:
            procs = f.owners.get(s.inode, ())
            if procs and agent_process(procs) is None:
                out.append(
                    fail(
                        AGENT,
                        check,
                        f"{name} listener {addr(where)} is held by {holder(s, f.owners)} only: "
                        "no agent process accepts on it",
                        START_AGENT,
                    )
                )
            else:
                out.append(
                    ok(
                        AGENT,
                        check,
                        f"{name} listener is up on {addr(where)} ({holder(s, f.owners)})",
                    )
                )
            continue
        taken = port_holders(f.sockets, where)
        if taken:
            out.append(
                fail(
                    AGENT,
                    check,
                    f"{name} listener is down: port {where[1]} is held on {taken[0].ip} by "
                    f"{holder(taken[0], f.owners)}",
                    f"stop that program, or set listen.{name} in {path} to a free address",
                )
            )
            continue
        hint = START_AGENT
        if name == "outbound" and cfg.interception and _chain_installed(f.iptables):
            hint = (
                "start the agent (systemctl start nodemesh), or remove interception with "
                "`nodemesh iptables remove`: while the rules stay, every outbound TCP "
                "connection of this host is refused"
            )
        out.append(
            fail(AGENT, check, f"{name} listener is down: nothing listens on {addr(where)}", hint)
        )
    return out


def admin(f: AgentFacts, admin_up: bool) -> list[Result]:
    if not admin_up:
        return []  # the admin listener line already says the agent is down
    where = addr(admin_target(f.cfg))
    out = []
    if f.live.answered and f.live.status == 200:
        out.append(ok(AGENT, "agent-live", f"agent answers /live on {where}"))
    else:
        why = f.live.error or f"status {f.live.status}"
        out.append(
            fail(
                AGENT,
                "agent-live",
                f"agent does not answer /live on {where}: {why}",
                "the agent is wedged or another program holds its admin port: restart "
                "it (systemctl restart nodemesh)",
            )
        )
        return out
    if f.ready.answered and f.ready.status == 200:
        out.append(ok(AGENT, "agent-ready", "agent is ready (/ready answers 200)"))
    else:
        why = (
            f.ready.error
            or f"/ready answers {f.ready.status}: {one_line(f.ready.text) or 'no reason'}"
        )
        out.append(
            fail(
                AGENT,
                "agent-ready",
                f"agent is not ready: {why}",
                "the agent is ready once it has a Consul snapshot, its node certificate and "
                "its listeners: fix the other failures listed here, then read its log",
            )
        )
    return out


def controller(ctl: ControllerFacts, path: Path) -> list[Result]:
    name = "controller-reachable"
    if not ctl.error:
        return [ok(CONTROLLER, name, f"controller is reachable over mTLS at {ctl.address}")]
    keep = "the mesh keeps serving and renews certificates once it is back"
    if ctl.kind == "no-controller":
        return [
            warn(
                CONTROLLER,
                name,
                f"no controller to ask: {ctl.error}",
                "start nodemesh-controller (systemctl start nodemesh-controller) or set "
                f"controller.address in {path}; {keep}",
            )
        ]
    if ctl.kind == "credentials":
        return [
            warn(
                CONTROLLER,
                name,
                f"cannot present a client certificate: {ctl.error}",
                "fix this host's node certificate (see identity): the controller answers "
                "only certificates of its mesh",
            )
        ]
    where = f" at {ctl.address}" if ctl.address else ""
    return [
        warn(
            CONTROLLER,
            name,
            f"controller{where} is not reachable over mTLS: {ctl.error}",
            f"check that nodemesh-controller runs and this host reaches its port; {keep}",
        )
    ]
