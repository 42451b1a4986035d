"""``nodemesh check`` judged: gathered facts in, named results out, section by section.  Pure:
no I/O, no clock (``now`` is a fact).

Sections, in the order they print: config, consul, clock, agent, interception, identity,
services, controller (``--pre``: config, host, kernel, ports, consul, clock).  Each lives in
its own module; this one only puts them in order.
"""

from __future__ import annotations

from pathlib import Path

from nodemesh.check import catalog, identity, interception, preflight, runtime
from nodemesh.check.facts import AgentFacts, CatalogNode, NodeCheck, PreFacts
from nodemesh.check.results import CONFIG, Result, fail, ok, warn

__all__ = ["config_failed", "config_ok", "evaluate_agent", "evaluate_pre"]


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


def evaluate_agent(f: AgentFacts) -> list[Result]:
    cfg, path = f.cfg, f.config_path
    out = [config_ok(path)]
    reach = catalog.consul_reach(cfg, path, f.consul_leader)
    out += reach
    node: CatalogNode | str | None = "consul is not reachable"
    checks: list[NodeCheck] | str = "consul is not reachable"
    if all(r.ok for r in reach):
        node, checks = catalog.parse_node(f.consul_node), catalog.parse_checks(f.consul_checks)
        out += catalog.consul_node(cfg, path, node, checks)
    out += runtime.clock_vs_consul(f.consul_leader)
    out += runtime.clock_vs_controller(f.controller)
    listening = runtime.listeners(f)
    out += listening
    admin_up = f.sockets is None or any(r.name == "listener-admin" and r.ok for r in listening)
    out += runtime.admin(f, admin_up)
    out += catalog.registration(cfg, node, checks)
    out += interception.interception(f)
    out += identity.roots(f.roots, f.now)
    out += [identity.certificate(c, cfg.ca_file, f.now) for c in f.certs]
    out += catalog.services(cfg, node, checks)
    out += runtime.controller(f.controller, path)
    return out


def evaluate_pre(f: PreFacts) -> list[Result]:
    cfg, path = f.cfg, f.config_path
    if f.config_found:
        out = [config_ok(path)]
    else:
        out = [
            warn(
                CONFIG,
                "config",
                f"no config at {path}: checking the defaults",
                f"write {path} before starting the agent (docs/config.md lists every key)",
            )
        ]
    out += preflight.host(f)
    out += preflight.kernel(f)
    out += preflight.ports(f)
    out += catalog.consul_reach(cfg, path, f.consul_leader)
    out += runtime.clock_vs_consul(f.consul_leader)
    return out
