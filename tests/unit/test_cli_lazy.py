"""The ``nodemesh`` command loads a subcommand's module only when that subcommand runs."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from nodemesh import cli


def test_every_listed_command_resolves() -> None:
    ctx = click.Context(cli.main)
    names = cli.main.list_commands(ctx)
    assert names[:2] == ["agent", "version"]
    assert len(names) == len(set(names))
    for name in names:
        cmd = cli.main.get_command(ctx, name)
        assert isinstance(cmd, click.Command), name
        assert cmd.name == name, name  # the key it is listed under is the command's own name


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli.main, ["nosuch"])
    assert result.exit_code == 2
    assert "No such command 'nosuch'" in result.output


def test_help_lists_lazy_commands() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for name in ("agent", "top", "controller", "demo", "iptables"):
        assert f"  {name} " in result.output


def test_agent_does_not_load_the_other_commands() -> None:
    # A fresh interpreter: this test process has imported everything already.
    probe = (
        "import sys, nodemesh.cli, nodemesh.agent.daemon\n"
        "heavy = [m for m in ('nodemesh.controller', 'nodemesh.lab', 'nodemesh.top',"
        " 'nodemesh.check', 'http.server') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
