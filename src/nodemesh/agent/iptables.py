"""Outbound interception with iptables: the only place nodemesh runs iptables.

Theory of operation.  Applications on the host dial their upstreams as usual; a rule in the nat
table's ``OUTPUT`` chain sends every new outbound TCP connection to ``NODEMESH_OUTPUT``, which
lets some connections pass untouched (``RETURN``) and REDIRECTs the rest to the agent's outbound
listener (127.0.0.1:4140).  The agent learns where the application meant to go from
``SO_ORIGINAL_DST`` (``transport/original_dst.py``).  nat rules see only the first packet of a
connection, so installing or removing them never disturbs established connections (an
operator's SSH session survives).

``NODEMESH_OUTPUT``, in order, first match wins:

1. RETURN for the agent's own uid: its upstream connections must not loop back into itself.
2. RETURN for ``-o lo``: traffic to any local address (also the host's own public IP) stays local.
3. RETURN for 127.0.0.0/8.
4. RETURN per Consul port: the Consul agent's gossip and RPC must work when nodemesh does not.
5. RETURN per configured excluded port, then per excluded IPv4 CIDR.
6. REDIRECT everything else to the outbound port.

Decide, then act: ``rules``/``restore_script``/``parse_status``/``removal_commands`` are pure;
``install``/``remove``/``show``/``status`` run the binaries (synchronously: call them from trio
through ``trio.to_thread.run_sync``).  The chain is filled atomically by one
``iptables-restore --noflush`` before the ``OUTPUT`` jump exists, so no packet ever meets a
half-built chain.  Installing twice leaves one jump and one copy of each rule.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import pwd
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from nodemesh import log
from nodemesh.config import DEFAULT_CONSUL_PORTS, AgentConfig, load_agent_config
from nodemesh.errors import ConfigError, NodemeshError

CHAIN = "NODEMESH_OUTPUT"
DEFAULT_OUTBOUND_PORT = 4140  # Linkerd's outbound port, so operators recognise it
IPTABLES = "iptables"
# Seconds to wait for the xtables lock, and for any one iptables run; both bound a wedged host.
LOCK_WAIT = 5
RUN_TIMEOUT = 30.0

JUMP_COMMENT = "nodemesh: send outbound TCP through the nodemesh agent"
# Without -p tcp here, UDP (DNS) would walk the chain and only fall off its end; it never should.
# Only connection-opening packets (SYN): when the first nat rule turns connection tracking on
# in a namespace that had none, packets of connections opened before it (the operator's ssh
# session, ansible's) are seen as NEW mid-stream and would otherwise be redirected and stall.
JUMP_RULE: tuple[str, ...] = (
    "-p",
    "tcp",
    "--syn",
    "-m",
    "comment",
    "--comment",
    JUMP_COMMENT,
    "-j",
    CHAIN,
)

_log = log.get(__name__)


class InterceptionError(NodemeshError):
    """iptables is missing, not permitted, or refused a rule."""


@dataclass(frozen=True)
class InterceptionPlan:
    """What to intercept: everything outbound over TCP except what is listed here."""

    proxy_uid: int
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    consul_ports: tuple[int, ...] = DEFAULT_CONSUL_PORTS
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.proxy_uid, bool) or not 0 <= self.proxy_uid < 2**32:
            raise InterceptionError(
                f"proxy_uid {self.proxy_uid!r} is not a uid; give the agent's numeric user id"
            )
        for port in (self.outbound_port, *self.consul_ports, *self.exclude_ports):
            if isinstance(port, bool) or not 0 < port < 65536:
                raise InterceptionError(f"port {port!r} is not a port number; use 1-65535")
        for cidr in self.exclude_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise InterceptionError(
                    f'exclude CIDR {cidr!r} is not a network; write it like "10.0.0.0/8"'
                ) from None


@dataclass(frozen=True)
class InterceptionStatus:
    """What the nat table holds now, as read from ``iptables -t nat -S``."""

    chain_present: bool
    jump_present: bool
    jump_count: int
    jump_position: int | None  # 1-based among OUTPUT's rules; None when absent
    rule_count: int
    redirect_last: bool

    @property
    def installed(self) -> bool:
        return self.chain_present and self.jump_count == 1 and self.redirect_last


# --- pure: what the rules are -----------------------------------------------------------------


def _rule(*spec: str, why: str) -> list[str]:
    # iptables-restore's tokenizer only understands double quotes; keep them out of comments.
    assert '"' not in why and "'" not in why
    return ["-A", CHAIN, *spec, "-m", "comment", "--comment", f"nodemesh: {why}"]


def _unique(items: Iterable[str | int]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items))


def rules(plan: InterceptionPlan) -> list[list[str]]:
    """The ``NODEMESH_OUTPUT`` rules for the nat table, in order, as iptables arguments."""
    out = [
        _rule(
            "-m",
            "owner",
            "--uid-owner",
            str(plan.proxy_uid),
            "-j",
            "RETURN",
            why=f"skip the agent uid {plan.proxy_uid} so it never loops into itself",
        ),
        _rule("-o", "lo", "-j", "RETURN", why="skip traffic to local addresses"),
        _rule("-d", "127.0.0.0/8", "-j", "RETURN", why="skip loopback"),
    ]
    for port in _unique(plan.consul_ports):
        out.append(
            _rule("-p", "tcp", "--dport", port, "-j", "RETURN", why=f"skip Consul port {port}")
        )
    for port in _unique(plan.exclude_ports):
        out.append(
            _rule("-p", "tcp", "--dport", port, "-j", "RETURN", why=f"skip excluded port {port}")
        )
    # Only IPv4 is intercepted (this is the IPv4 table), so an IPv6 exclusion already holds.
    v4 = (ipaddress.ip_network(c, strict=False) for c in plan.exclude_cidrs)
    for cidr in _unique(str(n) for n in v4 if n.version == 4):
        out.append(_rule("-d", cidr, "-j", "RETURN", why=f"skip excluded CIDR {cidr}"))
    out.append(
        _rule(
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            str(plan.outbound_port),
            why=f"redirect outbound TCP to the agent on port {plan.outbound_port}",
        )
    )
    return out


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c.isspace() for c in arg) or arg == "" else arg


def restore_script(plan: InterceptionPlan) -> str:
    """Input for ``iptables-restore --noflush``: create or empty our chain, then fill it.

    ``--noflush`` leaves every other chain alone; the explicit ``-F`` makes re-running it replace
    our rules instead of appending a second copy.
    """
    lines = ["*nat", f":{CHAIN} - [0:0]", f"-F {CHAIN}"]
    lines += [" ".join(_quote(a) for a in rule) for rule in rules(plan)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def nodemesh_lines(save_text: str) -> list[str]:
    """The lines of ``iptables -t nat -S`` that belong to nodemesh (our chain and its jumps)."""
    return [ln for ln in save_text.splitlines() if "NODEMESH" in ln]


def _jump_lines(save_text: str) -> list[str]:
    """The ``-A OUTPUT`` lines that jump to our chain, whatever else they match on."""
    out = []
    for ln in save_text.splitlines():
        if ln.startswith("-A OUTPUT "):
            args = shlex.split(ln)
            if any(a == "-j" and b == CHAIN for a, b in itertools.pairwise(args)):
                out.append(ln)
    return out


def parse_status(save_text: str) -> InterceptionStatus:
    """Read the interception state from ``iptables -t nat -S`` output."""
    lines = save_text.splitlines()
    output = [ln for ln in lines if ln.startswith("-A OUTPUT ")]
    jumps = _jump_lines(save_text)
    ours = [ln for ln in lines if ln.startswith(f"-A {CHAIN} ")]
    return InterceptionStatus(
        chain_present=f"-N {CHAIN}" in lines,
        jump_present=bool(jumps),
        jump_count=len(jumps),
        jump_position=output.index(jumps[0]) + 1 if jumps else None,
        rule_count=len(ours),
        redirect_last=bool(ours) and "-j REDIRECT" in ours[-1],
    )


def removal_commands(save_text: str) -> list[list[str]]:
    """iptables arguments (after ``-t nat``) that take every trace of nodemesh away."""
    cmds = _jump_deletions(_jump_lines(save_text))
    if f"-N {CHAIN}" in save_text.splitlines():
        cmds += [["-F", CHAIN], ["-X", CHAIN]]
    return cmds


def _jump_deletions(jump_lines: Iterable[str]) -> list[list[str]]:
    # "-A OUTPUT <spec>" deletes as "-D OUTPUT <spec>": the spec is exactly as iptables printed it.
    return [["-D", *shlex.split(ln)[1:]] for ln in jump_lines]


# --- effects: running the binaries -------------------------------------------------------------


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one iptables binary; map the failures every caller shares to InterceptionError."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise InterceptionError(
            f"{argv[0]} not found; install the iptables package (apt-get install iptables)"
        ) from None
    except subprocess.TimeoutExpired:
        raise InterceptionError(
            f"{argv[0]} did not finish within {RUN_TIMEOUT:g}s; check that no other program"
            " holds the xtables lock"
        ) from None
    err = proc.stderr.lower()
    if proc.returncode != 0 and any(
        s in err for s in ("permission denied", "must be root", "operation not permitted")
    ):
        raise InterceptionError(
            f"{argv[0]} needs CAP_NET_ADMIN; run the agent as root or grant the capability"
        )
    return proc


def _check(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no message"
        raise InterceptionError(
            f"{shlex.join(proc.args)} failed with exit code {proc.returncode} ({detail});"
            " run it by hand to see why"
        )
    return proc.stdout


def _nat(iptables: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run([iptables, "-w", str(LOCK_WAIT), "-t", "nat", *args])


def _save(iptables: str) -> str:
    return _check(_nat(iptables, "-S"))


def install(plan: InterceptionPlan, *, iptables: str = IPTABLES) -> None:
    """Install (or refresh) the interception rules; idempotent."""
    restore = f"{iptables}-restore"
    _check(_run([restore, "-w", str(LOCK_WAIT), "--noflush"], stdin=restore_script(plan)))
    present = _nat(iptables, "-C", "OUTPUT", *JUMP_RULE)
    if present.returncode not in (0, 1):
        _check(present)
    jumps = _jump_lines(_save(iptables))
    if present.returncode != 0 or len(jumps) != 1:
        # Absent, duplicated, or left by an older version with another comment: replace them
        # all with exactly one, first in OUTPUT so no earlier nat rule can take the packet away.
        for cmd in _jump_deletions(jumps):
            _check(_nat(iptables, *cmd))
        _check(_nat(iptables, "-I", "OUTPUT", "1", *JUMP_RULE))
    st = status(iptables=iptables)
    _log.info(
        "interception_installed",
        chain=CHAIN,
        rules=st.rule_count,
        jump_position=st.jump_position,
        outbound_port=plan.outbound_port,
        proxy_uid=plan.proxy_uid,
    )


def remove(*, iptables: str = IPTABLES) -> bool:
    """Delete our jumps, flush and delete our chain.  False when there was nothing to remove."""
    cmds = removal_commands(_save(iptables))
    for cmd in cmds:
        _check(_nat(iptables, *cmd))
    if cmds:
        _log.info("interception_removed", chain=CHAIN, commands=len(cmds))
    return bool(cmds)


def show(*, iptables: str = IPTABLES) -> str:
    """The nodemesh lines of the nat table (chain, its rules, the jump), one per line."""
    lines = nodemesh_lines(_save(iptables))
    return "\n".join(lines) + ("\n" if lines else "")


def status(*, iptables: str = IPTABLES) -> InterceptionStatus:
    return parse_status(_save(iptables))


# --- CLI ---------------------------------------------------------------------------------------


def _fail(e: InterceptionError) -> click.ClickException:
    return click.ClickException(str(e))


@click.group("iptables")
def iptables_cli() -> None:
    """Show, install or remove nodemesh's outbound interception rules (nat table)."""


