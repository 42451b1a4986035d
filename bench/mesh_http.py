"""The data-path benchmark: every workload, on every path, in rounds, in one run.

    sudo .venv/bin/python bench/mesh_http.py [--rounds 3] [--quick] [--workloads c1,open,...]

One lab (namespace hosts c1, ctl, h1, h2; a real Consul with Connect enabled; the controller;
nodemesh agents on h1 and h2) and the upstreams on h2, each its own Consul service with a
Connect sidecar (``peers.UPSTREAMS``): nginx (HTTP/1.1, and h2c on a second port), a gRPC
echo, a bulk TCP sink and a stock ``http.server``.  From h1 the paths of ``workloads.py``
(direct, nodemesh, consul-connect, haproxy where it applies) are measured in turn:

    c1, c16   closed loop HTTP/1.1 to nginx, wrk -c1 / -c16
    open      open loop HTTP/1.1 to nginx at fixed rates, h2load --h1 --rps, per-request log
    bulk      one opaque TCP transfer (1 GiB) to the sink, timed to the sink's answer
    h2        HTTP/2 (h2c prior knowledge) to nginx, h2load -c10 -m10
    grpc      gRPC unary calls to the echo server, grpcio, a fixed number in flight
    memory    the proxies' RSS with 1,000 idle keep-alive connections through them
    pieces    closed loop -c1 to http.server, which writes head and body in two writes

A round runs every point once, the paths of a point one after the other; the tables show
medians over rounds.  Every number of every round goes to a JSON file, and a plot of the
open-loop latency percentiles at 1,000 req/s beside it.  ``--profile`` adds a py-spy profile of
both agents under the c16 load afterwards (sampling slows the agent: not part of the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import loadgen
import peers
import pyspy
import source
import summary
import workloads
from measure import (
    BenchError,
    Watch,
    loadavg,
    parse_wrk,
    run_wrk,
    usage_dicts,
    wait_quiet,
    wrk_argv,
)
from workloads import CONNECT, FLOORS, HAPROXY, NODEMESH, WORKLOADS, Bench, Route

import nodemesh
from nodemesh.lab.consul import find_binary
from nodemesh.lab.mesh import Lab, LabSpec
from nodemesh.lab.netns import LabError, Process

HERE = Path(__file__).resolve().parent
QUIET_LOAD = 1.5  # 1-minute load average under which the machine counts as quiet
PLOT_RATE = 1000  # req/s: the open-loop point the plot shows
GIB = 1 << 30


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check_running(procs: Sequence[Process]) -> None:
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


def set_up(lab: Lab, args: argparse.Namespace, consul: Path, stack: contextlib.ExitStack) -> Bench:
    """Every upstream on h2 registered with its sidecar, Consul's proxies and haproxy on h1."""
    for name in ("wrk_report.lua", "apps.py", "floor.py"):
        shutil.copyfile(HERE / name, lab.dir / name)
        (lab.dir / name).chmod(0o644)
    io = lab.dir / "bench-io"
    io.mkdir(exist_ok=True)
    io.chmod(0o1777)  # clients run as root or as the agent's uid
    ups = peers.UPSTREAMS
    say("starting the upstreams on h2: nginx (HTTP/1.1 and h2c), grpc echo, sink, http.server")
    procs = {"nginx": peers.start_nginx(lab, "h2")}
    procs["h2c"] = procs["nginx"]
    for key, cmd in (("grpc", "grpc-server"), ("sink", "sink"), ("pieces", "pieces")):
        procs[key] = peers.start_app(lab, "h2", lab.dir / "apps.py", cmd, ups[key].port)
    for p in {id(p): p for p in procs.values()}.values():
        stack.callback(p.stop)
    say(f"registering {', '.join(u.service for u in ups.values())} with Connect sidecars")
    for up in ups.values():
        peers.register(lab, "h2", up, sidecar=True)
    for up in ups.values():
        wait_passing(lab, "h2", up.service)
    check_running(list(procs.values()))
    say("starting Consul's proxies (a sidecar per upstream on h2, one proxy on h1)")
    sidecars, client = peers.start_connect_proxies(lab, consul, list(ups.values()))
    for p in [client, *sidecars.values()]:
        stack.callback(p.stop)
    by_service = {up.service: key for key, up in ups.items()}
    connect = {"connect-proxy@h1": [client.pid]}
    connect |= {f"connect-sidecar-{by_service[s]}@h2": [p.pid] for s, p in sidecars.items()}
    proxies: dict[str, dict[str, list[int]]] = {
        workloads.DIRECT: {},
        NODEMESH: {f"agent@{h}": [lab.agents[h].pid] for h in ("h1", "h2")},
        CONNECT: connect,
    }
    if not args.no_haproxy:
        hap = peers.start_haproxy(lab, "h1", f"{lab.host_ip('h2')}:{peers.PORT}")
        stack.callback(hap.stop)
        proxies[HAPROXY] = {"haproxy@h1": workloads.pids_of(hap)}
    if not args.no_floor:
        say("starting the trio floors: floor.py's mTLS relays on h1 and h2, L4 and HTTP/1.1")
        for contender, hop in FLOORS.items():
            fout, fin = peers.start_floor(lab, lab.dir / "floor.py", hop)
            stack.callback(fout.stop)
            stack.callback(fin.stop)
            proxies[contender] = {f"{contender}@h1": [fout.pid], f"{contender}@h2": [fin.pid]}
    label = {"nginx": "nginx@h2", "h2c": "nginx@h2", "grpc": "grpc-echo@h2", "sink": "sink@h2"}
    label["pieces"] = "http.server@h2"
    apps = {k: {label[k]: workloads.pids_of(p)} for k, p in procs.items()}
    routes = workloads.routes(lab, not args.no_haproxy)
    if args.no_floor:
        routes = {k: r for k, r in routes.items() if r.contender not in FLOORS}
    return Bench(lab, args, lab.dir / "apps.py", io, routes, proxies, apps)


