"""``nodemesh check --pre``: what must hold before the agent is installed.  Pure.

Privileges to read (and later change) the nat table, iptables with the owner match and the
REDIRECT target, Python, the ``nodemesh`` user, a state dir that can be created, free listen
ports, and a reachable Consul with a sane clock.
"""

from __future__ import annotations

from nodemesh.check.facts import PreFacts, port_holders
from nodemesh.check.results import (
    HOST,
    KERNEL,
    PORTS,
    Result,
    addr,
    fail,
    holder,
    ok,
    warn,
)

MIN_PYTHON = (3, 11)


def host(f: PreFacts) -> list[Result]:
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


def kernel(f: PreFacts) -> list[Result]:
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


def ports(f: PreFacts) -> list[Result]:
    out = []
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
                    f"{holder(holders[0], f.owners)}",
                    f"stop that program, or set listen.{name} in {f.config_path} to a free address",
                )
            )
        else:
            out.append(ok(PORTS, check, f"listen.{name} {addr(where)} is free"))
    return out
