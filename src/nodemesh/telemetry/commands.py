"""``nodemesh stat`` and ``nodemesh edges``: windowed fleet figures from the controller.

Both ask the controller's metrics API (``telemetry.query``).  ``stat services`` falls back to
reading every agent's ``/stats.json`` directly (``telemetry.stat``) when no controller can be
reached or this host holds no client certificate, so it works in a mesh without a controller
API too; the other views exist only in the controller.

Exit codes: 0 ok, 1 controller unreachable (one line on stderr), 64 bad flag or config.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from nodemesh.config import load_agent_config, parse_addr
from nodemesh.errors import ConfigError, NodemeshError
from nodemesh.identity.client import ControllerUnavailable
from nodemesh.telemetry import query, views

# Seconds for one query.  The controller answers from memory, but at 1,000 agents a 1m
# by=edge answer takes it 3-4 s to compute (docs/benchmarks.md), and a 1h one more.
FETCH_TIMEOUT = 30.0
F = TypeVar("F", bound=Callable[..., Any])


def controller_options(f: F) -> F:
    """Where the controller is and how to prove who we are: defaults from this host's agent."""
    for opt in reversed(
        [
            click.option(
                "--controller",
                "controller_addr",
                default="",
                help="Controller API address; default: agent config, else Consul.",
            ),
            click.option(
                "--config",
                "config_path",
                type=click.Path(path_type=Path, dir_okay=False),
                default=Path("/etc/nodemesh/agent.toml"),
                show_default=True,
                help="This host's agent config: certificate paths and controller address.",
            ),
            click.option(
                "--ca-file",
                type=click.Path(path_type=Path, dir_okay=False),
                default=None,
                help="Mesh CA (PEM); default: the agent's roots.pem.",
            ),
            click.option(
                "--cert",
                "cert_file",
                type=click.Path(path_type=Path, dir_okay=False),
                default=None,
                help="Client key and certificate (one PEM); default: the agent's node cert.",
            ),
            click.option(
                "--consul", default="127.0.0.1:8500", show_default=True, help="Consul HTTP address."
            ),
        ]
    ):
        f = opt(f)
    return f


def consul_address(addr: str) -> tuple[str, int]:
    try:
        return parse_addr(addr)
    except Exception:  # config's parser raises its private error type
        raise ConfigError(f'--consul {addr!r} is not an address like "127.0.0.1:8500"') from None


def resolve_target(
    controller_addr: str,
    config_path: Path,
    ca_file: Path | None,
    cert_file: Path | None,
    consul: str,
) -> tuple[str, query.Credentials]:
    """(controller address, credentials); ConfigError when this host cannot ask at all,
    ControllerUnavailable when no controller is known."""
    cfg = None
    if ca_file is None or cert_file is None:
        if not config_path.exists():
            raise ConfigError(
                f"{config_path}: no such file; pass --ca-file and --cert (a key and certificate "
                "from the mesh CA) or --config with this host's agent config"
            )
        cfg = load_agent_config(config_path)
        roots, pair = query.agent_paths(cfg)
        ca_file, cert_file = ca_file or roots, cert_file or pair
    creds = query.load_credentials(ca_file, cert_file)
    if controller_addr:
        return query.check_address(controller_addr), creds
    if cfg is not None and cfg.controller_address:
        return cfg.controller_address, creds
    consul_addr = consul_address(consul)
    try:
        found = trio.run(query.find_controller, consul_addr)
    except Exception as e:  # Consul down or odd: the operator can name the controller instead
        raise ControllerUnavailable(f"cannot ask Consul at {consul} for the controller: {e}") from e
    if found is None:
        raise ControllerUnavailable(
            f"no passing nodemesh-controller in Consul at {consul}; pass --controller"
        )
    return found, creds


