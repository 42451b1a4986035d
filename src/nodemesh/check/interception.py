"""Whether the nat table intercepts as this host's agent needs: the chain, one jump, the
agent's uid excluded before the REDIRECT (no redirect loop), the REDIRECT last and to the
outbound port.  Pure: it reads ``iptables -t nat -S`` lines gathered elsewhere.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from pathlib import Path

from nodemesh.agent.iptables import CHAIN
from nodemesh.check.facts import AgentFacts, Owner, agent_process, listener_at
from nodemesh.check.results import INTERCEPTION, Result, fail, ok, warn
from nodemesh.config import AgentConfig


def running_agent(f: AgentFacts) -> Owner | None:
    """The agent process, found as the holder of the outbound listener."""
    s = None if f.sockets is None else listener_at(f.sockets, f.cfg.outbound_addr)
    return None if s is None else agent_process(f.owners.get(s.inode, ()))


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
    agent = running_agent(f)
    reinstall = _reinstall(cfg, path, agent is not None)
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
                reinstall,
            )
        )
    elif st.jump_position != 1:
        out.append(
            warn(
                INTERCEPTION,
                "jump-once",
                f"OUTPUT jumps to {CHAIN} once, but at position {st.jump_position}: earlier nat "
                "rules can take connections away from the mesh",
                reinstall,
            )
        )
    else:
        out.append(ok(INTERCEPTION, "jump-once", f"OUTPUT jumps to {CHAIN} once, first"))
    rules = _chain_rules(ipt.lines)
    redirect = next((i for i, r in enumerate(rules) if _after(r, "-j") == "REDIRECT"), None)
    out.append(_uid_rule(f, rules, redirect, agent, reinstall))
    out.append(_redirect_rule(cfg, rules, redirect, reinstall))
    return out


def _reinstall(cfg: AgentConfig, path: Path, agent_running: bool) -> str:
    """How to get the whole chain back, whoever installs it on this host."""
    if cfg.interception_install == "external":
        return (
            "run systemctl restart nodemesh-iptables: it reinstalls the chain and exactly one "
            f'jump, first in OUTPUT, from {path} (interception.install = "external")'
        )
    if agent_running:
        return (
            "restart the agent (systemctl restart nodemesh): it reinstalls the chain and "
            "exactly one jump, first in OUTPUT"
        )
    return (
        "start the agent (systemctl start nodemesh): it installs the rules at start and "
        "removes them when it stops"
    )


def _uid_rule(
    f: AgentFacts,
    rules: list[list[str]],
    redirect: int | None,
    agent: Owner | None,
    reinstall: str,
) -> Result:
    cfg, path = f.cfg, f.config_path
    end = len(rules) if redirect is None else redirect
    excluded = []
    for r in rules[:end]:
        uid = _after(r, "--uid-owner")
        if uid is not None and _after(r, "-j") == "RETURN" and "!" not in r:
            excluded.append(uid)
    # The owner match compares the uid of the agent's own outgoing sockets: the agent
    # process's uid when it runs (and this user may see it), else what the config says.
    if agent is not None and agent.uid is not None:
        uid, who, is_ = str(agent.uid), f"the agent's uid {agent.uid}", "the agent runs as uid"
    elif cfg.proxy_uid is not None:
        uid, who, is_ = str(cfg.proxy_uid), f"agent.proxy_uid {cfg.proxy_uid}", "agent.proxy_uid is"
    else:
        uid, who, is_ = None, "", ""
    name = "no-redirect-loop"
    loop = "the agent's own connections loop back into it"
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
    installer = (
        "systemctl restart nodemesh-iptables"
        if cfg.interception_install == "external"
        else "restart the agent"
    )
    if agent is None:
        hint = reinstall  # the rules are stale: the config already says the right uid
    else:
        hint = (
            f"set agent.proxy_uid = {uid} in {path} (or leave it out: the rules then exclude "
            f"the agent's own user) and {installer}"
        )
    return fail(
        INTERCEPTION,
        name,
        f"the rules exclude uid {', '.join(excluded)} but {is_} {uid}: {loop}",
        hint,
    )


def _redirect_rule(
    cfg: AgentConfig, rules: list[list[str]], redirect: int | None, reinstall: str
) -> Result:
    name, port = "redirect-last", cfg.outbound_addr[1]
    if redirect is None:
        return fail(
            INTERCEPTION,
            name,
            f"{CHAIN} has no REDIRECT rule: nothing is intercepted",
            reinstall,
        )
    if redirect != len(rules) - 1:
        return fail(
            INTERCEPTION,
            name,
            f"the REDIRECT is rule {redirect + 1} of {len(rules)}, not the last: the "
            "rules after it never match",
            reinstall,
        )
    to = _after(rules[redirect], "--to-ports")
    if to != str(port):
        return fail(
            INTERCEPTION,
            name,
            f"the REDIRECT sends to port {to} but listen.outbound is port {port}: intercepted "
            "connections go nowhere",
            reinstall,
        )
    return ok(
        INTERCEPTION, name, f"REDIRECT is the last rule and sends to port {port} (listen.outbound)"
    )