def prove_all(bench: Bench, chosen: Sequence[str]) -> dict[tuple[str, str], str]:
    """Prove every path the chosen workloads take; the ones that failed, with the reason."""
    unusable: dict[tuple[str, str], str] = {}
    for name in chosen:
        w = WORKLOADS[name]
        for c in w.contenders:
            key = (w.upstream, c)
            route = bench.routes.get(key)
            if route is None or key in bench.proven or key in unusable:
                continue
            say(f"proving {route.name}: {route.what}")
            try:
                workloads.prove(bench, route)
            except BenchError as e:
                say(f"    SKIPPED: {e}")
                unusable[key] = str(e)
    return unusable


def brief(name: str, r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"FAILED: {r['error'][:300]}"
    if name == "bulk":
        return f"{r['mib_per_s']:,.0f} MiB/s ({r['seconds']:.2f}s)"
    if name == "memory":
        return f"{r['connections']['open']} open; RSS {r['rss_mib_held']} MiB"
    lat = r["latency_ms"]
    return (
        f"{r['rps']:,.0f} req/s, p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms, "
        f"{r['error_count']} errors; other cores {r['cpu']['other_cores']}"
    )


def run_rounds(bench: Bench, args: argparse.Namespace, out: dict[str, Any]) -> None:
    unusable = prove_all(bench, args.workloads)
    out["skipped_paths"] = {f"{c}/{u}": why for (u, c), why in unusable.items()}
    out["idle_rss_mib"] = {
        label: v
        for groups in bench.proxies.values()
        for label, v in workloads.rss_mib(groups).items()
    }
    say(f"idle RSS (MiB), before any load: {out['idle_rss_mib']}")
    results: list[dict[str, Any]] = out["results"]
    for rnd in range(1, args.rounds + 1):
        for name in args.workloads:
            w = WORKLOADS[name]
            for setting in w.settings(args):
                for c in w.contenders:
                    route = bench.routes.get((w.upstream, c))
                    if route is None:
                        continue
                    tag = f"round {rnd}/{args.rounds} {name} {setting} {c}"
                    row: dict[str, Any] = {"round": rnd, "workload": name, "setting": setting,
                                           "contender": c, "path": route.what}  # fmt: skip
                    why = unusable.get((w.upstream, c))
                    if why:
                        row["error"] = f"skipped: the path was not usable ({why})"
                    else:
                        say(f"{tag}: measuring")
                        try:
                            row |= w.measure(bench, route, setting)
                        except BenchError as e:
                            row["error"] = str(e)
                    say(f"{tag}: {brief(name, row)}")
                    results.append(row)
            check_running([*bench.lab.agents.values()])


def find_py_spy() -> str:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    return spy


def profile(lab: Lab, route: Route, args: argparse.Namespace) -> dict[str, Any]:
    """py-spy on both agents for ``--profile-seconds`` while wrk drives the nodemesh path."""
    spy = find_py_spy()
    secs = args.profile_seconds
    load_secs = secs + 6.0
    if args.profile_load == "open":  # PLOT_RATE req/s open loop, as the open workload offers it
        argv = loadgen.h2load_argv(route.url, clients=10, duration=load_secs, h1=True,
                                   log_file="/dev/null", rps_per_client=PLOT_RATE / 10)  # fmt: skip
    else:
        argv = wrk_argv(route.url, threads=args.threads, connections=16, duration=load_secs,
                        script=lab.dir / "wrk_report.lua")  # fmt: skip
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            out = run_wrk(lab, "h1", argv, load_secs, route.user)
            if args.profile_load != "open":
                box["wrk"] = parse_wrk(out)
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
    report: dict[str, Any] = {"seconds": secs, "rate_hz": 100, "load": args.profile_load}
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
        "h2load": peers.version([peers.binary("h2load"), "--version"]),
        "grpcio": importlib.metadata.version("grpcio"),
        "nginx": peers.version([peers.binary("nginx"), "-v"]),
        "haproxy": peers.version([peers.binary("haproxy"), "-v"]),
        "consul": peers.version([str(consul), "version"]),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {','.join(WORKLOADS)} (default: all)")  # fmt: skip
    ap.add_argument("--rounds", type=int, help="rounds over every point (default 3)")
    ap.add_argument("--duration", type=float, help="seconds measured per point (default 5)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up per point (default 2)")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke test: 1 round, 2 s points, 256 MiB bulk"
    )
    ap.add_argument("--rates", default="200,1000,2000", help="open-loop req/s, comma-separated")
    ap.add_argument("--bulk-bytes", type=int, help="bytes of the bulk transfer (default 1 GiB)")
    ap.add_argument("--grpc-concurrency", type=int, default=10, help="gRPC calls in flight")
    ap.add_argument("--memory-connections", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--no-haproxy", action="store_true", help="skip the haproxy reference")
    ap.add_argument("--no-floor", action="store_true", help="skip the trio floors (floor.py)")
    ap.add_argument("--profile", action="store_true", help="py-spy both agents afterwards")
    ap.add_argument("--profile-seconds", type=float, default=10.0)
    ap.add_argument(
        "--profile-load",
        choices=("c16", "open"),
        default="c16",
        help=f"the load while profiling: wrk -c16, or {PLOT_RATE} req/s open loop",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        help=f"wait up to this many seconds for load average <= {QUIET_LOAD} "
        "(default 300, 0 with --quick)",
    )
    ap.add_argument(
        "--rev",
        default="HEAD",
        help="the nodemesh commit to measure (exported with git archive), or 'worktree'",
    )
    ap.add_argument("--keep", action="store_true", help="keep the lab's logs and configs")
    ap.add_argument("--out", type=Path, help="the JSON result file (default: bench/results/)")
    args = ap.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("rounds", 3, 1), ("duration", 5.0, 2.0), ("warmup", 2.0, 1.0),
        ("bulk_bytes", GIB, GIB // 4), ("wait_quiet", 300.0, 0.0),
    ):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        ap.error(f"--workloads {unknown or 'empty'}: choose from {','.join(WORKLOADS)}")
    try:
        args.rates = [int(r) for r in args.rates.split(",")]
    except ValueError:
        ap.error(f"--rates {args.rates!r} is not comma-separated integers")
    if not all(10 <= r <= 100_000 for r in args.rates):
        ap.error("--rates must be within 10..100000 req/s")
    for name in ("duration", "warmup", "profile_seconds"):
        if not 0 < getattr(args, name) <= 600:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be in (0, 600]")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be within 1..20")
    if not 1 << 10 <= args.bulk_bytes <= 16 * GIB:
        ap.error("--bulk-bytes must be within 1 KiB..16 GiB")
    if not 1 <= args.memory_connections <= 10_000 or not 1 <= args.grpc_concurrency <= 1000:
        ap.error("need 1 <= --memory-connections <= 10000 and 1 <= --grpc-concurrency <= 1000")
    if not 1 <= args.threads <= 16:
        ap.error("need 1 <= --threads <= 16")
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = HERE / "results" / f"mesh_http-{stamp}.json"
    return args