@iptables_cli.command("show")
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
def show_cmd(fmt: str) -> None:
    """Print nodemesh's rules and whether interception is complete."""
    try:
        save = _save(IPTABLES)
    except InterceptionError as e:
        raise _fail(e) from None
    st = parse_status(save)
    lines = nodemesh_lines(save)
    if fmt == "json":
        click.echo(
            json.dumps(
                {**dataclasses.asdict(st), "installed": st.installed, "rules": lines}, indent=2
            )
        )
        return
    for ln in lines:
        click.echo(ln)
    state = "installed" if st.installed else ("partial" if lines else "not installed")
    click.echo(
        f"# interception {state}: {st.rule_count} rules, jump at OUTPUT position "
        f"{st.jump_position if st.jump_position is not None else '-'}"
    )


@iptables_cli.command("remove")
def remove_cmd() -> None:
    """Remove every nodemesh rule (also after a crash); prints what it removed."""
    try:
        before = nodemesh_lines(_save(IPTABLES))
        remove()
    except InterceptionError as e:
        raise _fail(e) from None
    if not before:
        click.echo("nothing to remove: no nodemesh rules in the nat table")
    for ln in before:
        click.echo(f"removed: {ln}")


@iptables_cli.command("install")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Take every value from this agent config (the systemd way).",
)
@click.option(
    "--user",
    default="nodemesh",
    show_default=True,
    help="With --config and no agent.proxy_uid: the agent's user, never redirected.",
)
@click.option("--proxy-uid", type=int, default=None, help="uid of the agent (never redirected)")
@click.option("--outbound-port", type=int, default=DEFAULT_OUTBOUND_PORT, show_default=True)
@click.option(
    "--consul-port",
    "consul_ports",
    type=int,
    multiple=True,
    help=f"never redirected [default: {' '.join(map(str, DEFAULT_CONSUL_PORTS))}]",
)
@click.option("--exclude-port", "exclude_ports", type=int, multiple=True)
@click.option("--exclude-cidr", "exclude_cidrs", multiple=True)
def install_cmd(
    config_path: Path | None,
    user: str,
    proxy_uid: int | None,
    outbound_port: int,
    consul_ports: tuple[int, ...],
    exclude_ports: tuple[int, ...],
    exclude_cidrs: tuple[str, ...],
) -> None:
    """Install the rules idempotently (for a privileged helper step)."""
    try:
        if config_path is not None:
            plan = plan_from_config(load_agent_config(config_path), user)
        elif proxy_uid is None:
            raise click.UsageError("give --config with the agent's config, or --proxy-uid")
        else:
            plan = InterceptionPlan(
                proxy_uid,
                outbound_port,
                consul_ports or DEFAULT_CONSUL_PORTS,
                exclude_ports,
                exclude_cidrs,
            )
        install(plan)
        click.echo(show(), nl=False)
    except InterceptionError as e:
        raise _fail(e) from None
    except ConfigError as e:
        click.echo(f"nodemesh iptables: {e}", err=True)
        sys.exit(e.exit_code)


def plan_from_config(cfg: AgentConfig, user: str) -> InterceptionPlan:
    """The rules an agent with ``cfg`` needs; its uid from the config, else ``user``'s."""
    uid = cfg.proxy_uid
    if uid is None:
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ConfigError(
                f"user {user!r} does not exist; create the agent's user or set agent.proxy_uid"
            ) from None
    return InterceptionPlan(
        uid, cfg.outbound_addr[1], cfg.consul_ports, cfg.exclude_ports, cfg.exclude_cidrs
    )


if __name__ == "__main__":
    log.configure()
    iptables_cli()
