"""The ``nodemesh`` command.  Subcommands are thin: they parse options and call into modules.

Exit codes: 0 ok, 1 runtime failure (one line on stderr), 64 bad config or usage (EX_USAGE).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from nodemesh import __version__
from nodemesh.config import load_agent_config
from nodemesh.errors import ConfigError

# Commands defined next to the code they drive, imported only when named (or for --help): the
# agent, a long-running daemon, then never loads the controller, the lab, top or check
# (2.6 MiB of RSS; bench/memory_floor.py).  Listing order as written: the commands operators
# reach for first.
_LAZY = {
    "stat": "nodemesh.telemetry.commands:stat",
    "top": "nodemesh.top.cli:top",
    "check": "nodemesh.check.cli:check",
    "edges": "nodemesh.telemetry.commands:edges",
    "routes": "nodemesh.telemetry.routes_cli:routes_cmd",
    "controller": "nodemesh.controller.cli:controller",
    "iptables": "nodemesh.agent.iptables:iptables_cli",
    "ca": "nodemesh.controller.cli:ca",
    "demo": "nodemesh.lab.demo:demo",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.commands, *_LAZY]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = _LAZY.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert isinstance(cmd, click.Command), target
        return cmd


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
