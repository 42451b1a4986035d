"""``nodemesh top``: the command around ``top.screen``."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from nodemesh.errors import NodemeshError
from nodemesh.telemetry import query
from nodemesh.telemetry.commands import controller_options, fail, resolve_target

LAST_WINDOW = "10s"  # one controller slot: the "Last" column


@click.command("top")
@click.option("--window", default="1m", show_default=True, help="Counts over this window.")
@click.option("--service", default="", help="Start filtered to this service (key f changes it).")
@controller_options
def top(
    window: str,
    service: str,
    controller_addr: str,
    config_path: Path,
    ca_file: Path | None,
    cert_file: Path | None,
    consul: str,
) -> None:
    """Live traffic between services, full screen (s sort, f filter, q quit)."""
    from nodemesh import log
    from nodemesh.top import screen  # curses only when the view runs

    # Nothing may write to the terminal under the full-screen view: only errors, and those
    # end the view anyway.
    log.configure("error")

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        click.echo("nodemesh top: needs a terminal; use nodemesh stat or edges -o json", err=True)
        sys.exit(1)
    try:
        query.check_window(window)
        # The certificate must be usable now; the controller may come and go while we run.
        addr, creds = resolve_target(controller_addr, config_path, ca_file, cert_file, consul)
    except NodemeshError as e:
        fail("nodemesh top", e)

    async def fetch() -> tuple[Sequence[Any], Sequence[Any]]:
        rows = await query.fetch_rows(addr, window, "edge_route", creds)
        last = await query.fetch_rows(addr, LAST_WINDOW, "edge_route", creds)
        return rows, last

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is a way to leave, not an error
        screen.run(fetch, service)
