"""``nodemesh stat`` without a controller: every agent's ``/stats.json``, found in Consul.

The counters are cumulative since each agent started; RPS comes from two samples a second (or
``--watch`` seconds) apart.  ``telemetry.commands`` uses this when no controller answers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import click
import trio

from nodemesh.telemetry import stat as st


@dataclass
class Sample:
    docs: list[dict[str, object]]
    meshed: dict[str, int]
    unreachable: int


def sample(consul_addr: tuple[str, int]) -> Sample:
    from nodemesh.discovery.inventory import agents_and_services

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
    return Sample(docs, meshed, len(admins) - len(docs))


def stat_from_agents(consul_addr: tuple[str, int], interval: float, count: int, fmt: str) -> None:
    sample_gap = 1.0 if interval <= 0 else interval
    before = sample(consul_addr)
    t0 = time.monotonic()
    shown = 0
    while True:
        time.sleep(sample_gap)
        now = sample(consul_addr)
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
