"""``nodemesh check`` judged: gathered facts in, named results out.  Pure: no I/O, no clock.

Each check has a stable ``name`` (for ``-o json`` and scripts), a ``message`` that says what
was found, and, when it is not ok, a ``hint``: one sentence with the fix.  A failed check is an
``error`` (the run exits 1) or a ``warning`` (shown with ‼, fails only with ``--strict``): the
controller being away, or a certificate past the point where it should have been renewed,
leave the data path working.

Checks that depend on an earlier one are left out when it failed (no "node registered" line
under an unreachable Consul): the first failure in a section is the one to fix.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nodemesh.agent.iptables import CHAIN
from nodemesh.check.facts import (
    AgentFacts,
    CatalogNode,
    CertFacts,
    ControllerFacts,
    IptablesFacts,
    NodeCheck,
    Owner,
    PreFacts,
    Reply,
    RootsFacts,
    Socket,
    listener_at,
    parse_catalog_node,
    parse_http_date,
    parse_node_checks,
    port_holders,
)
from nodemesh.config import AgentConfig
from nodemesh.controller.metrics import SLOT_S
from nodemesh.discovery.snapshot import AGENT_SERVICE, UNMESHED_SERVICES

Level = Literal["ok", "warning", "error"]

MAX_CLOCK_SKEW = 30.0  # seconds; certificates are back-dated 60 s, metric slots are 10 s
NEAR_EXPIRY = 0.20  # of a certificate's lifetime left: renewal was due at 70 %, so it is late
ROOT_WARN_DAYS = 30  # a mesh CA that expires within this many days warns
MIN_PYTHON = (3, 11)
CAP_NET_ADMIN = 12  # bit in the capability masks (linux/capability.h)

CONFIG, CONSUL, CLOCK, AGENT = "config", "consul", "clock", "agent"
INTERCEPTION, IDENTITY, SERVICES, CONTROLLER = "interception", "identity", "services", "controller"
HOST, KERNEL, PORTS = "host", "kernel", "ports"

START_AGENT = (
    "start the agent (systemctl start nodemesh) and read its log (journalctl -u nodemesh) "
    "if it does not stay up"
)


@dataclass(frozen=True)
class Result:
    section: str
    name: str
    level: Level
    message: str
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.level == "ok"

    def as_json(self) -> dict[str, object]:
        return {
            "section": self.section,
            "name": self.name,
            "ok": self.ok,
            "level": self.level,
            "message": self.message,
            "hint": self.hint,
        }


def ok(section: str, name: str, message: str) -> Result:
    return Result(section, name, "ok", message)


def fail(section: str, name: str, message: str, hint: str) -> Result:
    return Result(section, name, "error", message, hint)


def warn(section: str, name: str, message: str, hint: str) -> Result:
    return Result(section, name, "warning", message, hint)


# --- formatting ----------------------------------------------------------------------------------


def when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float) -> str:
    """``"2d 3h"``, ``"5h 10m"``, ``"4m 2s"``, ``"12s"``: two units at most."""
    s = int(abs(seconds))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


def addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _holder(s: Socket, owners: dict[int, Owner] | None) -> str:
    o = (owners or {}).get(s.inode)
    who = f"{o.command} pid {o.pid}" if o else "a process this user cannot see"
    return f"{who}, uid {s.uid}"


# --- config --------------------------------------------------------------------------------------


def config_ok(path: Path) -> Result:
    return ok(CONFIG, "config", f"config {path} parses")


def config_failed(path: Path, error: str, *, missing: bool = False) -> Result:
    if missing:
        hint = f"pass --config with this host's agent config, or write {path} (docs/config.md)"
    else:
        hint = (
            f"fix what is named above in {path} (every key is in docs/config.md) and run "
            "nodemesh check again"
        )
    return fail(CONFIG, "config", error, hint)


# --- consul --------------------------------------------------------------------------------------


def consul_reach(cfg: AgentConfig, path: Path, leader: Reply) -> list[Result]:
    """Reachable, then a leader; stops at the first failure (the rest would only repeat it)."""
    where = addr(cfg.consul_addr)
    if not leader.answered:
        return [
            fail(
                CONSUL,
                "consul-reachable",
                f"consul is not reachable at {where}: {leader.error}",
                "start the local Consul agent (systemctl start consul), or set consul.address "
                f"in {path} to where it listens",
            )
        ]
    if leader.status in (401, 403):
        return [
            fail(
                CONSUL,
                "consul-reachable",
                f"consul at {where} refused to answer ({leader.status}: {one_line(leader.text)})",
                f"set consul.token in {path} to an ACL token that may read nodes and services",
            )
        ]
    if leader.status != 200:
        return [
            fail(
                CONSUL,
                "consul-reachable",
                f"consul at {where} answered {leader.status}: {one_line(leader.text)}",
                "read the Consul agent's log: it is up but does not serve its HTTP API",
            )
        ]
    out = [ok(CONSUL, "consul-reachable", f"consul is reachable at {where}")]
    try:
        name = leader.json()
    except ValueError:
        name = None
    if not isinstance(name, str) or not name:
        out.append(
            fail(
                CONSUL,
                "consul-leader",
                "consul has no leader",
                "the Consul servers have lost quorum: check `consul members` and the servers' "
                "logs (nodemesh keeps serving its last snapshot meanwhile)",
            )
        )
    else:
        out.append(ok(CONSUL, "consul-leader", f"consul has a leader ({name})"))
    return out


def _parsed_node(reply: Reply) -> CatalogNode | str | None:
    """The node, None when Consul does not know it, or a string saying why it cannot tell."""
    if not reply.answered:
        return reply.error
    if reply.status != 200:
        return f"Consul answered {reply.status}: {one_line(reply.text)}"
    try:
        return parse_catalog_node(reply)
    except ValueError as e:
        return f"Consul's answer is not a node: {e}"


def _parsed_checks(reply: Reply) -> list[NodeCheck] | str:
    if not reply.answered:
        return reply.error
    if reply.status != 200:
        return f"Consul answered {reply.status}: {one_line(reply.text)}"
    try:
        return parse_node_checks(reply)
    except ValueError as e:
        return f"Consul's answer is not a list of checks: {e}"


def consul_node(
    cfg: AgentConfig, path: Path, node: CatalogNode | str | None, checks: list[NodeCheck] | str
) -> list[Result]:
    if isinstance(node, str):
        return [
            fail(
                CONSUL,
                "consul-node",
                f"cannot read node {cfg.node} from Consul's catalog: {node}",
                "read the Consul agent's log; the catalog must answer for the mesh to work",
            )
        ]
    if node is None:
        return [
            fail(
                CONSUL,
                "consul-node",
                f"consul does not know node {cfg.node}",
                f"set agent.node in {path} to this host's Consul node name (`consul members` "
                "lists them), or join this host's Consul agent to the cluster",
            )
        ]
    out = [ok(CONSUL, "consul-node", f"node {cfg.node} is in Consul's catalog at {node.address}")]
    if isinstance(checks, list):
        for c in checks:
            if c.check_id == "serfHealth" and c.status != "passing":
                out.append(
                    fail(
                        CONSUL,
                        "consul-node-health",
                        f"consul marks node {cfg.node} {c.status}: {one_line(c.output)}",
                        "make sure this host's Consul agent runs and that the Consul gossip port "
                        "(8301, TCP and UDP) is open between hosts",
                    )
                )
    return out


# --- clock ---------------------------------------------------------------------------------------

CLOCK_HINT = (
    "synchronise this host's clock (chrony or systemd-timesyncd, on every host): certificates, "
    "their renewal and the metric windows all depend on it"
)


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


# --- agent: listeners, admin, registration -------------------------------------------------------


def _chain_installed(ipt: IptablesFacts) -> bool:
    return ipt.status is not None and ipt.status.jump_count > 0 and ipt.status.rule_count > 0


def listeners(f: AgentFacts) -> list[Result]:
    cfg, path = f.cfg, f.config_path
    owners = dict(f.owners)
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
            out.append(
                ok(AGENT, check, f"{name} listener is up on {addr(where)} ({_holder(s, owners)})")
            )
            continue
        holders = port_holders(f.sockets, where)
        if holders:
            out.append(
                fail(
                    AGENT,
                    check,
                    f"{name} listener is down: port {where[1]} is held on {holders[0].ip} by "
                    f"{_holder(holders[0], owners)}",
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


def _admin_target(cfg: AgentConfig) -> str:
    host, port = cfg.admin_addr
    return addr(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port))


def admin(f: AgentFacts, admin_up: bool) -> list[Result]:
    if not admin_up:
        return []  # the admin listener line already says the agent is down
    where = _admin_target(f.cfg)
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


def registration(
    cfg: AgentConfig, node: CatalogNode | str | None, checks: list[NodeCheck] | str
) -> list[Result]:
    if not isinstance(node, CatalogNode):
        return []  # the consul section says why
    sid = f"{AGENT_SERVICE}-{cfg.node}"
    if not any(i.id == sid and i.service == AGENT_SERVICE for i in node.instances):
        return [
            fail(
                AGENT,
                "agent-registered",
                f"the agent is not registered in Consul on node {cfg.node} (no service {sid})",
                "the agent registers itself once it is ready and deregisters when it stops: "
                f"{START_AGENT}",
            )
        ]
    out = [ok(AGENT, "agent-registered", f"agent is registered in Consul as {sid}")]
    if isinstance(checks, str):
        out.append(
            fail(
                AGENT,
                "agent-check",
                f"cannot read the agent's Consul check: {checks}",
                "read the Consul agent's log",
            )
        )
        return out
    mine = [c for c in checks if c.service_id == sid]
    bad = [c for c in mine if c.status != "passing"]
    if not mine:
        out.append(
            warn(
                AGENT,
                "agent-check",
                f"Consul has no health check for {sid}",
                "restart the agent: it registers itself with a check on its /ready",
            )
        )
    elif bad:
        c = bad[0]
        out.append(
            fail(
                AGENT,
                "agent-check",
                f"Consul's check of the agent is {c.status}: {one_line(c.output)}",
                f"Consul probes the agent's /ready on {_admin_target(cfg)}: the agent must be "
                "ready, and its admin listener reachable from the Consul agent",
            )
        )
    else:
        out.append(ok(AGENT, "agent-check", "Consul's check of the agent (/ready) is passing"))
    return out


# --- interception --------------------------------------------------------------------------------


def _chain_rules(lines: Iterable[str]) -> list[list[str]]:
    out = []
    for ln in lines:
        if ln.startswith(f"-A {CHAIN} "):
            try:
                out.append(shlex.split(ln))
            except ValueError:
                out.append(ln.split())
    return out


def _after(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def interception(f: AgentFacts) -> list[Result]:
    cfg, path, ipt = f.cfg, f.config_path, f.iptables
    if not cfg.interception:
        return [
            ok(
                INTERCEPTION,
                "interception",
                f"interception is disabled in {path} (interception.enabled = false)",
            )
        ]
    if ipt.error or ipt.status is None:
        err = ipt.error or "no answer"
        if "not found" in err:
            hint = "install iptables (apt-get install iptables)"
        elif "CAP_NET_ADMIN" in err:
            hint = "run nodemesh check as root: reading the nat table needs CAP_NET_ADMIN"
        else:
            hint = "run `iptables -t nat -S` by hand to see why it fails"
        return [fail(INTERCEPTION, "iptables-readable", f"cannot read the nat table: {err}", hint)]
    st = ipt.status
    outbound = None if f.sockets is None else listener_at(f.sockets, cfg.outbound_addr)
    reinstall = (
        "restart the agent: it installs the rules at start"
        if outbound is not None
        else "start the agent: it installs the rules at start (and removes them when it stops)"
    )
    if not st.chain_present:
        return [
            fail(
                INTERCEPTION,
                "chain-present",
                f"chain {CHAIN} is missing from the nat table: nothing is intercepted",
                reinstall,
            )
        ]
    if st.rule_count == 0:
        return [
            fail(
                INTERCEPTION,
                "chain-present",
                f"chain {CHAIN} is empty: nothing is intercepted",
                reinstall,
            )
        ]
    out = [ok(INTERCEPTION, "chain-present", f"chain {CHAIN} holds {st.rule_count} rules")]
    if st.jump_count == 0:
        out.append(
            fail(
                INTERCEPTION,
                "jump-once",
                f"OUTPUT does not jump to {CHAIN}: nothing is intercepted",
                reinstall,
            )
        )
    elif st.jump_count > 1:
        out.append(
            fail(
                INTERCEPTION,
                "jump-once",
                f"OUTPUT jumps to {CHAIN} {st.jump_count} times: every connection walks the "
                "chain more than once",
                "restart the agent: it replaces the jumps with exactly one (or delete the extra "
                "ones with `iptables -t nat -D OUTPUT <position>`)",
            )
        )
    elif st.jump_position != 1:
        out.append(
            warn(
                INTERCEPTION,
                "jump-once",
                f"OUTPUT jumps to {CHAIN} once, but at position {st.jump_position}: earlier nat "
                "rules can take connections away from the mesh",
                "restart the agent: it puts the jump first in OUTPUT",
            )
        )
    else:
        out.append(ok(INTERCEPTION, "jump-once", f"OUTPUT jumps to {CHAIN} once, first"))
    rules = _chain_rules(ipt.lines)
    redirect = next((i for i, r in enumerate(rules) if _after(r, "-j") == "REDIRECT"), None)
    out.append(_uid_rule(f, rules, redirect, outbound))
    out.append(_redirect_rule(cfg, path, rules, redirect))
    return out


def _uid_rule(
    f: AgentFacts, rules: list[list[str]], redirect: int | None, outbound: Socket | None
) -> Result:
    cfg, path = f.cfg, f.config_path
    end = len(rules) if redirect is None else redirect
    excluded = []
    for r in rules[:end]:
        uid = _after(r, "--uid-owner")
        if uid is not None and _after(r, "-j") == "RETURN" and "!" not in r:
            excluded.append(uid)
    # The uid the agent's sockets carry is what the owner match compares: take it from the
    # listener's socket when the agent runs, else from the config.
    if outbound is not None:
        uid, who, is_ = (
            str(outbound.uid),
            f"the agent's uid {outbound.uid}",
            "the agent runs as uid",
        )
    elif cfg.proxy_uid is not None:
        uid, who, is_ = str(cfg.proxy_uid), f"agent.proxy_uid {cfg.proxy_uid}", "agent.proxy_uid is"
    else:
        uid, who, is_ = None, "", ""
    name = "no-redirect-loop"
    loop = "the agent's own connections loop back into it"
    reinstall = "restart the agent: it installs the uid exclusion first in the chain"
    if uid is None:
        if excluded:
            return ok(
                INTERCEPTION,
                name,
                f"uid {', '.join(excluded)} is excluded before the "
                "REDIRECT (the agent is not running to compare)",
            )
        return fail(
            INTERCEPTION, name, f"no uid is excluded before the REDIRECT: {loop}", reinstall
        )
    if uid in excluded:
        return ok(INTERCEPTION, name, f"{who} is excluded before the REDIRECT: no redirect loop")
    if not excluded:
        return fail(
            INTERCEPTION, name, f"no rule excludes {who} before the REDIRECT: {loop}", reinstall
        )
    if outbound is None:
        hint = "start the agent: it reinstalls the rules for agent.proxy_uid"
    else:
        hint = (
            f"set agent.proxy_uid = {uid} in {path} (or leave it out: the agent then uses "
            "its own uid) and restart the agent"
        )
    return fail(
        INTERCEPTION,
        name,
        f"the rules exclude uid {', '.join(excluded)} but {is_} {uid}: {loop}",
        hint,
    )


def _redirect_rule(
    cfg: AgentConfig, path: Path, rules: list[list[str]], redirect: int | None
) -> Result:
    name, port = "redirect-last", cfg.outbound_addr[1]
    if redirect is None:
        return fail(
            INTERCEPTION,
            name,
            f"{CHAIN} has no REDIRECT rule: nothing is intercepted",
            "restart the agent: it reinstalls the whole chain",
        )
    if redirect != len(rules) - 1:
        return fail(
            INTERCEPTION,
            name,
            f"the REDIRECT is rule {redirect + 1} of {len(rules)}, not the last: the "
            "rules after it never match",
            "restart the agent: it reinstalls the chain in order",
        )
    to = _after(rules[redirect], "--to-ports")
    if to != str(port):
        return fail(
            INTERCEPTION,
            name,
            f"the REDIRECT sends to port {to} but listen.outbound is port {port}: intercepted "
            "connections go nowhere",
            f"restart the agent so it reinstalls the rules for listen.outbound in {path}",
        )
    return ok(
        INTERCEPTION, name, f"REDIRECT is the last rule and sends to port {port} (listen.outbound)"
    )


# --- identity ------------------------------------------------------------------------------------


def roots(r: RootsFacts, now: float) -> list[Result]:
    if r.error:
        return [
            fail(
                IDENTITY,
                "ca-file",
                f"cannot use the mesh CA {r.path}: {r.error}",
                f"copy the controller's ca.pem to {r.path} (`nodemesh ca show` on the "
                "controller prints where it is)",
            )
        ]
    if r.not_after <= now:
        return [
            fail(
                IDENTITY,
                "ca-file",
                f"the mesh CA in {r.path} expired at {when(r.not_after)}",
                "rotate the mesh CA on the controller and install its new ca.pem on every host",
            )
        ]
    left = r.not_after - now
    if left < ROOT_WARN_DAYS * 86400:
        return [
            warn(
                IDENTITY,
                "ca-file",
                f"the mesh CA in {r.path} expires in {span(left)} ({when(r.not_after)})",
                "rotate the mesh CA on the controller soon and install its new ca.pem on every "
                "host",
            )
        ]
    return [
        ok(
            IDENTITY,
            "ca-file",
            f"mesh CA {r.path} holds {r.count} root(s), valid until {when(r.not_after)}",
        )
    ]


def certificate(c: CertFacts, ca_file: Path, now: float) -> Result:
    name = f"cert-{c.what.replace(' ', '-')}"
    renew = (
        "the agent renews at 70 % of the lifetime from the controller: make the controller "
        "reachable (see below) and read the agent's log for identity_request_failed"
    )
    if c.error:
        if c.what.startswith("node"):
            hint = (
                "the agent obtains it from the controller at start: make the controller "
                "reachable and the join token valid, then read the agent's log"
            )
        else:
            hint = (
                "the agent requests it once Consul lists the service on this node: make "
                "the controller reachable and read the agent's log"
            )
        return fail(IDENTITY, name, f"certificate for {c.what}: {c.error}", hint)
    replace = "delete the file and restart the agent: it requests a proper one"
    if c.identity != c.expected:
        return fail(IDENTITY, name, f"{c.path} names {c.identity}, not {c.expected}", replace)
    if not c.key_matches:
        return fail(
            IDENTITY, name, f"the key in {c.path} does not belong to its certificate", replace
        )
    if c.chain_error:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} does not chain to the mesh CA {ca_file}: {c.chain_error}",
            f"install the controller's current ca.pem at {ca_file}, or delete {c.path} and "
            "restart the agent to get one from this mesh's CA",
        )
    if c.not_after <= now:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} expired {span(now - c.not_after)} ago ({when(c.not_after)})",
            renew,
        )
    if c.not_before > now:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} is not valid before "
            f"{when(c.not_before)}, {span(c.not_before - now)} from now",
            CLOCK_HINT,
        )
    lifetime = c.not_after - c.not_before
    left = c.not_after - now
    if lifetime > 0 and left < NEAR_EXPIRY * lifetime:
        return warn(
            IDENTITY,
            name,
            f"certificate for {c.what} expires in {span(left)}, past "
            f"{100 - NEAR_EXPIRY * 100:.0f} % of its {span(lifetime)} lifetime: renewal is overdue",
            renew,
        )
    return ok(
        IDENTITY,
        name,
        f"certificate for {c.what} is valid for {span(left)} more and chains to the mesh CA",
    )


# --- services ------------------------------------------------------------------------------------


def local_instances(node: CatalogNode) -> list[tuple[str, str]]:
    """(service, instance id) of the meshed services registered on this node."""
    return [(i.service, i.id) for i in node.instances if i.service not in UNMESHED_SERVICES]


def services(
    cfg: AgentConfig, node: CatalogNode | str | None, checks: list[NodeCheck] | str
) -> list[Result]:
    if not isinstance(node, CatalogNode):
        return []
    local = local_instances(node)
    if not local:
        return [
            ok(
                SERVICES,
                "local-services",
                f"no services are registered on node {cfg.node} (nothing to serve inbound)",
            )
        ]
    listed = ", ".join(f"{s} ({i})" for s, i in local)
    out = [ok(SERVICES, "local-services", f"services registered on node {cfg.node}: {listed}")]
    if isinstance(checks, str):
        out.append(
            fail(
                SERVICES,
                "service-checks",
                f"cannot read the services' checks: {checks}",
                "read the Consul agent's log",
            )
        )
        return out
    for service, sid in local:
        mine = [c for c in checks if c.service_id == sid]
        bad = [c for c in mine if c.status != "passing"]
        name = f"service-check-{sid}"
        if bad:
            c = bad[0]
            out.append(
                fail(
                    SERVICES,
                    name,
                    f"{service} instance {sid}: check '{c.name}' is {c.status}: "
                    f"{one_line(c.output, 120)}",
                    f"fix {service} on this host or deregister it: until its checks pass the "
                    "mesh sends it no traffic",
                )
            )
        elif mine:
            out.append(
                ok(SERVICES, name, f"{service} instance {sid}: {len(mine)} check(s) passing")
            )
        else:
            out.append(ok(SERVICES, name, f"{service} instance {sid}: no health checks"))
    return out


# --- controller ----------------------------------------------------------------------------------


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


# --- the whole agent run -------------------------------------------------------------------------


def evaluate_agent(f: AgentFacts) -> list[Result]:
    cfg, path = f.cfg, f.config_path
    out = [config_ok(path)]
    reach = consul_reach(cfg, path, f.consul_leader)
    out += reach
    consul_up = any(r.name == "consul-reachable" and r.ok for r in reach)
    node: CatalogNode | str | None = "not asked"
    checks: list[NodeCheck] | str = "not asked"
    if consul_up:
        node, checks = _parsed_node(f.consul_node), _parsed_checks(f.consul_checks)
        out += consul_node(cfg, path, node, checks)
    out += clock_vs_consul(f.consul_leader) + clock_vs_controller(f.controller)
    lst = listeners(f)
    out += lst
    out += admin(f, any(r.name == "listener-admin" and r.ok for r in lst) or f.sockets is None)
    out += registration(cfg, node, checks)
    out += interception(f)
    out += roots(f.roots, f.now)
    out += [certificate(c, cfg.ca_file, f.now) for c in f.certs]
    out += services(cfg, node, checks)
    out += controller(f.controller, path)
    return out


# --- before install (--pre) ----------------------------------------------------------------------


def evaluate_pre(f: PreFacts) -> list[Result]:
    cfg, path = f.cfg, f.config_path
    out = []
    if f.config_found:
        out.append(config_ok(path))
    else:
        out.append(
            warn(
                CONFIG,
                "config",
                f"no config at {path}: checking the defaults",
                f"write {path} before starting the agent (docs/config.md lists every key)",
            )
        )
    out += _host(f)
    out += _kernel(f)
    out += _ports(f)
    out += consul_reach(cfg, path, f.consul_leader)
    out += clock_vs_consul(f.consul_leader)
    return out


def _host(f: PreFacts) -> list[Result]:
    out = []
    if f.euid == 0:
        out.append(ok(HOST, "privileges", "running as root"))
    elif f.cap_net_admin:
        out.append(ok(HOST, "privileges", f"running as uid {f.euid} with CAP_NET_ADMIN"))
    else:
        out.append(
            fail(
                HOST,
                "privileges",
                f"running as uid {f.euid} without CAP_NET_ADMIN: the nat table cannot be read",
                "run nodemesh check --pre as root (sudo nodemesh check --pre)",
            )
        )
    version = ".".join(map(str, f.python))
    need = ".".join(map(str, MIN_PYTHON))
    if f.python[:2] >= MIN_PYTHON:
        out.append(ok(HOST, "python", f"Python {version} (nodemesh needs {need} or newer)"))
    else:
        out.append(
            fail(
                HOST,
                "python",
                f"Python {version} is older than {need}",
                f"install Python {need} or newer and create nodemesh's virtualenv with it",
            )
        )
    if f.user_uid is not None:
        out.append(
            ok(
                HOST,
                "user",
                f"user {f.user_name} exists (uid {f.user_uid}): the uid interception leaves alone",
            )
        )
    else:
        out.append(
            fail(
                HOST,
                "user",
                f"user {f.user_name} does not exist",
                f"create it: useradd --system --no-create-home --shell "
                f"/usr/sbin/nologin {f.user_name} (the ansible role does this)",
            )
        )
    sd = f.state_dir
    if sd.exists and sd.writable:
        out.append(ok(HOST, "state-dir", f"state dir {sd.path} exists"))
    elif sd.exists:
        out.append(
            fail(
                HOST,
                "state-dir",
                f"state dir {sd.path} exists but is not writable",
                f"make it the agent's: chown {f.user_name} {sd.path} && chmod 0700 {sd.path}",
            )
        )
    elif sd.writable:
        out.append(
            ok(HOST, "state-dir", f"state dir {sd.path} can be created ({sd.parent} is writable)")
        )
    else:
        out.append(
            fail(
                HOST,
                "state-dir",
                f"state dir {sd.path} does not exist and {sd.parent} is not writable",
                f"create it as root: install -d -o {f.user_name} -m 0700 {sd.path}",
            )
        )
    return out


def _kernel(f: PreFacts) -> list[Result]:
    out = []
    if f.iptables_path is None:
        out.append(
            fail(
                KERNEL,
                "iptables",
                "iptables is not installed",
                "install it (apt-get install iptables)",
            )
        )
    elif f.iptables.error:
        out.append(
            fail(
                KERNEL,
                "iptables",
                f"iptables cannot read the nat table: {f.iptables.error}",
                "run nodemesh check --pre as root; if it still fails, the kernel lacks "
                "the nat table (CONFIG_IP_NF_NAT or nft_nat)",
            )
        )
    else:
        out.append(ok(KERNEL, "iptables", f"{f.iptables_path} reads the nat table"))
    out.append(
        _extension(
            f.matches,
            f.modules,
            "owner",
            "xt_owner",
            "match",
            "the agent's own connections can be told apart",
            "CONFIG_NETFILTER_XT_MATCH_OWNER",
        )
    )
    out.append(
        _extension(
            f.targets,
            f.modules,
            "REDIRECT",
            "xt_REDIRECT",
            "target",
            "connections can be sent to the agent",
            "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
        )
    )
    return out


def _extension(
    loaded: frozenset[str] | None,
    modules: frozenset[str],
    ext: str,
    module: str,
    kind: str,
    why: str,
    option: str,
) -> Result:
    name = f"kernel-{ext.lower()}"
    if loaded is not None and ext in loaded:
        return ok(KERNEL, name, f"the kernel has the {ext} {kind}: {why}")
    if module in modules:
        return ok(
            KERNEL, name, f"the {ext} {kind} is a loadable module ({module}), loaded on first use"
        )
    if loaded is None:
        return warn(
            KERNEL,
            name,
            f"cannot read /proc/net/ip_tables_{kind}es: cannot tell "
            f"whether the kernel has the {ext} {kind}",
            f"check by hand that the kernel has {option} (modinfo {module})",
        )
    return fail(
        KERNEL,
        name,
        f"the kernel has no {ext} {kind}, loaded or loadable",
        f"use a kernel built with {option} ({module})",
    )


def _ports(f: PreFacts) -> list[Result]:
    out = []
    owners = dict(f.owners)
    for name, where in (
        ("outbound", f.cfg.outbound_addr),
        ("inbound", f.cfg.inbound_addr),
        ("admin", f.cfg.admin_addr),
    ):
        check = f"port-{name}"
        if f.sockets is None:
            out.append(
                warn(
                    PORTS,
                    check,
                    f"cannot list TCP listeners to see whether {addr(where)} is free",
                    "run nodemesh check --pre on the host itself, with /proc mounted",
                )
            )
            continue
        holders = port_holders(f.sockets, where)
        if holders:
            out.append(
                fail(
                    PORTS,
                    check,
                    f"listen.{name} {addr(where)} is taken: port "
                    f"{where[1]} is held on {holders[0].ip} by "
                    f"{_holder(holders[0], owners)}",
                    f"stop that program, or set listen.{name} in {f.config_path} to a free address",
                )
            )
        else:
            out.append(ok(PORTS, check, f"listen.{name} {addr(where)} is free"))
    return out