def fetch(
    addr: str, window: str, by: str, creds: query.Credentials, direction: str = "inbound"
) -> list[dict[str, Any]]:
    async def one() -> list[dict[str, Any]]:
        with trio.fail_after(FETCH_TIMEOUT):
            return await query.fetch_rows(addr, window, by, creds, direction)

    try:
        return trio.run(one)
    except trio.TooSlowError:
        raise ControllerUnavailable(
            f"controller at {addr} did not answer within {FETCH_TIMEOUT:.0f}s"
        ) from None


def fail(prefix: str, err: NodemeshError) -> NoReturn:
    click.echo(f"{prefix}: {err}", err=True)
    sys.exit(err.exit_code if isinstance(err, ConfigError) else 1)


_BY = {"services": "service", "routes": "route", "hosts": "host"}


@click.command("stat")
@click.argument("kind", type=click.Choice(list(_BY)), default="services", required=False)
@click.option("--window", default="1m", show_default=True, help="10s ... 1h.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--watch", "interval", type=float, default=0.0, help="Refresh every N seconds.")
@click.option("--count", type=int, default=0, help="With --watch, stop after N refreshes.")
@click.option(
    "--direction",
    type=click.Choice(["inbound", "outbound"]),
    default="inbound",
    show_default=True,
    help="As the serving agents saw requests, or as the calling agents did.",
)
@controller_options
def stat(
    kind: str,
    window: str,
    fmt: str,
    direction: str,
    interval: float,
    count: int,
    controller_addr: str,
    config_path: Path,
    ca_file: Path | None,
    cert_file: Path | None,
    consul: str,
) -> None:
    """Success rate, RPS and exact latencies per service, route or host."""
    try:
        query.check_window(window)
        target = resolve_target(controller_addr, config_path, ca_file, cert_file, consul)
        rows = fetch(target[0], window, _BY[kind], target[1], direction)
    except (ConfigError, ControllerUnavailable) as e:
        if kind != "services":
            fail("nodemesh stat", e)
        # The agents hold the same counters since they started: the table still answers.
        # Say so only when the operator pointed at a controller; a host without an agent
        # config (a controller host, the demo's viewer) just reads the agents.
        if controller_addr or ca_file or cert_file or config_path.exists():
            click.echo(f"nodemesh stat: {e}; reading agents directly", err=True)
        from nodemesh.telemetry.direct import stat_from_agents

        try:
            consul_addr = consul_address(consul)
        except ConfigError as bad:
            fail("nodemesh stat", bad)
        stat_from_agents(consul_addr, interval, count, fmt)
        return
    shown = 0
    while True:
        got = views.stat_rows(rows)
        if fmt == "json":
            click.echo(views.to_json(got))
        else:
            if interval > 0 and sys.stdout.isatty():
                click.clear()
            click.echo(views.stat_table(got))
        shown += 1
        if interval <= 0 or (count and shown >= count):
            return
        click.echo()  # tables apart when the output is a log, not a cleared screen
        time.sleep(interval)
        try:
            rows = fetch(target[0], window, _BY[kind], target[1], direction)
        except NodemeshError as e:
            fail("nodemesh stat", e)


@click.command("edges")
@click.option("--window", default="1m", show_default=True, help="10s ... 1h.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "dot"]), default="table")
@controller_options
def edges(
    window: str,
    fmt: str,
    controller_addr: str,
    config_path: Path,
    ca_file: Path | None,
    cert_file: Path | None,
    consul: str,
) -> None:
    """Who calls whom, with identities and mTLS; -o dot draws the graph."""
    try:
        query.check_window(window)
        addr, creds = resolve_target(controller_addr, config_path, ca_file, cert_file, consul)
        got = views.edge_rows(fetch(addr, window, "edge", creds))
    except NodemeshError as e:
        fail("nodemesh edges", e)
    if fmt == "json":
        click.echo(views.to_json(got))
    elif fmt == "dot":
        click.echo(views.edges_dot(got), nl=False)
    else:
        click.echo(views.edges_table(got))
