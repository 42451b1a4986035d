"""``nodemesh routes``: each service's route table (Consul KV) beside its per-route numbers.

    nodemesh routes [SERVICE] [--window 1m] [-o table|json]
    nodemesh routes SERVICE --check FILE        # validate a table before `consul kv put`

Every route of the table is listed in its matching order, then ``[default]``, so a route that
saw no traffic shows as such (``-``) instead of missing; a route the controller counted that is
no longer in the table (it was renamed or removed) is listed after them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import trio

from nodemesh.discovery import routes
from nodemesh.discovery.consul import ConsulClient, ConsulUnavailable
from nodemesh.errors import ConfigError, NodemeshError
from nodemesh.telemetry import views
from nodemesh.telemetry.commands import (
    consul_address,
    controller_options,
    fail,
    fetch,
    resolve_target,
)
from nodemesh.telemetry.metrics import DEFAULT_ROUTE

COLUMNS = (
    "SERVICE",
    "ROUTE",
    "METHOD",
    "PATH",
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
)


@dataclass(frozen=True)
class RouteRow:
    service: str
    route: str
    method: str  # "*" for any; "" for a route no longer in the table
    path: str  # the route's expression; "" for [default] and for a route no longer defined
    requests: int | None
    success: float | None
    rps: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None


def route_rows(
    tables: Mapping[str, routes.RouteTable], stats: Sequence[Any], service: str = ""
) -> list[RouteRow]:
    """The table's routes in order, ``[default]``, then routes counted but not defined."""
    counted: dict[tuple[str, str], views.StatRow] = {}
    for d in stats:
        key = d.get("key") if isinstance(d, Mapping) else None
        if not isinstance(key, Mapping):
            continue
        svc, route = key.get("service"), key.get("route")
        if not isinstance(svc, str) or not isinstance(route, str):
            continue
        row = views.stat_rows([d | {"name": svc}])
        if row:
            counted[(svc, route or DEFAULT_ROUTE)] = row[0]
    names = sorted({*tables, *(s for s, _ in counted)})
    out: list[RouteRow] = []
    for svc in names:
        if service and svc != service:
            continue
        defined = [
            (r.name, r.method.decode() if r.method else "*", r.path.pattern.decode())
            for r in (tables[svc].routes if svc in tables else ())
        ]
        defined.append((DEFAULT_ROUTE, "*", ""))
        known = {name for name, _, _ in defined}
        extra = sorted(route for s, route in counted if s == svc and route not in known)
        for name, method, path in [*defined, *((r, "", "") for r in extra)]:
            st = counted.get((svc, name))
            out.append(
                RouteRow(
                    svc,
                    name,
                    method,
                    path,
                    st.requests if st else None,
                    st.success if st else None,
                    st.rps if st else None,
                    st.latency_ms_p50 if st else None,
                    st.latency_ms_p95 if st else None,
                    st.latency_ms_p99 if st else None,
                )
            )
    return out


def table(rows: Sequence[RouteRow]) -> str:
    lines: list[Sequence[str]] = [COLUMNS]
    for r in rows:
        lines.append(
            (
                r.service,
                r.route,
                r.method or "-",
                r.path or "-",
                views.pct(r.success),
                "-" if r.rps is None else f"{r.rps:.1f}",
                views.ms(r.latency_ms_p50),
                views.ms(r.latency_ms_p95),
                views.ms(r.latency_ms_p99),
            )
        )
    return views.columns(lines)


def check_file(service: str, path: Path) -> int:
    """Validate ``path`` as ``service``'s table: the routes it defines on stdout, each problem
    on stderr; 64 when there is any (nothing is half-applied by accident)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        click.echo(f"nodemesh routes: {path}: cannot read ({e.strerror})", err=True)
        return 64
    parsed, rejected = routes.parse_table(service, raw)
    rows = [
        RouteRow(
            service,
            r.name,
            r.method.decode() if r.method else "*",
            r.path.pattern.decode(),
            None,
            None,
            None,
            None,
            None,
            None,
        )
        for r in parsed.routes
    ]
    click.echo(
        views.columns([COLUMNS[:4], *((r.service, r.route, r.method, r.path) for r in rows)])
    )
    for reason in rejected:
        where = reason.removeprefix(f"{routes.PREFIX}{service}").lstrip(": ")
        click.echo(f"nodemesh routes: {path}: {where}", err=True)
    if rejected:
        click.echo(
            f"nodemesh routes: {len(rejected)} problem(s); fix them before "
            f"`consul kv put {routes.PREFIX}{service} @{path}`",
            err=True,
        )
        return 64
    return 0


@click.command("routes")
@click.argument("service", default="", required=False)
@click.option("--window", default="1m", show_default=True, help="10s ... 1h.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--check",
    "check_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Validate this JSON route table for SERVICE and exit (64 on any problem).",
)
@controller_options
def routes_cmd(
    service: str,
    window: str,
    fmt: str,
    check_path: Path | None,
    controller_addr: str,
    config_path: Path,
    ca_file: Path | None,
    cert_file: Path | None,
    consul: str,
) -> None:
    """Each service's routes (Consul KV nodemesh/routes/<service>) with their numbers."""
    if check_path is not None:
        if not service:
            fail("nodemesh routes", ConfigError("--check needs the SERVICE the table is for"))
        sys.exit(check_file(service, check_path))
    try:
        consul_addr = consul_address(consul)
        _, entries = trio.run(ConsulClient(consul_addr).kv_tree, routes.PREFIX)
    except (ConfigError, ConsulUnavailable) as e:
        fail("nodemesh routes", e)
    tables, rejected = routes.build(entries)
    for reason in rejected:
        click.echo(f"nodemesh routes: {reason}", err=True)
    stats: list[dict[str, Any]] = []
    try:
        addr, creds = resolve_target(controller_addr, config_path, ca_file, cert_file, consul)
        stats = fetch(addr, window, "route", creds)
    except NodemeshError as e:
        # The definitions alone still answer "what are the routes"; say why numbers are missing.
        click.echo(f"nodemesh routes: no numbers: {e}", err=True)
    rows = route_rows(tables, stats, service)
    if fmt == "json":
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        click.echo(table(rows))