def check_bench_extra(profile: bool = False) -> str:
    """ "" when grpcio and matplotlib import (and py-spy is installed for ``--profile``), else
    the one sentence that says how to fix it: before the run, not 15 minutes into it."""
    missing = []
    for mod in ("grpc", "matplotlib"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if profile:
        try:
            find_py_spy()
        except BenchError:
            missing.append("py-spy")
    if not missing:
        return ""
    return (
        f"bench/mesh_http.py: {' and '.join(missing)} missing; install the benchmark's extra "
        "with .venv/bin/pip install -e '.[bench]'"
    )


def main(argv: Sequence[str] | None = None, progress: Callable[[str], None] = say) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bench/mesh_http.py: must run as root (it builds network namespaces)", file=sys.stderr
        )
        return 1
    problem = check_bench_extra(args.profile)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    source.reexec_at(
        args.rev, Path(__file__).resolve(), argv
    )  # returns only when already running the chosen code
    try:
        return run(args, progress)
    finally:
        source.cleanup()


def lab_spec(consul: Path, keep: bool) -> LabSpec:
    """With Connect enabled; an old revision's LabSpec has no consul_config: wrap instead."""
    if "consul_config" in {f.name for f in dataclasses.fields(LabSpec)}:
        return LabSpec(servers=1, hosts=2, consul_binary=consul, keep_workdir=keep,
                       consul_config=peers.CONSUL_CONNECT)  # fmt: skip
    peers.enable_connect_in_lab_consul()
    return LabSpec(servers=1, hosts=2, consul_binary=consul, keep_workdir=keep)


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
    started = time.monotonic()
    try:
        with (
            Lab(lab_spec(consul, args.keep), progress=progress) as lab,
            contextlib.ExitStack() as stack,
        ):
            bench = set_up(lab, args, consul, stack)
            run_rounds(bench, args, out)
            if args.profile:
                out["profile"] = profile(lab, bench.routes["nginx", NODEMESH], args)
    finally:
        out["loadavg_at_end"] = loadavg()
        out["wall_s"] = round(time.monotonic() - started, 1)
        med = summary.medians(out["results"])
        out["medians"] = [
            {"workload": w, "setting": s, "contender": c, **m} for (w, s, c), m in med.items()
        ]
        plot = args.out.with_name(f"{args.out.stem}-open{PLOT_RATE}.png")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if summary.plot_open_loop(med, PLOT_RATE, plot):
            out["plot"] = plot.name
            progress(f"plot written to {plot}")
        args.out.write_text(json.dumps(out, indent=2) + "\n")
        progress(f"results written to {args.out} ({out['wall_s']:.0f} s)")
    print(summary.tables(med, out.get("idle_rss_mib", {})))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as e:
        print(f"bench/mesh_http.py: {e}", file=sys.stderr)
        sys.exit(1)
