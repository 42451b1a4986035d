"""What Consul's catalog says about this host: Consul itself, this node, the agent's own
registration and the local services with their checks.  Pure.

Checks that depend on an earlier one are left out when it failed (no "node registered" line
under an unreachable Consul): the first failure is the one to fix.
"""

from __future__ import annotations

from pathlib import Path

from nodemesh.check.facts import (
    CatalogNode,
    NodeCheck,
    Reply,
    admin_target,
    parse_catalog_node,
    parse_node_checks,
)
from nodemesh.check.results import (
    AGENT,
    CONSUL,
    SERVICES,
    Result,
    addr,
    fail,
    ok,
    one_line,
    warn,
)
from nodemesh.config import AgentConfig
from nodemesh.discovery.snapshot import AGENT_SERVICE, UNMESHED_SERVICES


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


def parse_node(reply: Reply) -> CatalogNode | str | None:
    """The node, None when Consul does not know it, or a string saying why it cannot tell."""
    if not reply.answered:
        return reply.error
    if reply.status != 200:
        return f"Consul answered {reply.status}: {one_line(reply.text)}"
    try:
        return parse_catalog_node(reply)
    except ValueError as e:
        return f"Consul's answer is not a node: {e}"


def parse_checks(reply: Reply) -> list[NodeCheck] | str:
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
                "the agent registers itself once it is ready: start it (systemctl start "
                "nodemesh), or fix what keeps it from being ready (listed here)",
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
                f"Consul probes the agent's /ready on {addr(admin_target(cfg))}: the agent must be "
                "ready, and its admin listener reachable from the Consul agent",
            )
        )
    else:
        out.append(ok(AGENT, "agent-check", "Consul's check of the agent (/ready) is passing"))
    return out


def local_instances(node: CatalogNode) -> list[tuple[str, str]]:
    """(service, instance id) of the meshed services registered on this node."""
    return [(i.service, i.id) for i in node.instances if i.service not in UNMESHED_SERVICES]


def _shared_addresses(node: CatalogNode) -> list[Result]:
    """An ip:port that two services on this node claim: the agents refuse calls to it
    (``discovery/snapshot.py``), so say which registrations to untangle."""
    claims: dict[tuple[str, int], dict[str, str]] = {}
    for i in node.instances:
        if i.service not in UNMESHED_SERVICES:
            claims.setdefault((i.address, i.port), {}).setdefault(i.service, i.id)
    out = []
    for (ip, port), by_name in sorted(claims.items()):
        if len(by_name) > 1:
            names = ", ".join(f"{s} ({i})" for s, i in sorted(by_name.items()))
            out.append(
                fail(
                    SERVICES,
                    f"service-address-{ip}:{port}",
                    f"{ip}:{port} is registered by {len(by_name)} services: {names}; the mesh "
                    "refuses calls to it until only one claims it",
                    "deregister the one that does not listen there "
                    "(consul services deregister -id <id>)",
                )
            )
    return out


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
    out += _shared_addresses(node)
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
