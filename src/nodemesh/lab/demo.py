"""``nodemesh demo``: a whole mesh on this machine, with live traffic, torn down on Ctrl-C.

Builds a lab (3 Consul servers, the controller, agent hosts h1..hN), runs ``web`` on h2..hN and
``shop`` on h1 and h2 (shop calls web through Consul, as an unmodified app), drives load from h1
at shop on h2, and shows live numbers every second: ``nodemesh stat --watch 1`` from the
controller's host when that command exists, else the load generator's own counts.  Ctrl-C or
SIGTERM tears everything down and exits 0 with a one-line summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType
from typing import Any

import click

from nodemesh.lab import netns
from nodemesh.lab.mesh import AppSpec, Lab, LabSpec, Load
from nodemesh.lab.netns import LabError

WEB_PORT = 8080
SHOP_PORT = 8090
FOREVER = 7 * 24 * 3600.0  # "until Ctrl-C" still bounds the load generator: one week
STAT_PROBE_TIMEOUT = 10.0
POLL = 0.2  # seconds between reads of the load generator's statistics


# Metrics are per route (docs/observability.md, "Routes"): the sample apps' own paths.
ROUTES = {
    "shop": {"routes": [{"name": "GET /", "method": "GET", "path": "/"}]},
    "web": {
        "routes": [
            {"name": "GET /", "method": "GET", "path": "/"},
            {"name": "GET /slow", "method": "GET", "path": "/slow"},
        ]
    },
}


def demo_spec(hosts: int, servers: int, mesh: bool) -> LabSpec:
    agent_hosts = [f"h{i}" for i in range(1, hosts + 1)]
    apps = [AppSpec(h, "web", WEB_PORT) for h in agent_hosts[1:]]
    apps += [AppSpec(h, "shop", SHOP_PORT, ("web",)) for h in agent_hosts[:2]]
    return LabSpec(servers=servers, hosts=hosts, controller=mesh, agents=mesh, apps=tuple(apps))


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # The same path as Ctrl-C: unwind through the Lab's context manager, which tears down.
    raise KeyboardInterrupt


def _say(msg: str) -> None:
    click.echo(f"==> {msg}")


def _has_stat(lab: Lab) -> bool:
    try:
        p = subprocess.run(
            [str(lab.bin / "nodemesh"), "stat", "--help"],
            capture_output=True,
            timeout=STAT_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def _row(s: dict[str, Any]) -> str:
    lat = s.get("window", {}).get("latency_ms", {})
    rps = s.get("window", {}).get("rps", 0.0)
    rate = 100.0 * s["ok"] / s["sent"] if s["sent"] else 0.0
    return (
        f"{s['elapsed_s']:>7.0f}s {s['sent']:>8} {s['ok']:>8} {rate:>7.2f}% {rps:>7.1f}"
        f" {lat.get('p50', 0):>8.2f} {lat.get('p99', 0):>8.2f}"
    )


HEADER = f"{'TIME':>8} {'SENT':>8} {'OK':>8} {'SUCCESS':>8} {'RPS':>7} {'P50_MS':>8} {'P99_MS':>8}"


def _watch(lab: Lab, load: Load, duration: float, use_stat: bool) -> None:
    """Show live numbers until ``duration`` passes (0: until interrupted) or the load ends."""
    end = time.monotonic() + (duration or FOREVER)
    viewer: subprocess.Popen[bytes] | None = None
    if use_stat:
        argv = netns.netns_argv(
            lab.host("ctl"), [str(lab.bin / "nodemesh"), "stat", "--watch", "1"]
        )
        viewer = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    else:
        click.echo("(load generator's view: `nodemesh stat` is not available)")
        click.echo(HEADER)
    try:
        shown = None
        while time.monotonic() < end and load.process.running:
            time.sleep(min(POLL, max(0.0, end - time.monotonic())))
            stats = load.stats()
            # One row per interval the load generator writes, not per poll.
            if viewer is None and stats and "window" in stats and stats["elapsed_s"] != shown:
                shown = stats["elapsed_s"]
                click.echo(_row(stats))
            if viewer is not None and viewer.poll() is not None:
                click.echo("(`nodemesh stat` exited; showing the load generator's view)")
                click.echo(HEADER)
                viewer = None
    finally:
        if viewer is not None:
            viewer.terminate()
            try:
                viewer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                viewer.kill()
                viewer.wait(timeout=5)


def _summary(final: dict[str, Any] | None, started: float) -> str:
    took = time.monotonic() - started
    if not final or not final.get("sent"):
        return f"demo: no requests completed; everything torn down in a {took:.0f}s run"
    lat = final.get("latency_ms", {})
    return (
        f"demo: {final['sent']} requests, {final['ok']} ok "
        f"({100.0 * final['ok'] / final['sent']:.2f}%), p50 {lat.get('p50', 0):.2f} ms, "
        f"p99 {lat.get('p99', 0):.2f} ms; everything torn down after {took:.0f}s"
    )


@click.command("demo")
@click.option(
    "--hosts",
    default=3,
    show_default=True,
    type=click.IntRange(2, 40),
    help="agent hosts h1..hN (web on h2..hN, shop on h1 and h2)",
)
@click.option(
    "--duration",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="seconds to run; 0 = until Ctrl-C",
)
@click.option(
    "--rate",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="requests per second from h1 to shop",
)
@click.option(
    "--servers",
    default=3,
    show_default=True,
    type=click.IntRange(1, 5),
    help="Consul servers c1..cN",
)
@click.option(
    "--mesh/--no-mesh",
    default=True,
    show_default=True,
    help="--no-mesh: Consul and the apps only, no controller or agents",
)
@click.option("--keep", is_flag=True, help="keep the lab's logs and configs after teardown")
def demo(hosts: int, duration: float, rate: float, servers: int, mesh: bool, keep: bool) -> None:
    """Run a whole mesh on this machine in network namespaces, with live traffic (needs root)."""
    if os.geteuid() != 0:
        raise click.ClickException("the demo creates network namespaces: run it as root (sudo)")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _on_stop_signal)
    # SIGINT too: a process started in the background of a script inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, _on_stop_signal)
    final: dict[str, Any] | None = None
    spec = demo_spec(hosts, servers, mesh)
    if keep:
        spec = replace(spec, keep_workdir=True)
    try:
        with Lab(spec, progress=_say) as lab:
            for service, table in ROUTES.items():
                lab.consul_api("ctl", f"/v1/kv/nodemesh/routes/{service}", method="PUT", body=table)
            _say(f"route tables in Consul KV nodemesh/routes/: {', '.join(ROUTES)}")
            shop = lab.app_url("h2", "shop")
            _say(f"starting load on h1 -> {shop} at {rate:g} rps")
            load = lab.start_load(
                "h1",
                shop,
                duration=duration or FOREVER,
                rate=rate,
                concurrency=max(2, int(rate // 50)),
            )
            what = f"for {duration:g}s" if duration else "until Ctrl-C"
            _say(f"demo running {what}; logs in {lab.dir}")
            try:
                _watch(lab, load, duration, mesh and _has_stat(lab))
            except KeyboardInterrupt:
                click.echo("")
            load.process.stop()
            final = load.stats()
    except KeyboardInterrupt:
        click.echo("\ndemo: interrupted before any numbers; everything torn down")
        sys.exit(0)
    except LabError as e:
        raise click.ClickException(str(e)) from None
    click.echo(_summary(final, started))


if __name__ == "__main__":
    demo()
