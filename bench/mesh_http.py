"""The HTTP data-path benchmark: direct, nodemesh, Consul Connect and haproxy in one run.

    sudo .venv/bin/python bench/mesh_http.py [--duration 10] [--connections 16] [--profile]

One lab (namespace hosts c1, ctl, h1, h2; a real Consul with Connect enabled; the controller;
nodemesh agents on h1 and h2), nginx on h2 registered in Consul as ``bench``, and wrk on h1
measuring one path after the other, each after a warm-up with the same settings:

    direct     wrk (as the agent's uid, so not intercepted) -> nginx
    nodemesh   wrk (root) -> iptables -> agent h1 -> mTLS -> agent h2 -> nginx   (L7, HTTP/1.1)
    connect    wrk -> Consul's proxy on h1 -> mTLS -> Consul's sidecar on h2 -> nginx   (L4)
    haproxy    wrk -> haproxy on h1 -> nginx   (L7, one hop, no TLS; a reference point)

Before each measurement a request proves the path: nginx echoes the address it was reached
from and the caller identity nodemesh's inbound agent adds.  For each path the result holds
wrk's req/s, latency percentiles and errors, and the CPU seconds and peak RSS of the proxies
(and nginx) during the measured run.  ``--profile`` adds a py-spy profile of both agents under
the same load (not part of the table: sampling slows the agent).  A table goes to stdout and
everything to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import peers
import pyspy
import source
from measure import (
    BenchError,
    Watch,
    children,
    loadavg,
    parse_wrk,
    run_wrk,
    usage_dicts,
    wait_quiet,
    wrk_argv,
)

import nodemesh
from nodemesh.lab.consul import find_binary
from nodemesh.lab.mesh import NODEMESH_USER, Lab, LabSpec
from nodemesh.lab.netns import LabError, Process

HERE = Path(__file__).resolve().parent
PATH_TIMEOUT = 60.0  # seconds for a path to start answering (a Connect sidecar's first check)
QUIET_LOAD = 1.5  # 1-minute load average under which the machine counts as quiet


@dataclass(frozen=True)
class Route:
    """One path through the lab, and how to recognise that a request took it."""

    name: str
    what: str
    url: str
    user: str | None  # wrk's user on h1 (None: root, which interception catches)
    peer: str  # the address nginx must see the connection come from
    identity: bool  # whether nodemesh's inbound agent must have added a caller identity


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def probe(lab: Lab, route: Route) -> tuple[int, dict[str, str]]:
    """One curl through ``route`` from h1: the status and the response headers."""
    argv = ["curl", "-sS", "-i", "--max-time", "3", route.url]
    p = lab.exec("h1", argv, user=route.user, check=False, timeout=10.0)
    head = p.stdout.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
    status = int(head[0].split()[1]) if head and len(head[0].split()) > 1 else 0
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


def wait_route(lab: Lab, route: Route) -> dict[str, str]:
    """Bounded: until a request through ``route`` reaches nginx the way the route says."""
    deadline = time.monotonic() + PATH_TIMEOUT
    seen: tuple[int, dict[str, str]] = (0, {})
    while time.monotonic() < deadline:
        seen = probe(lab, route)
        status, h = seen
        identity = h.get("x-bench-client-id", "").startswith("spiffe://")
        if status == 200 and h.get("x-bench-peer") == route.peer and identity == route.identity:
            return h
        time.sleep(0.5)
    raise BenchError(
        f"{route.name}: {route.url} from h1 did not take the expected path within "
        f"{PATH_TIMEOUT:g}s (want peer {route.peer}, identity {route.identity}; last answer "
        f"{seen[0]} {seen[1]}); see the logs in {lab.dir}"
    )


def measure(
    lab: Lab, route: Route, args: argparse.Namespace, groups: dict[str, list[int]]
) -> dict[str, Any]:
    headers = wait_route(lab, route)
    script = lab.dir / "wrk_report.lua"

    def wrk(duration: float) -> list[str]:
        t, c = args.threads, args.connections
        return wrk_argv(route.url, threads=t, connections=c, duration=duration, script=script)

    say(f"{route.name}: warm-up {args.warmup:g}s")
    warm = parse_wrk(run_wrk(lab, "h1", wrk(args.warmup), args.warmup, route.user))
    say(f"{route.name}: measuring {args.duration:g}s ({route.what})")
    load_before = loadavg()
    with Watch(groups) as watch:
        res = parse_wrk(run_wrk(lab, "h1", wrk(args.duration), args.duration, route.user))
    load_after = loadavg()
    lat = res.latency_ms
    cpu = watch.cpu_summary()
    say(
        f"{route.name}: {res.rps:,.0f} req/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
        f"{res.error_count} errors; cores busy: machine {cpu['machine_cores_busy']}, "
        f"wrk {cpu['wrk_cores']}, watched {cpu['watched_cores']}, other {cpu['other_cores']} "
        f"(machine by kind: {cpu['machine_cores_by_kind']})"
    )
    for other in watch.busiest_others:
        say(f"    also busy: {other['cpu_s']}s pid {other['pid']} {other['command'][:100]}")
    return {
        "name": route.name,
        "path": route.what,
        "url": route.url,
        "wrk_user": route.user or "root",
        "wrk_argv": wrk(args.duration),
        "checked_headers": {k: v for k, v in headers.items() if k.startswith("x-bench-")},
        "rps": round(res.rps, 1),
        "requests": res.requests,
        "duration_s": round(res.duration_s, 3),
        "latency_ms": {k: round(v, 3) for k, v in lat.items()},
        "errors": res.errors,
        "error_count": res.error_count,
        "warmup": {"rps": round(warm.rps, 1), "error_count": warm.error_count},
        # CPU per request holds up better than req/s when the machine is shared.
        "processes": [
            {**u, "cpu_us_per_request": round(1e6 * u["cpu_s"] / max(res.requests, 1), 1)}
            for u in usage_dicts(watch.usage)
        ],
        "cpu": watch.cpu_summary(),
        "busiest_other_processes": watch.busiest_others,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "wrk_text": res.text,
    }


def pids(proc: Process) -> list[int]:
    return [proc.pid, *children(proc.pid)]


def check_running(procs: Sequence[Process], lab: Lab) -> None:
    for p in procs:
        if not p.running:
            raise BenchError(
                f"{p.name} on {p.host.name} exited ({p.popen.returncode}); see {p.log_path}"
            )


def wait_passing(lab: Lab, host: str, service: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not peers.passing(lab, host, service):
        if time.monotonic() >= deadline:
            raise BenchError(f"{service} not passing in Consul within {timeout:g}s")
        time.sleep(0.2)


def run_all(lab: Lab, args: argparse.Namespace, consul: Path, out: dict[str, Any]) -> None:
    h1, h2 = lab.host_ip("h1"), lab.host_ip("h2")
    shutil.copyfile(HERE / "wrk_report.lua", lab.dir / "wrk_report.lua")
    (lab.dir / "wrk_report.lua").chmod(0o644)
    upstream = f"http://{h2}:{peers.PORT}/"
    agents = {f"agent@{h}": [lab.agents[h].pid] for h in ("h1", "h2")}
    with contextlib.ExitStack() as stack:
        say("starting nginx on h2 and registering it as `bench`")
        nginx = peers.start_nginx(lab, "h2")
        stack.callback(nginx.stop)
        service_id = peers.register(lab, "h2", sidecar=False)
        wait_passing(lab, "h2", peers.SERVICE)
        check_running([nginx], lab)
        web = {"nginx@h2": pids(nginx)}
        results: list[dict[str, Any]] = out["results"]

        direct = Route("direct", "wrk -> nginx", upstream, NODEMESH_USER, h1, False)
        results.append(measure(lab, direct, args, web))

        mesh = Route(
            "nodemesh", "wrk -> agent h1 -> mTLS -> agent h2 -> nginx", upstream, None, h2, True
        )
        results.append(measure(lab, mesh, args, {**agents, **web}))

        say("enabling a Connect sidecar for `bench`; starting Consul's proxies")
        peers.register(lab, "h2", sidecar=True)
        proxies = peers.start_connect_proxies(lab, consul, service_id)
        for p in proxies:
            stack.callback(p.stop)
        connect_url = f"http://127.0.0.1:{peers.CONNECT_UPSTREAM_PORT}/"
        connect = Route(
            "consul-connect",
            "wrk -> consul proxy h1 -> mTLS -> sidecar h2 -> nginx",
            connect_url,
            None,
            h2,
            False,
        )
        groups = {f"connect-proxy@{p.host.name}": [p.pid] for p in reversed(proxies)}
        results.append(measure(lab, connect, args, {**groups, **web}))
        check_running(proxies, lab)

        if not args.no_haproxy:
            hap = peers.start_haproxy(lab, "h1", f"{h2}:{peers.PORT}")
            stack.callback(hap.stop)
            hap_url = f"http://127.0.0.1:{peers.HAPROXY_PORT}/"
            route = Route("haproxy", "wrk -> haproxy h1 -> nginx", hap_url, None, h1, False)
            results.append(measure(lab, route, args, {"haproxy@h1": pids(hap), **web}))

        if args.profile:
            out["profile"] = profile(lab, mesh, args)


def profile(lab: Lab, route: Route, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on both agents for ``--profile-seconds`` while wrk drives the nodemesh path."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    secs = args.profile_seconds
    load_secs = secs + 6.0
    script = lab.dir / "wrk_report.lua"
    argv = wrk_argv(
        route.url,
        threads=args.threads,
        connections=args.connections,
        duration=load_secs,
        script=script,
    )
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["wrk"] = parse_wrk(run_wrk(lab, "h1", argv, load_secs, route.user))
        except LabError as e:
            box["error"] = e

    say(f"profiling both agents with py-spy for {secs:g}s under the nodemesh load")
    t = threading.Thread(target=load, name="profile-load", daemon=True)
    t.start()
    time.sleep(2.0)
    raw = {h: args.out.with_name(f"{args.out.stem}-pyspy-{h}.txt") for h in ("h1", "h2")}
    spies = {
        h: subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(lab.agents[h].pid),
                "--duration",
                f"{secs:g}",
                "--rate",
                "100",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for h, path in raw.items()
    }
    report: dict[str, Any] = {"seconds": secs, "rate_hz": 100}
    errs: dict[str, bytes] = {}
    # CPU over the sampled window: py-spy counts a runnable thread waiting for a CPU as busy,
    # so the agent's real CPU time tells how much of "busy" was run-queue time.
    with Watch({f"agent@{h}": [lab.agents[h].pid] for h in spies}) as watch:
        for h, sp in spies.items():
            try:
                errs[h] = sp.communicate(timeout=secs + 30.0)[1]
            except subprocess.TimeoutExpired:
                sp.kill()
                errs[h] = sp.communicate(timeout=5.0)[1]
    report["processes"] = usage_dicts(watch.usage)
    for h, sp in spies.items():
        err = errs[h]
        if sp.returncode != 0 or not raw[h].exists():
            raise BenchError(f"py-spy on agent@{h} failed ({sp.returncode}): {err.decode()[-300:]}")
        with raw[h].open() as f:
            report[f"agent@{h}"] = {"raw_file": raw[h].name, **pyspy.report(pyspy.summarize(f))}
    t.join(timeout=load_secs + 40.0)
    if "error" in box:
        raise BenchError(f"the load during profiling failed: {box['error']}")
    if "wrk" in box:
        report["rps_while_profiling"] = round(box["wrk"].rps, 1)
    return report


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def versions(consul: Path) -> dict[str, str]:
    rev, _ = source.current()
    return {
        "nodemesh": f"{importlib.metadata.version('nodemesh')} at {rev}",
        "nodemesh_source": str(Path(nodemesh.__file__).parent),
        "python": platform.python_version(),
        "wrk": peers.version([peers.binary("wrk"), "-v"]),
        "nginx": peers.version([peers.binary("nginx"), "-v"]),
        "haproxy": peers.version([peers.binary("haproxy"), "-v"]),
        "consul": peers.version([str(consul), "version"]),
    }


def table(results: Sequence[dict[str, Any]]) -> str:
    """One line per path; "other" is the cores busy outside wrk and the measured processes."""
    head = f"{'path':<15} {'req/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'errors':>6} "
    lines = [head + f"{'other':>6}  process: CPU s, CPU per request, max RSS"]
    for r in results:
        lat = r["latency_ms"]
        procs = "; ".join(
            f"{p['label']} {p['cpu_s']:.1f}s {p['cpu_us_per_request']:.0f}us/req "
            f"{p['max_rss_mib']:.0f}MiB"
            for p in r["processes"]
        )
        lines.append(
            f"{r['name']:<15} {r['rps']:>9,.0f} {lat['p50']:>7.2f} {lat['p90']:>7.2f} "
            f"{lat['p99']:>7.2f} {r['error_count']:>6} {r['cpu']['other_cores']:>6.2f}  {procs}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per path")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per path")
    ap.add_argument("--connections", type=int, default=16, help="wrk -c")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--no-haproxy", action="store_true", help="skip the haproxy reference")
    ap.add_argument("--profile", action="store_true", help="py-spy both agents afterwards")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        help=f"wait up to this many seconds for load average <= {QUIET_LOAD}",
    )
    ap.add_argument(
        "--rev",
        default="HEAD",
        help="the nodemesh commit to measure (exported with git archive), or 'worktree'",
    )
    ap.add_argument("--keep", action="store_true", help="keep the lab's logs and configs")
    ap.add_argument("--out", type=Path, help="the JSON result file (default: bench/results/)")
    args = ap.parse_args(argv)
    for name in ("duration", "warmup", "profile_seconds"):
        if not 0 < getattr(args, name) <= 600:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be in (0, 600]")
    if not 1 <= args.threads <= args.connections <= 10_000:
        ap.error("need 1 <= --threads <= --connections <= 10000")
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = HERE / "results" / f"mesh_http-{stamp}.json"
    return args


def main(argv: Sequence[str] | None = None, progress: Callable[[str], None] = say) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench/mesh_http.py: must run as root (it builds network namespaces)", file=sys.stderr
        )
        return 1
    source.reexec_at(
        args.rev, Path(__file__).resolve(), argv
    )  # returns only when already running the chosen code
    try:
        return run(args, progress)
    finally:
        source.cleanup()


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> int:
    rev, _ = source.current()
    progress(f"measuring nodemesh {rev} from {Path(nodemesh.__file__).parent}")
    peers.ensure_packages(progress)
    # From the work tree's cache: an exported revision has no downloaded Consul of its own.
    consul = find_binary(source.REPO)
    load_start, quiet = wait_quiet(QUIET_LOAD, args.wait_quiet, progress)
    out: dict[str, Any] = {
        "benchmark": "mesh_http",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(consul),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_at_start": load_start,
        "quiet_at_start": quiet,
        "results": [],
    }
    peers.enable_connect_in_lab_consul()
    spec = LabSpec(servers=1, hosts=2, consul_binary=consul, keep_workdir=args.keep)
    try:
        with Lab(spec, progress=progress) as lab:
            run_all(lab, args, consul, out)
    finally:
        out["loadavg_at_end"] = loadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        progress(f"results written to {args.out}")
    print(table(out["results"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as e:
        print(f"bench/mesh_http.py: {e}", file=sys.stderr)
        sys.exit(1)
