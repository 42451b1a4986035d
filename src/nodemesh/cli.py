"""The ``nodemesh`` command.  Subcommands are thin: they parse options and call into modules.

Exit codes: 0 ok, 1 runtime failure (one line on stderr), 64 bad config or usage (EX_USAGE).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nodemesh import __version__
from nodemesh.config import load_agent_config
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
    sys.exit(run(cfg, config_path))


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"nodemesh {__version__}")


# Commands defined next to the code they drive.
from nodemesh.agent.iptables import iptables_cli  # noqa: E402
from nodemesh.check.cli import check  # noqa: E402
from nodemesh.controller.cli import ca, controller  # noqa: E402
from nodemesh.lab.demo import demo  # noqa: E402
from nodemesh.telemetry.commands import edges, stat  # noqa: E402
from nodemesh.telemetry.routes_cli import routes_cmd  # noqa: E402
from nodemesh.top.cli import top  # noqa: E402

main.add_command(stat, "stat")
main.add_command(top, "top")
main.add_command(check, "check")
main.add_command(edges, "edges")
main.add_command(routes_cmd, "routes")
main.add_command(controller, "controller")
main.add_command(iptables_cli, "iptables")
main.add_command(ca, "ca")
main.add_command(demo, "demo")
