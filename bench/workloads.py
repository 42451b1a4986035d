"""The benchmark's workloads: which paths each one takes, and how one point of it is measured.

A *point* is one workload, one setting (a rate, a connection count) and one path; a round runs
every point of every chosen workload once, the paths of a point one after the other, so a
disturbance on the shared machine lands on all paths of a round alike.  Each ``measure_*`` runs
one point and returns its numbers; a failure raises ``BenchError`` and the driver records it.

Paths ("contenders") to each upstream on h2 (``peers.UPSTREAMS``), all driven from h1:

    direct          the client runs as the agent's uid, which interception leaves alone
    nodemesh        the client runs as root: iptables -> agent h1 -> mTLS -> agent h2 -> app
    consul-connect  to Consul's proxy on h1's loopback -> mTLS -> the app's sidecar on h2
    haproxy         to haproxy on h1's loopback (HTTP/1.1 to nginx only) -> nginx
    trio-l4         to floor.py's relay on h1's loopback -> mTLS -> its relay on h2 -> app: the
                    least a hop under trio can do (nginx and the sink only)
    trio-h1         the same through floor.py's HTTP/1.1 relays (--hop h1): each also parses and
                    re-frames every request and response with the agents' codec, the least an
                    L7 hop under trio can do (nginx only)

Before a path is first measured, a request must show it reaches the app the way it says
(``prove``): from the address the app sees, and with the caller identity nodemesh's inbound
agent adds, or none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadgen
import peers
from measure import (
    BenchError,
    Watch,
    children,
    parse_wrk,
    rss_bytes,
    run_wrk,
    usage_dicts,
    wrk_argv,
)

from nodemesh.lab.mesh import NODEMESH_USER, Lab
from nodemesh.lab.netns import Process, spawn

PROVE_TIMEOUT = 60.0  # seconds for a path to start answering (a Connect sidecar's first check)
DIRECT, NODEMESH, CONNECT, HAPROXY = "direct", "nodemesh", "consul-connect", "haproxy"
FLOOR, FLOOR_H1 = "trio-l4", "trio-h1"
FLOORS = {FLOOR: "l4", FLOOR_H1: "h1"}  # contender -> floor.py --hop
CONTENDERS = (DIRECT, NODEMESH, CONNECT, HAPROXY, FLOOR, FLOOR_H1)


@dataclass(frozen=True)
class Route:
    """One path from h1 to one upstream, and how to recognise that a connection took it."""

    contender: str
    upstream: str  # a key of peers.UPSTREAMS
    what: str
    target: str  # ip:port the client connects to
    user: str | None  # the client's user on h1 (None: root, which interception catches)
    peer: str  # the address the upstream must see the connection come from
    identity: bool  # whether nodemesh's inbound agent must have added a caller identity

    @property
    def url(self) -> str:
        return f"http://{self.target}/"

    @property
    def name(self) -> str:
        return f"{self.contender}/{self.upstream}"


def routes(lab: Lab, haproxy: bool) -> dict[tuple[str, str], Route]:
    h1, h2 = lab.host_ip("h1"), lab.host_ip("h2")
    out: dict[tuple[str, str], Route] = {}
    for key, up in peers.UPSTREAMS.items():
        app = f"{h2}:{up.port}"
        out[key, DIRECT] = Route(DIRECT, key, f"h1 -> {key}", app, NODEMESH_USER, h1, False)
        out[key, NODEMESH] = Route(
            NODEMESH, key, f"h1 -> agent h1 -> mTLS -> agent h2 -> {key}", app, None, h2, True
        )
        out[key, CONNECT] = Route(
            CONNECT,
            key,
            f"h1 -> consul proxy h1 -> mTLS -> sidecar h2 -> {key}",
            f"127.0.0.1:{up.connect_port}",
            None,
            h2,
            False,
        )
    for contender, hop in FLOORS.items():
        for key in peers.FLOOR_HOPS[hop]:
            out[key, contender] = Route(
                contender, key, f"h1 -> {hop} relay h1 -> mTLS -> {hop} relay h2 -> {key}",
                f"127.0.0.1:{peers.floor_port(key, hop)}", None, h2, False,
            )  # fmt: skip
    if haproxy:
        out["nginx", HAPROXY] = Route(
            HAPROXY, "nginx", "h1 -> haproxy h1 -> nginx", f"127.0.0.1:{peers.HAPROXY_PORT}",
            None, h1, False,
        )  # fmt: skip
    return out


@dataclass
class Bench:
    """What every point needs: the lab, the settings, the paths and the processes to watch."""

    lab: Lab
    args: Any  # the driver's argparse.Namespace
    apps: Path  # apps.py, copied where the agent's uid can read it
    io: Path  # a directory every client user can write its results to
    routes: dict[tuple[str, str], Route]
    proxies: dict[str, dict[str, list[int]]]  # contender -> label -> pids, for one upstream
    apps_by_upstream: dict[str, dict[str, list[int]]]  # upstream -> label -> pids
    proven: set[tuple[str, str]] = field(default_factory=set)
    _n: int = 0

    def groups(self, route: Route) -> dict[str, list[int]]:
        proxies = self.proxies.get(route.contender, {})
        if route.contender == CONNECT:  # the h1 proxy and this upstream's own sidecar
            side = f"connect-sidecar-{route.upstream}@h2"
            proxies = {k: v for k, v in proxies.items() if "sidecar" not in k or k == side}
        return {**proxies, **self.apps_by_upstream[route.upstream]}

    def io_file(self, stem: str) -> Path:
        self._n += 1
        return self.io / f"{self._n:04d}-{stem}"

    def python(self, *argv: str) -> list[str]:
        return [str(self.lab.spec.python), str(self.apps), *argv]


def pids_of(proc: Process) -> list[int]:
    return [proc.pid, *children(proc.pid)]


# --- proving a path ------------------------------------------------------------------------------


def _probe_http(bench: Bench, route: Route) -> str:
    """One curl through ``route``: "" when it took the path, else what it saw instead."""
    flags = ["--http2-prior-knowledge"] if route.upstream == "h2c" else []
    argv = ["curl", "-sS", "-i", "--max-time", "3", *flags, route.url]
    p = bench.lab.exec("h1", argv, user=route.user, check=False, timeout=10.0)
    head = p.stdout.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
    words = head[0].split() if head else []
    status = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
    h = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        h[k.strip().lower()] = v.strip()
    return _mismatch(route, status == 200, h.get("x-bench-peer", ""), h.get("x-bench-client-id"))


def _mismatch(route: Route, ok: bool, peer: str, identity: str | None) -> str:
    """ "" when the upstream saw what ``route`` promises; ``identity`` None: it cannot tell
    (an opaque byte stream carries no caller identity)."""
    has_id = (identity or "").startswith("spiffe://")
    if ok and peer == route.peer and (identity is None or has_id == route.identity):
        return ""
    return f"ok={ok} peer={peer!r} identity={identity!r}"


def _probe_sink(bench: Bench, route: Route) -> str:
    out = bench.io_file("probe-bulk.json")
    argv = bench.python("send", "--target", route.target, "--bytes", "65536", "--out", str(out))
    argv += ["--timeout", "3"]
    bench.lab.exec("h1", argv, user=route.user, check=False, timeout=15.0)
    try:
        run = loadgen.parse_bulk(out.read_text() if out.exists() else "")
    except BenchError as e:
        return str(e)
    return _mismatch(route, True, run.peer, None)


def _probe_grpc(bench: Bench, route: Route) -> str:
    try:
        run = _grpc_client(bench, route, concurrency=1, warmup=0.0, duration=0.2)
    except BenchError as e:
        return str(e)
    ids = run.peer.partition(" ")[2]
    return _mismatch(route, run.error_count == 0, loadgen.grpc_peer_ip(run.peer), ids)


def prove(bench: Bench, route: Route) -> None:
    """Bounded: until a request through ``route`` reaches its upstream the way it says."""
    if (route.upstream, route.contender) in bench.proven:
        return
    probe = {"sink": _probe_sink, "grpc": _probe_grpc}.get(route.upstream, _probe_http)
    deadline = time.monotonic() + PROVE_TIMEOUT
    seen = probe(bench, route)
    while seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = probe(bench, route)
    if seen:
        raise BenchError(
            f"{route.name}: {route.target} from h1 did not take the expected path within "
            f"{PROVE_TIMEOUT:g}s (want peer {route.peer}, identity {route.identity}; last: "
            f"{seen}); see the logs in {bench.lab.dir}"
        )
    bench.proven.add((route.upstream, route.contender))


# --- one point each ------------------------------------------------------------------------------


def _processes(watch: Watch, requests: int) -> list[dict[str, Any]]:
    # CPU per request holds up better than req/s when the machine is shared.
    return [
        {**u, "cpu_us_per_request": round(1e6 * u["cpu_s"] / max(requests, 1), 1)}
        for u in usage_dicts(watch.usage)
    ]


def _load(watch: Watch, requests: int) -> dict[str, Any]:
    return {"processes": _processes(watch, requests), "cpu": watch.cpu_summary()}


def measure_closed(bench: Bench, route: Route, connections: int) -> dict[str, Any]:
    """wrk -t1 -c``connections``: a warm-up, then the measured run."""
    a = bench.args
    script = bench.lab.dir / "wrk_report.lua"

    def argv(duration: float) -> list[str]:
        t = min(a.threads, connections)
        return wrk_argv(route.url, threads=t, connections=connections, duration=duration,
                        script=script)  # fmt: skip

    parse_wrk(run_wrk(bench.lab, "h1", argv(a.warmup), a.warmup, route.user))
    with Watch(bench.groups(route)) as watch:
        res = parse_wrk(run_wrk(bench.lab, "h1", argv(a.duration), a.duration, route.user))
    return {
        "argv": argv(a.duration),
        "rps": round(res.rps, 1),
        "requests": res.requests,
        "latency_ms": {k: round(v, 3) for k, v in res.latency_ms.items()},
        "errors": res.errors,
        "error_count": res.error_count,
        **_load(watch, res.requests),
    }


def _h2load(
    bench: Bench, route: Route, *, skip: float, duration: float, offered: float | None, **kw: Any
) -> tuple[loadgen.H2loadRun, Watch, list[str]]:
    log = bench.io_file(f"h2load-{route.contender}.log")
    argv = loadgen.h2load_argv(route.url, duration=skip + duration, log_file=str(log), **kw)
    with Watch(bench.groups(route)) as watch:
        stdout = run_wrk(bench.lab, "h1", argv, skip + duration, route.user)
    text = log.read_text() if log.exists() else ""
    if not bench.args.keep:  # with --keep, the per-request logs stay in the lab's directory
        log.unlink(missing_ok=True)
    run = loadgen.parse_h2load_log(
        text, skip_s=skip, duration_s=skip + duration, offered_rps=offered, stdout=stdout
    )
    return run, watch, argv


def _h2load_result(run: loadgen.H2loadRun, watch: Watch, argv: list[str]) -> dict[str, Any]:
    return {
        "argv": argv,
        "rps": round(run.rps, 1),
        "requests": run.ok,
        "latency_ms": {k: round(v, 3) for k, v in run.latency_ms.items()},
        "error_count": run.errors,
        "errors": {"status": run.bad_status, "missing": run.missing},
        "h2load_requests": run.summary,
        **_load(watch, run.ok),
    }


def measure_open(bench: Bench, route: Route, rate: int) -> dict[str, Any]:
    """h2load --h1 -c10 at ``rate`` req/s in all (--rps is per client), first second dropped."""
    clients = 10
    run, watch, argv = _h2load(
        bench, route, skip=1.0, duration=bench.args.duration, offered=float(rate),
        clients=clients, rps_per_client=rate / clients, h1=True,
    )  # fmt: skip
    return {"offered_rps": rate, **_h2load_result(run, watch, argv)}


def measure_h2(bench: Bench, route: Route, _: int) -> dict[str, Any]:
    """h2load -c10 -m10 over h2c prior knowledge, closed loop; the warm-up is dropped."""
    a = bench.args
    run, watch, argv = _h2load(
        bench, route, skip=a.warmup, duration=a.duration, offered=None, clients=10, streams=10
    )
    return _h2load_result(run, watch, argv)


def _grpc_client(
    bench: Bench, route: Route, *, concurrency: int, warmup: float, duration: float
) -> loadgen.GrpcRun:
    out = bench.io_file("grpc.txt")
    argv = bench.python(
        "grpc-client", "--target", route.target, "--concurrency", str(concurrency),
        "--warmup", f"{warmup:g}", "--duration", f"{duration:g}", "--out", str(out),
    )  # fmt: skip
    p = bench.lab.exec("h1", argv, user=route.user, check=False, timeout=warmup + duration + 60)
    if p.returncode != 0 or not out.exists():
        err = p.stderr.decode(errors="replace").strip()[-300:]
        raise BenchError(f"{route.name}: grpc-client exited {p.returncode}: {err}")
    text = out.read_text()
    out.unlink()
    return loadgen.parse_grpc_log(text)


def measure_grpc(bench: Bench, route: Route, concurrency: int) -> dict[str, Any]:
    a = bench.args
    with Watch(bench.groups(route)) as watch:
        run = _grpc_client(
            bench, route, concurrency=concurrency, warmup=a.warmup, duration=a.duration
        )
    return {
        "concurrency": concurrency,
        "rps": round(run.rps, 1),
        "requests": run.calls,
        "latency_ms": {k: round(v, 3) for k, v in run.latency_ms.items()},
        "errors": run.errors,
        "error_details": run.error_details,
        "error_count": run.error_count,
        "server_saw": run.peer,
        **_load(watch, run.calls),
    }


def measure_bulk(bench: Bench, route: Route, size: int) -> dict[str, Any]:
    out = bench.io_file("bulk.json")
    argv = bench.python("send", "--target", route.target, "--bytes", str(size), "--out", str(out))
    with Watch(bench.groups(route)) as watch:
        bench.lab.exec("h1", argv, user=route.user, check=False, timeout=600.0)
    run = loadgen.parse_bulk(out.read_text() if out.exists() else "")
    if run.peer != route.peer:
        raise BenchError(f"{route.name}: the sink saw {run.peer}, not {route.peer}")
    return {
        "bytes": run.bytes,
        "seconds": round(run.seconds, 3),
        "mib_per_s": round(run.mib_per_s, 1),
        "processes": [
            {**u, "cpu_s_per_gib": round(u["cpu_s"] * (1 << 30) / run.bytes, 2)}
            for u in usage_dicts(watch.usage)
        ],
        "cpu": watch.cpu_summary(),
    }


def rss_mib(groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    out = {}
    for label, pids in groups.items():
        try:
            out[label] = round(sum(rss_bytes(p) for p in pids) / (1 << 20), 1)
        except OSError:
            out[label] = 0.0
    return out


def open_fds(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return -1


def measure_memory(bench: Bench, route: Route, connections: int) -> dict[str, Any]:
    """The proxies' RSS idle, then with ``connections`` idle keep-alive connections held open
    through them (each answered once, so it is established end to end)."""
    groups = bench.proxies[route.contender]
    if route.contender == CONNECT:
        groups = {k: v for k, v in groups.items() if "sidecar" not in k or "nginx" in k}
    before = rss_mib(groups)
    ready = bench.io_file("hold.json")
    hold_s = 120.0
    argv = bench.python(
        "hold", "--target", route.target, "--connections", str(connections),
        "--ready", str(ready), "--hold", f"{hold_s:g}",
    )  # fmt: skip
    log = bench.lab.log_path("h1", f"hold-{route.contender}")
    proc = spawn(bench.lab.host("h1"), argv, log, user=route.user, name="hold")
    try:
        deadline = time.monotonic() + hold_s - 10
        while not ready.exists():
            if not proc.running or time.monotonic() >= deadline:
                raise BenchError(
                    f"{route.name}: the holder did not open its {connections} connections "
                    f"({'exited ' + str(proc.popen.returncode) if not proc.running else 'timeout'})"
                    f"; see {log}"
                )
            time.sleep(0.2)
        opened = json.loads(ready.read_text())
        time.sleep(1.0)  # let the proxies settle: whatever they allocate per connection is live
        held = rss_mib(groups)
        fds = {label: open_fds(pids[0]) for label, pids in groups.items()}
    finally:
        proc.stop(5.0)
    return {
        "connections": opened,
        "rss_mib_before": before,
        "rss_mib_held": held,
        "open_fds_held": fds,
    }


# --- the table of workloads ----------------------------------------------------------------------

Measure = Callable[[Bench, Route, int], dict[str, Any]]


@dataclass(frozen=True)
class Workload:
    name: str  # what --workloads names it
    title: str
    upstream: str
    contenders: tuple[str, ...]
    settings: Callable[[Any], tuple[int, ...]]  # one point per setting, from the arguments
    measure: Measure


HTTP1 = (DIRECT, NODEMESH, CONNECT, HAPROXY, FLOOR, FLOOR_H1)
MESHES = (DIRECT, NODEMESH, CONNECT)

WORKLOADS = {
    w.name: w
    for w in (
        Workload("c1", "closed loop HTTP/1.1, wrk -c1", "nginx", HTTP1, lambda a: (1,),
                 measure_closed),
        Workload("c16", "closed loop HTTP/1.1, wrk -c16", "nginx", HTTP1, lambda a: (16,),
                 measure_closed),
        Workload("open", "open loop HTTP/1.1, h2load --h1 -c10 --rps", "nginx", HTTP1,
                 lambda a: tuple(a.rates), measure_open),
        Workload("bulk", "bulk TCP, opaque", "sink", (*MESHES, FLOOR), lambda a: (a.bulk_bytes,),
                 measure_bulk),
        Workload("h2", "HTTP/2 h2c, h2load -c10 -m10 (100 in flight)", "h2c", MESHES,
                 lambda a: (100,), measure_h2),
        Workload("grpc", "gRPC unary, grpcio", "grpc", MESHES, lambda a: (a.grpc_concurrency,),
                 measure_grpc),
        Workload("memory", "RSS with idle keep-alive connections", "nginx", (NODEMESH, CONNECT),
                 lambda a: (a.memory_connections,), measure_memory),
        Workload("pieces", "http.server writing head and body apart, wrk -c1", "pieces", MESHES,
                 lambda a: (1,), measure_closed),
    )
}  # fmt: skip
