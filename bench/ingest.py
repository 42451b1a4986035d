"""The controller's metrics ingest under a simulated fleet, and what a query costs at that load.

    .venv/bin/python bench/ingest.py --agents 100 --agents 300 --agents 1000 [--profile]

For each fleet size, a fresh, real controller process (``nodemesh controller --config ...``,
as systemd starts it) on 127.0.0.1 with its own CA in a temporary state dir, registered in a
real ``consul agent -dev`` (the integration tests' ``devconsul``, shared by all sizes).  Then,
in this process, N simulated agents:

- **Identities.**  Each agent gets a node certificate ``spiffe://nodemesh.local/dc/dc1/node/nNNNN``
  signed in this process with the controller's own CA files (``CertificateAuthority.load_state``
  on its state dir) -- not through ``/v1/sign/node``, which would need a Consul node per agent
  at its own address.  The controller cannot tell: the certificates are the ones it would issue.
- **Reports.**  Every ``--interval`` each agent sends one report of ``--series`` series (half
  inbound, half outbound; services, callers, routes, upstream hosts and status classes as a
  host of a ~10-hosts-per-service fleet sees them), each with a real HDR V2 encoding drawn from
  a pool of histograms of realistic spreads (medians 0.3-80 ms, 1 % tail up to 100x, counts of
  10-1,000 for 2xx series and 1-40 for error series: about 1,000 requests/s per host).
  Agents start at offsets spread evenly (with jitter) over one interval, so the load is
  smooth, as a fleet's is.
- **The wire.**  The agent's own ``ControllerClient.report_metrics``, made as the agent makes
  it (``keep_reports``): one TLS 1.3 connection with the node certificate, kept from report to
  report while it is younger than ``KEEP_IDLE_S`` (``identity/client.py``).  ``--connections
  close`` measures the way agents worked before: a new connection and a full handshake for
  every report.  Its TLS context is built once per agent.
- **Delivery** follows ``telemetry/reporter.py``: a queue per agent, oldest first, each attempt
  under ``SEND_TIMEOUT``, retries after ``reporter.backoff``.

Measured: one interval of warm-up, then ``--intervals`` intervals during which the controller's
CPU (``/proc/PID/stat`` utime+stime) and RSS are read at every interval boundary (RSS also
sampled every 0.5 s for its peak), with every attempt's acceptance latency (connect to 200) and
outcome.  Then, still under the load, ``GET /v1/metrics?window=1m&by=service`` and
``by=edge`` alternately, ``--queries`` times each, each once the fleet has caught up again (at
most 2 % of agents holding an undelivered report; bounded by ``CATCH_UP_LIMIT``): latency,
the controller's CPU during it, rows, the seconds the fleet needed to catch up before it, and
the acceptance latency of reports that overlapped a query.  ``--profile`` then adds py-spy on
the controller for one interval of ingest and for one more query (raw stacks next to the
JSON), after the unprofiled numbers.

Everything runs on this machine: the load generator (this process) competes with the
controller for the same cores, and its CPU is reported beside the controller's.  Every phase is
bounded in time; the controller and Consul are stopped by pid on every exit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyspy
import source
import trio
from measure import (
    BenchError,
    all_cpu_seconds,
    command_line,
    cpu_seconds,
    loadavg,
    machine_busy_seconds,
    rss_bytes,
    wait_quiet,
)

from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.client import ControllerClient, ControllerRefused, ControllerUnavailable
from nodemesh.telemetry.metrics import DEFAULT_ROUTE, HIGHEST_US, LOWEST_US, new_histogram
from nodemesh.telemetry.reporter import SEND_TIMEOUT, backoff

sys.path.insert(0, str(source.REPO))  # the integration tests' dev Consul
from tests.integration.devconsul import NODE, free_ports, start_dev_consul

HERE = Path(__file__).resolve().parent
TD, DC = "nodemesh.local", "dc1"
TOKEN = "bench-join-token"  # noqa: S105 (a throwaway controller's)
ROUTES = ("GET /items/{id}", "POST /items", DEFAULT_ROUTE)
CALLERS = 8  # services that call each host's service
UPSTREAMS = 4  # services each host calls
ENDPOINTS = 3  # hosts serving each upstream
HOSTS_PER_SERVICE = 10
BUSY_COUNTS = (10, 1000)  # requests per 2xx series per interval: ~1,000 requests/s per host
SPARSE_COUNTS = (1, 40)  # per 4xx/5xx series
START_TIMEOUT = 30.0  # seconds for the controller to print its listening line
QUERY_TIMEOUT = 120.0  # seconds for one query
CATCH_UP_LIMIT = 30.0  # seconds to wait for the fleet's backlog to drain before a query
TIMELINE_EVERY = 2.0  # seconds between the timeline's rows
TIMELINE_COLUMNS = ("t_s", "controller_cores", "accepted_per_s", "duplicates_per_s",
                    "timeouts_per_s", "agents_behind", "reports_queued")  # fmt: skip
RSS_EVERY = 0.5  # seconds
QUIET_LOAD = 1.0  # 1-minute load average under which a fleet size starts

Labels = dict[str, str]


# --- the simulated fleet (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Hist:
    count: int
    hdr: str  # base64 V2 encoding, as build_report puts it in a report


def one_histogram(rng: random.Random, count: int) -> Hist:
    """``count`` latencies around a median of 0.3-80 ms, 1 % of them 10-100x slower."""
    median_us = math.exp(rng.uniform(math.log(300), math.log(80_000)))
    sigma = rng.uniform(0.3, 1.0)
    h = new_histogram()
    for _ in range(count):
        v = rng.lognormvariate(math.log(median_us), sigma)
        if rng.random() < 0.01:
            v *= rng.uniform(10, 100)
        h.record_value(min(max(int(v), LOWEST_US), HIGHEST_US))
    return Hist(count, h.encode().decode("ascii"))


def histogram_pool(size: int, seed: int = 7) -> tuple[list[Hist], list[Hist]]:
    """Histograms for busy (2xx) series, counts log-uniform in ``BUSY_COUNTS``, and sparse
    (error) ones, counts uniform in ``SPARSE_COUNTS``."""
    rng = random.Random(seed)
    lo, hi = (math.log(c) for c in BUSY_COUNTS)
    busy = [one_histogram(rng, round(math.exp(rng.uniform(lo, hi)))) for _ in range(size)]
    sparse = [one_histogram(rng, rng.randint(*SPARSE_COUNTS)) for _ in range(size)]
    return busy, sparse


def n_services(n_agents: int) -> int:
    # Enough services that callers and upstreams never include the host's own.
    return max(CALLERS + UPSTREAMS + 2, n_agents // HOSTS_PER_SERVICE)


def agent_name(i: int) -> str:
    return f"n{i:04d}"


def service_name(k: int) -> str:
    return f"svc-{k:03d}"


def service_uri(k: int) -> str:
    """A caller as agents label it: the identity its certificate carries."""
    return spiffe.service_id(TD, DC, service_name(k)).uri


def own_service(i: int, n_agents: int) -> str:
    return service_name(i % n_services(n_agents))


def register_fleet(consul_port: int, n: int, say_: Callable[[str], None]) -> None:
    """Every simulated agent's node in Consul's catalog with the service it runs: the
    controller accepts only series a report's node can be held to (``metrics.attribute``)."""
    import consul as pyconsul

    c = pyconsul.Consul(host="127.0.0.1", port=consul_port)
    for i in range(n):
        if i and i % 250 == 0:
            say_(f"registered {i} of {n} nodes in Consul")
        service = {"Service": own_service(i, n), "Port": 8080}
        c.catalog.register(agent_name(i), "127.0.0.1", service=service)


