"""``nodemesh check [--pre] [--strict] [-o json]``: exit 0 when every check passes, 1 otherwise.

A bad or missing config is itself a failed check (naming the file, key and value), not a usage
error: the point of the command is to say what is wrong with this host.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import trio

from nodemesh import log
from nodemesh.check import checks, render
from nodemesh.check.gather import gather_agent, gather_pre
from nodemesh.check.results import Result
from nodemesh.config import agent_config_from_mapping, load_agent_config
from nodemesh.errors import ConfigError


def run_agent(config_path: Path) -> list[Result]:
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as e:
        return [checks.config_failed(config_path, str(e), missing=not config_path.exists())]
    return checks.evaluate_agent(trio.run(gather_agent, cfg, config_path))


def run_pre(config_path: Path) -> list[Result]:
    found = config_path.exists()
    try:
        cfg = (
            load_agent_config(config_path)
            if found
            else agent_config_from_mapping({}, str(config_path))
        )
    except ConfigError as e:
        return [checks.config_failed(config_path, str(e))]
    return checks.evaluate_pre(trio.run(gather_pre, cfg, config_path, found))


@click.command("check")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("/etc/nodemesh/agent.toml"),
    show_default=True,
    help="This host's agent config.",
)
@click.option("--pre", is_flag=True, help="Before install: only what must hold to install.")
@click.option("--strict", is_flag=True, help="Warnings fail the run too.")
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text")
def check(config_path: Path, pre: bool, strict: bool, fmt: str) -> None:
    """Check this host: Consul, controller, certificates, clocks, iptables, listeners.

    Each check prints √ (ok), ‼ (warning) or × (failure) with a hint; exits 1 on any failure.
    """
    # Whatever a module logs goes to stderr, never into the report (or the JSON) on stdout.
    log.configure("error")
    results = run_pre(config_path) if pre else run_agent(config_path)
    if fmt == "json":
        click.echo(render.to_json(results), nl=False)
    else:
        marks = render.marks_for(getattr(sys.stdout, "encoding", None))
        click.echo(render.text(results, marks, strict), nl=False)
    sys.exit(render.exit_code(results, strict))
