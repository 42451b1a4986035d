"""The ``nodemesh`` command.  Subcommands are thin: they parse options and call into modules.

Exit codes: 0 ok, 1 runtime failure (one line on stderr), 64 bad config or usage (EX_USAGE).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import trio

from nodemesh import __version__
from nodemesh.config import load_agent_config, parse_addr
from nodemesh.errors import ConfigError


class _Group(click.Group):
    """Listing order as written, not alphabetical: the commands operators reach for first."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nodemesh")
def main() -> None:
    """nodemesh: a service mesh for VMs and bare-metal hosts."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("/etc/nodemesh/agent.toml"),
    show_default=True,
    help="Agent config file (TOML).",
)
def agent(config_path: Path) -> None:
    """Run the per-host proxy agent."""
    from nodemesh.agent.daemon import run

    try:
        cfg = load_agent_config(config_path)
    except ConfigError as e:
        click.echo(f"nodemesh agent: {e}", err=True)
        sys.exit(e.exit_code)
    sys.exit(run(cfg))


@main.command()
@click.option("--consul", default="127.0.0.1:8500", show_default=True, help="Consul HTTP address.")
@click.option("--watch", "interval", type=float, default=0.0, help="Refresh every N seconds.")
@click.option("--count", type=int, default=0, help="With --watch, stop after N refreshes.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
def stat(consul: str, interval: float, count: int, fmt: str) -> None:
    """Per-service success rate, RPS and exact latency percentiles, from every agent."""
    from nodemesh.telemetry import stat as st

    try:
        consul_addr = parse_addr(consul)
    except Exception:
        raise click.BadParameter(f'{consul!r} is not an address like "127.0.0.1:8500"') from None
    sample_gap = 1.0 if interval <= 0 else interval
    before = _sample(consul_addr)
    t0 = time.monotonic()
    shown = 0
    while True:
        time.sleep(sample_gap)
        now = _sample(consul_addr)
        t1 = time.monotonic()
        rows = st.rows(now.docs, now.meshed)
        st.with_rates(rows, st.rows(before.docs, before.meshed), t1 - t0)
        if fmt == "json":
            click.echo(json.dumps([r.as_json() for r in rows.values()], indent=2))
        else:
            if interval > 0 and sys.stdout.isatty():
                click.clear()
            unreachable = f"  ({now.unreachable} agents unreachable)" if now.unreachable else ""
            click.echo(st.table(list(rows.values())) + unreachable)
        shown += 1
        if interval <= 0 or (count and shown >= count):
            return
        before, t0 = now, t1
        if interval > 0:
            click.echo()


class _Sample:
    def __init__(
        self, docs: list[dict[str, object]], meshed: dict[str, int], unreachable: int
    ) -> None:
        self.docs = docs
        self.meshed = meshed
        self.unreachable = unreachable


def _sample(consul_addr: tuple[str, int]) -> _Sample:
    from nodemesh.discovery.inventory import agents_and_services
    from nodemesh.telemetry import stat as st

    try:
        admins, meshed = trio.run(agents_and_services, consul_addr)
    except Exception as e:
        click.echo(f"nodemesh stat: {e}", err=True)
        sys.exit(1)
    docs = []
    for admin in admins:
        doc = st.fetch(admin)
        if doc is not None:
            docs.append(doc)
    return _Sample(docs, meshed, len(admins) - len(docs))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nodemesh {__version__}")


# Commands defined next to the code they drive.
from nodemesh.agent.iptables import iptables_cli  # noqa: E402
from nodemesh.controller.cli import ca, controller  # noqa: E402
from nodemesh.lab.demo import demo  # noqa: E402

main.add_command(controller, "controller")
main.add_command(iptables_cli, "iptables")
main.add_command(ca, "ca")
main.add_command(demo, "demo")