def agent_series(i: int, n_agents: int, series: int) -> list[Labels]:
    """The ``series`` distinct label sets agent ``i`` reports (pure): half inbound (callers x
    routes x 2xx/4xx/5xx), half outbound (upstreams x their hosts x routes x 2xx/5xx)."""
    s = n_services(n_agents)
    own = i % s
    me = service_name(own)
    inbound = [
        {"direction": "inbound", "service": me, "peer": service_uri((own + 1 + c) % s),
         "status": st, "route": r, "endpoint": ""}
        for c in range(CALLERS) for r in ROUTES for st in ("2xx", "4xx", "5xx")
    ]  # fmt: skip
    outbound = []
    for u in range(UPSTREAMS):
        up = (own + CALLERS + 1 + u) % s
        for e in range(ENDPOINTS):
            host = agent_name((up + s * e) % max(n_agents, 1))
            outbound += [
                {"direction": "outbound", "service": service_name(up), "peer": service_uri(own),
                 "status": st, "route": r, "endpoint": host}
                for r in ROUTES for st in ("2xx", "5xx")
            ]  # fmt: skip
    if not 2 <= series <= len(inbound) + len(outbound):
        raise ValueError(f"series = {series} is not in [2, {len(inbound) + len(outbound)}]")
    rng = random.Random(i)
    # 2xx first, so a small report still carries the busy series an agent always has.
    for side in (inbound, outbound):
        rng.shuffle(side)
        side.sort(key=lambda lab: lab["status"] != "2xx")
    n_in = min(series // 2, len(inbound))
    return inbound[:n_in] + outbound[: series - n_in]


def make_report(
    agent: int,
    seq: int,
    end: float,
    interval: float,
    labels: Sequence[Labels],
    pool: tuple[Sequence[Hist], Sequence[Hist]],
    rng: random.Random,
) -> dict[str, Any]:
    """One interval report as ``reporter.build_report`` shapes it (pure given ``rng``)."""
    busy, sparse = pool
    series = []
    for lab in labels:
        h = rng.choice(busy if lab["status"] == "2xx" else sparse)
        series.append({"labels": dict(lab), "count": h.count, "hdr": h.hdr})
    me = next(lab["service"] for lab in labels if lab["direction"] == "inbound")  # series >= 2
    opened = rng.randint(0, 20)
    return {
        "agent": spiffe.node_id(TD, DC, agent_name(agent)).uri,
        "seq": seq,
        "start": end - interval,
        "end": end,
        "series": series,
        "tcp": [{"direction": "inbound", "service": me, "opened": opened, "closed": opened,
                 "bytes_in": 1000 * opened, "bytes_out": 4000 * opened}],
        "dropped": 0,
    }  # fmt: skip


def offsets(n: int, interval: float, seed: int = 3) -> list[float]:
    """Start offsets in [0, interval): evenly spread with jitter, in shuffled order (pure)."""
    rng = random.Random(seed)
    out = [interval * (k + rng.random()) / n for k in range(n)]
    rng.shuffle(out)
    return out


def quantiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of ``seconds``, in ms (pure); empty input gives {}."""
    if not seconds:
        return {}
    v = sorted(seconds)

    def rank(p: float) -> float:
        return 1000 * v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": 1000 * v[-1], "n": len(v)}


@dataclass(frozen=True)
class Attempt:
    agent: int
    seq: int
    start: float  # trio clock
    seconds: float
    outcome: str  # "ok", "duplicate", "timeout", "refused NNN", "unavailable: ..."


def overlaps(a: Attempt, windows: Sequence[tuple[float, float]]) -> bool:
    return any(a.start < end and a.start + a.seconds > start for start, end in windows)


# --- the controller process ----------------------------------------------------------------------


@dataclass
class Controller:
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def running_controller(d: Path, consul_port: int) -> Iterator[Controller]:
    """``nodemesh controller`` as its own process; stopped by pid (TERM, then KILL)."""
    d.mkdir(parents=True)
    (port,) = free_ports(1)
    (d / "join-token").write_text(TOKEN + "\n")
    (d / "controller.toml").write_text(
        f'[controller]\nnode = "{NODE}"\ndatacenter = "{DC}"\ntrust_domain = "{TD}"\n'
        f'state_dir = "{d / "state"}"\nlisten = "127.0.0.1:{port}"\n'
        f'join_token_file = "{d / "join-token"}"\n'
        f'[consul]\naddress = "127.0.0.1:{consul_port}"\n[log]\nlevel = "info"\n'
    )
    exe = Path(sys.executable).with_name("nodemesh")
    log = d / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(exe), "controller", "--config", str(d / "controller.toml")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while f"listening on 127.0.0.1:{port}" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the controller did not start: {log.read_text()[-1500:]}")
            time.sleep(0.1)
        yield Controller(proc, port, d / "state", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class BenchClient(ControllerClient):
    """The agent's client with its TLS context built once (see the module docstring)."""

    def __init__(
        self, address: str, roots: bytes, pair: tuple[bytes, bytes], keep: bool = True
    ) -> None:
        self.pair = pair
        self._ctx: ssl.SSLContext | None = None
        super().__init__(lambda: address, roots, TOKEN, keep_reports=keep)
        self._ctx = super()._context(pair)

    def _context(self, pair: tuple[bytes, bytes] | None) -> ssl.SSLContext:
        if pair == self.pair and self._ctx is not None:
            return self._ctx
        return super()._context(pair)


def issue(ca: CertificateAuthority, n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        ident = spiffe.node_id(TD, DC, agent_name(i))
        key = keys.generate_key()
        out.append((ca.sign_csr(keys.make_csr(key, ident), ident, 86400.0), key))
    return out


# --- the load ------------------------------------------------------------------------------------


@dataclass
class Fleet:
    n: int
    interval: float
    labels: list[list[Labels]]
    pool: tuple[list[Hist], list[Hist]]
    clients: list[BenchClient]
    attempts: list[Attempt] = field(default_factory=list)
    backlog: list[int] = field(default_factory=list)  # each agent's queue length, kept current
    outcomes: Counter[str] = field(default_factory=Counter)  # every attempt so far


async def run_agent(fleet: Fleet, i: int, start_at: float) -> None:
    """One agent's reporter loop (``serve_reporter``'s, with a made-up report per cut)."""
    rng = random.Random(1000 + i)
    client = fleet.clients[i]
    queue: deque[dict[str, Any]] = deque()
    seq, failures = 0, 0
    next_cut = retry_at = start_at
    while True:
        now = trio.current_time()
        if now >= next_cut:
            labels = fleet.labels[i]
            queue.append(make_report(i, seq, time.time(), fleet.interval, labels, fleet.pool, rng))
            seq += 1
            while next_cut <= now:
                next_cut += fleet.interval
            fleet.backlog[i] = len(queue)
            continue
        if queue and now >= retry_at:
            report = queue[0]
            t0 = trio.current_time()
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    dup = await client.report_metrics(report, *client.pair)
                outcome = "duplicate" if dup else "ok"
            except trio.TooSlowError:
                outcome = "timeout"
            except ControllerRefused as e:
                outcome = f"refused {e.status}"
            except ControllerUnavailable as e:
                outcome = f"unavailable: {str(e).split(' failed: ')[-1][:60]}"
            fleet.attempts.append(Attempt(i, report["seq"], t0, trio.current_time() - t0, outcome))
            fleet.outcomes[outcome] += 1
            if outcome in ("ok", "duplicate") or outcome in ("refused 400", "refused 403"):
                queue.popleft()
                failures = 0
            else:
                failures += 1
                retry_at = trio.current_time() + backoff(failures, rng)
            fleet.backlog[i] = len(queue)
            continue
        await trio.sleep_until(next_cut if not queue else min(next_cut, retry_at))


@dataclass
class Snapshot:
    t: float
    ctl_cpu: float
    ctl_rss: int
    gen_cpu: float
    machine_busy: float
    accepted: int


def snapshot(fleet: Fleet, pid: int) -> Snapshot:
    return Snapshot(
        trio.current_time(),
        cpu_seconds(pid),
        rss_bytes(pid),
        cpu_seconds(os.getpid()),
        machine_busy_seconds(),
        fleet.outcomes["ok"],
    )


async def sample_timeline(
    fleet: Fleet,
    pid: int,
    t0: float,
    rows: list[list[float]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every ``TIMELINE_EVERY`` s: seconds since ``t0``, the controller's cores, and per second
    the reports accepted, duplicates and timeouts, then agents behind and reports queued."""
    cpu, seen = cpu_seconds(pid), Counter(fleet.outcomes)
    last = trio.current_time()
    task_status.started()
    while True:
        await trio.sleep(TIMELINE_EVERY)
        now, cpu1, seen1 = trio.current_time(), cpu_seconds(pid), Counter(fleet.outcomes)
        dt = now - last
        rows.append(
            [round(now - t0, 1), round((cpu1 - cpu) / dt, 2)]
            + [round((seen1[k] - seen[k]) / dt, 1) for k in ("ok", "duplicate", "timeout")]
            + [sum(1 for b in fleet.backlog if b), sum(fleet.backlog)]
        )
        cpu, seen, last = cpu1, seen1, now


def sample_rss(pid: int, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], rss_bytes(pid))
        stop.wait(RSS_EVERY)


def busiest_others(before: dict[int, float], ours: set[int]) -> list[dict[str, Any]]:
    """The five processes other than ours that used the most CPU since ``before``."""
    deltas = sorted(
        ((cpu - before.get(p, 0.0), p) for p, cpu in all_cpu_seconds().items() if p not in ours),
        reverse=True,
    )
    return [
        {"pid": p, "cpu_s": round(d, 2), "command": command_line(p)}
        for d, p in deltas[:5]
        if d >= 0.1
    ]


async def wait_caught_up(fleet: Fleet, limit: float) -> float | None:
    """Seconds until at most 2 % of the agents hold an undelivered report (about those whose
    report is on the wire), or None if that did not happen within ``limit``."""
    t0 = trio.current_time()
    with trio.move_on_after(limit):
        # A condition over every agent's queue: a bounded 0.25 s poll is the simple check.
        while sum(1 for b in fleet.backlog if b) > 1 + fleet.n // 50:  # noqa: ASYNC110
            await trio.sleep(0.25)
        return round(trio.current_time() - t0, 2)
    return None


class SpyRun:
    """py-spy recording ``pid`` until stopped (SIGINT makes it write its file)."""

    def __init__(self, pid: int, out: Path) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        argv = [str(spy), "record", "--pid", str(pid), "--duration", f"{QUERY_TIMEOUT:.0f}",
                "--rate", "100", "--format", "raw", "--nonblocking",
                "--output", str(out)]  # fmt: skip
        self.out = out
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def report(self) -> dict[str, Any]:
        if not self.out.exists():
            err = self.proc.stderr.read() if self.proc.stderr else b""
            raise BenchError(f"py-spy on the controller wrote nothing: {err[-300:]!r}")
        with self.out.open() as f:
            return {"raw_file": self.out.name, **pyspy.report(pyspy.summarize(f))}


@contextlib.contextmanager
def py_spy_until_stopped(pid: int, out: Path) -> Iterator[SpyRun]:
    run = SpyRun(pid, out)
    try:
        yield run
    finally:
        run.stop()


def py_spy(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy), "record", "--pid", str(pid), "--duration", f"{math.ceil(seconds)}",
            "--rate", "100", "--format", "raw", "--nonblocking", "--output", str(out)]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, timeout=seconds + 30, check=False)
    if p.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy on the controller failed ({p.returncode}): {p.stderr[-300:]!r}")
    with out.open() as f:
        return {"raw_file": out.name, **pyspy.report(pyspy.summarize(f))}


async def query(fleet: Fleet, by: str, pid: int) -> dict[str, Any]:
    client = fleet.clients[0]
    cpu0, t0 = cpu_seconds(pid), trio.current_time()
    try:
        with trio.fail_after(QUERY_TIMEOUT):
            doc = await client.metrics("1m", by, *client.pair)
    except (trio.TooSlowError, ControllerUnavailable, ControllerRefused) as e:
        return {"by": by, "start": t0, "seconds": trio.current_time() - t0, "error": repr(e)}
    return {
        "by": by,
        "start": t0,
        "seconds": trio.current_time() - t0,
        "controller_cpu_s": cpu_seconds(pid) - cpu0,
        "rows": len(doc["rows"]),
        "agents": doc["agents"],
        "requests": sum(r["requests"] for r in doc["rows"]),
        "body_bytes": len(json.dumps(doc)),
        "overflow": doc["overflow"],
    }


async def drive(
    fleet: Fleet, ctl: Controller, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    pid = ctl.proc.pid
    out: dict[str, Any] = {}
    peak, stop = [rss_bytes(pid)], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pid, peak, stop), daemon=True)
    sampler.start()
    idle = snapshot(fleet, pid)
    t0 = trio.current_time() + 0.5
    offs = offsets(fleet.n, fleet.interval)
    snaps: list[Snapshot] = []
    queries: list[dict[str, Any]] = []
    timeline: list[list[float]] = []
    phases: list[tuple[str, float, float]] = []  # what ran when, in seconds since t0
    with trio.move_on_after(args.max_seconds) as budget:
        async with trio.open_nursery() as nursery:
            await nursery.start(sample_timeline, fleet, pid, t0, timeline)
            for i in range(fleet.n):
                nursery.start_soon(run_agent, fleet, i, t0 + offs[i])
            await trio.sleep_until(t0 + args.warmup * fleet.interval)
            snaps.append(snapshot(fleet, pid))
            others0 = all_cpu_seconds()
            for k in range(args.intervals):
                await trio.sleep_until(snaps[0].t + (k + 1) * fleet.interval)
                snaps.append(snapshot(fleet, pid))
                say(f"{tag}: interval {k + 1}/{args.intervals}: {_interval_line(snaps[-2:])}")
            out["busiest_other_processes"] = busiest_others(others0, {pid, os.getpid()})
            # Queries alternate by=service and by=edge, each once the fleet has caught up with
            # what the previous one held back, so each starts from the same steady ingest.
            for k in range(2 * args.queries):
                caught_up = await wait_caught_up(fleet, CATCH_UP_LIMIT)
                queries.append({**await query(fleet, ("service", "edge")[k % 2], pid),
                                "caught_up_before_s": caught_up})  # fmt: skip
                q = queries[-1]
                phases.append(
                    (f"query by={q['by']}", q["start"] - t0, q["start"] + q["seconds"] - t0)
                )
                say(f"{tag}: {_query_line(queries[-1])}")
            if args.profile:
                await wait_caught_up(fleet, CATCH_UP_LIMIT)
                say(f"{tag}: py-spy on the controller for one interval of ingest")
                path = args.out.with_name(f"{args.out.stem}-pyspy-{fleet.n}-ingest.txt")
                p0 = trio.current_time() - t0
                out["profile_ingest"] = await trio.to_thread.run_sync(
                    py_spy, pid, fleet.interval, path
                )
                phases.append(("py-spy, ingest", p0, trio.current_time() - t0))
                await wait_caught_up(fleet, CATCH_UP_LIMIT)
                say(f"{tag}: py-spy on the controller during one by=service query")
                path = args.out.with_name(f"{args.out.stem}-pyspy-{fleet.n}-query.txt")
                with py_spy_until_stopped(pid, path) as spy:
                    await trio.sleep(1.0)
                    q = await query(fleet, "service", pid)
                out["profile_query"] = {**spy.report(), "query": q}
                phases.append(("py-spy, query by=service", q["start"] - t0,
                               q["start"] + q["seconds"] - t0))  # fmt: skip
            out["caught_up_at_end_s"] = await wait_caught_up(fleet, CATCH_UP_LIMIT)
            final = snapshot(fleet, pid)
            out["rss_mib_after_queries"] = round(final.ctl_rss / 2**20, 1)
            nursery.cancel_scope.cancel()
    stop.set()
    sampler.join(timeout=5)
    out["budget_exceeded"] = budget.cancelled_caught
    out["measured_from_s"] = round(snaps[0].t - t0, 1) if snaps else None
    out["phases"] = [(name, round(a, 1), round(b, 1)) for name, a, b in phases]
    out["timeline"] = {"columns": TIMELINE_COLUMNS, "rows": timeline}
    out.update(summarize(fleet, idle, snaps, queries, peak[0]))
    return out


def _interval_line(pair: Sequence[Snapshot]) -> str:
    a, b = pair
    dt = b.t - a.t
    return (f"controller {(b.ctl_cpu - a.ctl_cpu) / dt:.2f} cores, RSS {b.ctl_rss / 2**20:.0f} MiB,"
            f" {(b.accepted - a.accepted) / dt:.1f} reports/s accepted, load generator "
            f"{(b.gen_cpu - a.gen_cpu) / dt:.2f} cores")  # fmt: skip


def _query_line(q: dict[str, Any]) -> str:
    head = f"query by={q['by']} (caught up after {q['caught_up_before_s']} s)"
    if "error" in q:
        return f"{head} failed after {q['seconds']:.1f} s: {q['error']}"
    return (f"{head}: {q['seconds']:.2f} s, controller CPU {q['controller_cpu_s']:.2f} s, "
            f"{q['rows']} rows, {q['agents']} agents, {q['requests']:,} requests, "
            f"overflow {q['overflow']}")  # fmt: skip


def summarize(
    fleet: Fleet, idle: Snapshot, snaps: Sequence[Snapshot], queries: list[dict[str, Any]],
    peak_rss: int,
) -> dict[str, Any]:  # fmt: skip
    """``snaps``: the measured intervals' boundaries; attempts after the last one overlap
    the queries."""
    if len(snaps) < 2:
        raise BenchError("the run ended before one measured interval")
    first, last = snaps[0], snaps[-1]
    dt = last.t - first.t
    in_window = [a for a in fleet.attempts if first.t <= a.start < last.t]
    q_windows = [(q["start"], q["start"] + q["seconds"]) for q in queries]
    after = [a for a in fleet.attempts if a.start >= last.t]
    ok = [a.seconds for a in in_window if a.outcome == "ok"]
    ctl_cpu, gen_cpu = last.ctl_cpu - first.ctl_cpu, last.gen_cpu - first.gen_cpu
    busy = last.machine_busy - first.machine_busy
    per_interval = [
        {"controller_cores": round((b.ctl_cpu - a.ctl_cpu) / (b.t - a.t), 3),
         "rss_mib": round(b.ctl_rss / 2**20, 1),
         "accepted_per_s": round((b.accepted - a.accepted) / (b.t - a.t), 1)}
        for a, b in itertools.pairwise(snaps)
    ]  # fmt: skip
    return {
        "measured_s": round(dt, 1),
        "expected_reports_per_s": fleet.n / fleet.interval,
        "accepted_per_s": round(len(ok) / dt, 1),
        "outcomes": dict(Counter(a.outcome for a in in_window)),
        "accept_latency_ms": quantiles_ms(ok),
        "controller_cores": round(ctl_cpu / dt, 3),
        "controller_cpu_ms_per_report": round(1000 * ctl_cpu / max(len(ok), 1), 2),
        "load_generator_cores": round(gen_cpu / dt, 3),
        "machine_cores_busy": round(busy / dt, 3),
        "not_ours_cores": round((busy - ctl_cpu - gen_cpu) / dt, 3),
        "rss_mib": {"idle": round(idle.ctl_rss / 2**20, 1),
                    "start": round(first.ctl_rss / 2**20, 1),
                    "end": round(last.ctl_rss / 2**20, 1), "peak": round(peak_rss / 2**20, 1)},
        "per_interval": per_interval,
        "queries": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in q.items()}
                    for q in queries],
        "after_measuring": {
            "outcomes": dict(Counter(a.outcome for a in after)),
            "accept_latency_ms_overlapping_queries": quantiles_ms(
                [a.seconds for a in after if a.outcome == "ok" and overlaps(a, q_windows)]),
            "accept_latency_ms_not_overlapping": quantiles_ms(
                [a.seconds for a in after if a.outcome == "ok" and not overlaps(a, q_windows)]),
        },
        "backlog_at_end": {"agents_behind": sum(1 for b in fleet.backlog if b),
                           "reports_queued": sum(fleet.backlog)},
    }  # fmt: skip


# --- the driver ----------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[ingest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_scale(n: int, args: argparse.Namespace, consul_port: int, work: Path) -> dict[str, Any]:
    tag = f"{n} agents"
    pool = histogram_pool(args.pool)
    sizes = [len(h.hdr) for h in pool[0]] + [len(h.hdr) for h in pool[1]]
    labels = [agent_series(i, n, args.series) for i in range(n)]
    load0, quiet = wait_quiet(QUIET_LOAD, args.wait_quiet, lambda m: say(f"{tag}: {m}"))
    register_fleet(consul_port, n, lambda m: say(f"{tag}: {m}"))
    with running_controller(work / f"agents-{n}", consul_port) as ctl:
        ca = CertificateAuthority.load_state(ctl.state_dir, TD)
        t = time.monotonic()
        pairs = issue(ca, n)
        issue_s = time.monotonic() - t
        roots = (ctl.state_dir / "ca.pem").read_bytes()
        t = time.monotonic()
        keep = args.connections == "keep"
        clients = [BenchClient(ctl.address, roots, p, keep) for p in pairs]
        ctx_s = time.monotonic() - t
        say(f"{tag}: {n} node certificates in {issue_s:.1f} s, TLS contexts in {ctx_s:.1f} s")
        fleet = Fleet(n, args.interval, labels, pool, clients, backlog=[0] * n)
        result = trio.run(drive, fleet, ctl, args, tag)
        alive = ctl.proc.poll() is None
    body = len(json.dumps(make_report(0, 0, 1e9, args.interval, labels[0], pool,
                                      random.Random(0))))  # fmt: skip
    return {
        "agents": n,
        "series": args.series,
        "interval_s": args.interval,
        "services": n_services(n),
        "pool": {"size": args.pool, "busy_counts": BUSY_COUNTS, "sparse_counts": SPARSE_COUNTS},
        "connections": args.connections,
        "hdr_chars": {"min": min(sizes), "median": sorted(sizes)[len(sizes) // 2],
                      "max": max(sizes)},
        "example_body_bytes": body,
        "cert_issue_s": round(issue_s, 2),
        "tls_contexts_s": round(ctx_s, 2),
        "controller_alive_at_end": alive,
        "loadavg_before": load0,
        "quiet_at_start": quiet,
        "loadavg_after": loadavg(),
        **result,
    }  # fmt: skip


def table(results: Sequence[dict[str, Any]]) -> str:
    head = (f"{'agents':>6} {'rep/s':>6} {'ok/s':>6} {'ctl cores':>9} {'ms/rep':>7} "
            f"{'gen cores':>9} {'RSS start->end MiB':>19} {'accept p50/p99/max ms':>22} "
            f"{'errors':>6}  queries by=service / by=edge (s)")  # fmt: skip
    lines = [head]
    for r in results:
        lat = r["accept_latency_ms"]
        errs = sum(v for k, v in r["outcomes"].items() if k not in ("ok", "duplicate"))
        qs = {by: [q["seconds"] for q in r["queries"] if q["by"] == by and "error" not in q]
              for by in ("service", "edge")}  # fmt: skip
        qtext = " / ".join(",".join(f"{s:.1f}" for s in qs[by]) or "-" for by in qs)
        lines.append(
            f"{r['agents']:>6} {r['expected_reports_per_s']:>6.1f} {r['accepted_per_s']:>6.1f} "
            f"{r['controller_cores']:>9.2f} {r['controller_cpu_ms_per_report']:>7.1f} "
            f"{r['load_generator_cores']:>9.2f} "
            f"{r['rss_mib']['start']:>9.0f} -> {r['rss_mib']['end']:<6.0f} "
            f"{lat.get('p50', 0):>7.0f}/{lat.get('p99', 0):.0f}/{lat.get('max', 0):.0f}"
            f"{errs:>12}  {qtext}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """Tables for docs/benchmarks.md from one result file (so no number is copied by hand)."""
    out = [
        "| agents | reports/s sent / accepted | controller cores | CPU ms / report "
        "| controller RSS MiB: idle, start → end of measuring, peak | acceptance p50 / p90 / p99 / "
        "max ms | errors | load generator cores | not ours cores | load avg before |",
        "|---:|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for r in result["results"]:
        lat, rss = r["accept_latency_ms"], r["rss_mib"]
        errs = {k: v for k, v in r["outcomes"].items() if k not in ("ok", "duplicate")}
        out.append(
            f"| {r['agents']:,} | {r['expected_reports_per_s']:.0f} / {r['accepted_per_s']:.1f} "
            f"| {r['controller_cores']:.2f} | {r['controller_cpu_ms_per_report']:.1f} "
            f"| {rss['idle']:.0f}, {rss['start']:.0f} → {rss['end']:.0f}, {rss['peak']:.0f} "
            f"| {lat['p50']:.0f} / {lat['p90']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} "
            f"| {', '.join(f'{k}: {v}' for k, v in errs.items()) or '0'} "
            f"| {r['load_generator_cores']:.2f} | {r['not_ours_cores']:.2f} "
            f"| {r['loadavg_before']:.2f} |"
        )
    out += [
        "",
        "| agents | query (window=1m) | seconds, each run | controller CPU s | rows "
        "| agents in the answer | overflow.series in the answer | fleet caught up before it, s |",
        "|---:|---|---|---|---:|---|---|---|",
    ]
    for r in result["results"]:
        for by in ("service", "edge"):
            qs = [q for q in r["queries"] if q["by"] == by]
            ok = [q for q in qs if "error" not in q]
            if not qs:
                continue
            secs = ", ".join(f"{q['seconds']:.1f}" for q in qs)
            cpu = ", ".join(f"{q['controller_cpu_s']:.1f}" for q in ok)
            out.append(
                f"| {r['agents']:,} | by={by} | {secs} | {cpu} "
                f"| {ok[-1]['rows'] if ok else '-'} "
                f"| {', '.join(str(q['agents']) for q in ok)} "
                f"| {', '.join(str(q['overflow']['series']) for q in ok)} "
                f"| {', '.join(str(q.get('caught_up_before_s', '-')) for q in qs)} |"
            )
    out += [
        "",
        "| agents | reports while the queries ran: outcomes | acceptance p50 / p99 / max ms, "
        "overlapping a query | not overlapping | agents behind at the end (reports queued) |",
        "|---:|---|---|---|---|",
    ]
    for r in result["results"]:
        after = r["after_measuring"]
        cells = []
        for key in ("accept_latency_ms_overlapping_queries", "accept_latency_ms_not_overlapping"):
            lat = after[key]
            cells.append(f"{lat['p50']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f}" if lat else "-")
        behind = r["backlog_at_end"]
        out.append(
            f"| {r['agents']:,} | {', '.join(f'{k}: {v}' for k, v in after['outcomes'].items())} "
            f"| {cells[0]} | {cells[1]} "
            f"| {behind['agents_behind']} ({behind['reports_queued']}) |"
        )
    return "\n".join(out)


def timeline_markdown(r: dict[str, Any], every: float = 10.0) -> str:
    """One fleet size's timeline in ``every``-second rows, with what ran when (pure)."""
    cols = r["timeline"]["columns"]
    rows = [dict(zip(cols, row, strict=True)) for row in r["timeline"]["rows"]]
    out = [
        f"Timeline of the {r['agents']:,}-agent run (measuring from {r['measured_from_s']} s; "
        + "; ".join(f"{name} {a:g}–{b:g} s" for name, a, b in r["phases"])
        + ")\n",
        "| t, s | controller cores | accepted/s | duplicates/s | timeouts/s | agents behind "
        "(reports queued), at the end |",
        "|---|---:|---:|---:|---:|---|",
    ]
    start = 0.0
    while rows and start <= rows[-1]["t_s"]:
        chunk = [x for x in rows if start < x["t_s"] <= start + every]
        if chunk:
            mean = {k: sum(x[k] for x in chunk) / len(chunk) for k in cols[1:5]}
            out.append(
                f"| {start:g}–{start + every:g} | {mean['controller_cores']:.2f} "
                f"| {mean['accepted_per_s']:.0f} | {mean['duplicates_per_s']:.0f} "
                f"| {mean['timeouts_per_s']:.0f} "
                f"| {chunk[-1]['agents_behind']} ({chunk[-1]['reports_queued']}) |"
            )
        start += every
    return "\n".join(out)


def spread_markdown(named: Sequence[tuple[str, dict[str, Any]]], agents: int) -> str:
    """One line per result file for the ``agents`` size: the runs side by side (pure)."""
    out = [
        "| run | commit | started (UTC) | not ours cores | controller cores | CPU ms / report "
        "| acceptance p50 / p99 ms | first by=service query s (CPU s) | timeouts after measuring "
        "| agents behind at the end |",
        "|---|---|---|---:|---:|---:|---|---|---:|---|",
    ]
    for name, doc in named:
        for r in doc["results"]:
            if r["agents"] != agents:
                continue
            lat = r["accept_latency_ms"]
            q = next((q for q in r["queries"] if q["by"] == "service" and "error" not in q), None)
            qtext = f"{q['seconds']:.1f} ({q['controller_cpu_s']:.1f})" if q else "-"
            behind = r["backlog_at_end"]
            out.append(
                f"| {name} | {doc['nodemesh'][:7]} | {doc['started'][11:16]} "
                f"| {r['not_ours_cores']:.2f} | {r['controller_cores']:.2f} "
                f"| {r['controller_cpu_ms_per_report']:.1f} "
                f"| {lat['p50']:,.0f} / {lat['p99']:,.0f} "
                f"| {qtext} | {r['after_measuring']['outcomes'].get('timeout', 0):,} "
                f"| {behind['agents_behind']} ({behind['reports_queued']:,}) |"
            )
    return "\n".join(out)


# Where the controller's time goes: a sample counts for a part if a frame of that name is on its
# stack (inclusive), so nested parts overlap; shares are of py-spy's non-idle samples.
PROFILE_PARTS: tuple[tuple[str, str], ...] = (
    ("API connections (`_serve_connection`)", "_serve_connection "),
    ("TLS handshake (`do_handshake`)", "SSLObject.do_handshake "),
    ("`parse_report`", "parse_report "),
    ("journal (`controller/journal.py`)", "nodemesh/controller/journal.py"),
    ("compaction (`FleetMetrics.compact`)", "FleetMetrics.compact "),
    ("queries (`FleetMetrics.query`)", "FleetMetrics.query "),
)


def profile_shares(lines: Iterable[str]) -> tuple[int, dict[str, float]]:
    """py-spy raw stacks -> (non-idle samples, % of them per ``PROFILE_PARTS``) (pure)."""
    busy, hits = 0, dict.fromkeys((name for name, _ in PROFILE_PARTS), 0)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith("EpollIOManager.get_events"):
            continue  # waiting in epoll: idle
        busy += int(count)
        for name, mark in PROFILE_PARTS:
            if any(mark in f if mark.endswith(".py") else f.startswith(mark) for f in frames):
                hits[name] += int(count)
    return busy, {k: round(100.0 * v / max(busy, 1), 1) for k, v in hits.items()}


def profiles_markdown(named: Sequence[tuple[str, Path]]) -> str:
    """A column per raw py-spy file (label, path), a row per part."""
    shares = []
    for _, path in named:
        with path.open() as f:
            shares.append(profile_shares(f))
    out = [
        "| part of the controller's non-idle time | " + " | ".join(n for n, _ in named) + " |",
        "|---|" + "---:|" * len(named),
        "| non-idle py-spy samples | " + " | ".join(str(b) for b, _ in shares) + " |",
    ]
    for name, _ in PROFILE_PARTS:
        out.append(f"| {name} | " + " | ".join(f"{s[name]:.0f} %" for _, s in shares) + " |")
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--markdown", nargs="+", type=Path, help="print tables of result files")
    ap.add_argument("--combine", action="store_true", help="with --markdown: one set of tables")
    ap.add_argument("--timeline", type=int, help="with --markdown: the timeline of this size")
    ap.add_argument("--spread", type=int, help="with --markdown: one line per file, this size")
    ap.add_argument(
        "--profiles",
        nargs="+",
        metavar="LABEL=RAW",
        help="print where the controller's time went in these py-spy raw files",
    )
    ap.add_argument("--agents", type=int, action="append", help="fleet size (repeatable)")
    ap.add_argument("--series", type=int, default=50, help="series per report")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between reports")
    ap.add_argument("--warmup", type=int, default=1, help="intervals before measuring")
    ap.add_argument("--intervals", type=int, default=5, help="intervals measured")
    ap.add_argument("--queries", type=int, default=1, help="queries of each kind")
    ap.add_argument("--pool", type=int, default=256, help="distinct histograms of each kind")
    ap.add_argument(
        "--connections",
        choices=("keep", "close"),
        default="keep",
        help="keep each agent's connection from report to report (as agents do), or a new "
        "connection and handshake for every report",
    )
    ap.add_argument("--max-seconds", type=float, default=270.0, help="bound on one fleet's load")
    ap.add_argument("--profile", action="store_true", help="py-spy the controller")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        help=f"wait up to this many seconds for load average <= {QUIET_LOAD} before each size",
    )
    ap.add_argument("--rev", default="HEAD", help="commit to measure, or 'worktree'")
    ap.add_argument("--keep", action="store_true", help="keep the controller's dir and log")
    ap.add_argument("--out", type=Path, help="the JSON result file (default: bench/results/)")
    args = ap.parse_args(argv)
    args.agents = args.agents or [100, 300, 1000]
    if not all(1 <= n <= 5000 for n in args.agents):
        ap.error("--agents must be in [1, 5000]")
    if not 1.0 <= args.interval <= 60.0 or not 1 <= args.intervals <= 30:
        ap.error("--interval must be in [1, 60] s and --intervals in [1, 30]")
    if not 0 <= args.warmup <= 5 or not 0 <= args.queries <= 10 or not 8 <= args.pool <= 4096:
        ap.error("--warmup in [0, 5], --queries in [0, 10], --pool in [8, 4096]")
    if not 10.0 <= args.max_seconds <= 600.0:
        ap.error("--max-seconds must be in [10, 600]")
    try:
        agent_series(0, max(args.agents), args.series)
    except ValueError as e:
        ap.error(f"--series: {e}")
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = HERE / "results" / f"ingest-{stamp}.json"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.profiles:
        named = [(s.partition("=")[0], Path(s.partition("=")[2])) for s in args.profiles]
        print(profiles_markdown(named))
        return 0
    if args.markdown:
        docs = [json.loads(path.read_text()) for path in args.markdown]
        if args.spread:
            print(spread_markdown([(p.stem, d) for p, d in zip(args.markdown, docs, strict=True)],
                                  args.spread))  # fmt: skip
            return 0
        if args.timeline:
            for d in docs:
                for r in d["results"]:
                    if r["agents"] == args.timeline and "timeline" in r:
                        print(timeline_markdown(r) + "\n")
            return 0
        if args.combine:  # one set of tables, a row per fleet size of every file
            names = ", ".join(
                f"{p.name} ({d['nodemesh'][:7]})" for p, d in zip(args.markdown, docs, strict=True)
            )
            print(
                f"**{names}**\n\n{markdown({'results': [r for d in docs for r in d['results']]})}"
            )
            return 0
        for path, doc in zip(args.markdown, docs, strict=True):
            conns = doc["params"].get("connections", "close")  # before the flag: one a report
            print(f"**{path.name}** ({doc['nodemesh'][:7]}, connections: {conns})\n")
            print(f"{markdown(doc)}\n")
        return 0
    source.reexec_at(args.rev, Path(__file__).resolve(), argv)
    from mesh_http import machine  # the lab's imports only once the revision is chosen

    rev, _ = source.current()
    out: dict[str, Any] = {
        "benchmark": "ingest",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "nodemesh": rev,
        "machine": machine(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_at_start": loadavg(),
        "results": [],
    }
    work = Path(tempfile.mkdtemp(prefix="nodemesh-ingest-"))
    say(f"measuring nodemesh {rev}; work dir {work}")
    try:
        with start_dev_consul(work) as consul:
            for n in args.agents:
                out["results"].append(run_scale(n, args, consul.http_port, work))
    finally:
        source.cleanup()
        out["loadavg_at_end"] = loadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        say(f"results written to {args.out}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(out["results"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench/ingest.py: {e}", file=sys.stderr)
        sys.exit(1)
