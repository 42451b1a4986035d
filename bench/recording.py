"""What recording a request costs an agent: ``Recorder.request`` beside baselines, in one run.

    .venv/bin/python bench/recording.py [--calls 200000] [--rounds 15] [--rev HEAD]

Four callables get the same realistic argument tuples (``label_mix``: a few services, peers,
routes and upstream hosts, all six status classes, latencies from tens of µs to seconds), each
called positionally the way ``inbound/server.py`` and ``outbound/server.py`` call the recorder:

    empty      a method that does nothing: the loop, the call and the argument passing
    dict       a method that increments a dict counter keyed by the labels: what any counter
               costs, with no histogram
    hdr        a method that clamps the latency and calls ``record_value`` on one histogram:
               the HdrHistogram's share
    recorder   ``Recorder.request`` on a recorder whose series already exist (steady state)

Every round runs all four over the same list, in a rotated order, after a ``gc.collect()``;
``time.perf_counter_ns`` brackets each pass.  The result is ns per call: median and spread
over rounds, plus the per-round difference ``recorder - empty`` (what recording adds to a
request).

A request's cost does not end at ``request``: every interval ``Recorder.cut`` turns each
active series into a histogram (a fresh HdrHistogram, the interval's counts folded or handed
in, one array addition into the series' past), and that work is per series, not per request.
So ``interval`` records one interval into S series of R requests each (latencies from the
mix), times the cut, and divides by the S x R requests: the cut's share of a request, for a
quiet series (R = 10, where the per-series work dominates) and a busy one (R = 10,000).
``recorder - empty`` plus that share is the honest total per request.  The same phase counts
the memory allocated per series (tracemalloc) with the interval open and after the cut.

Then, also timed per call or per cut: the first request of a new label set (its Series and
histograms allocated), ``Recorder.cut`` with N series of 1 to 2,000 requests, and
``build_report`` (cut plus the V2 encodings) with ``json.dumps`` of the result, which is what
the agent sends every interval.

Only ``Recorder.request``, ``Recorder.cut`` and ``build_report`` are called, so the same
driver measures any revision (``--rev``) of the recorder, before and after a change.

The numbers go to a JSON file under bench/results/ and a table to stdout.  Pure parts
(``label_mix``, ``spread``) are checked in tests/bench/test_bench_tools.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import source
from measure import cpu_seconds, loadavg, machine_busy_seconds

from nodemesh.telemetry.metrics import (
    DEFAULT_ROUTE,
    HIGHEST_US,
    LOWEST_US,
    Recorder,
    new_histogram,
)
from nodemesh.telemetry.reporter import TcpDeltas, build_report

HERE = Path(__file__).resolve().parent

# direction, service, peer, status, seconds, route, endpoint: Recorder.request's positional order
Call = tuple[str, str, str, int, float, str, str]

# A small fleet as one agent sees it.  Routes are names from each service's route table
# (discovery/routes.py); a request no route matches is "[default]".
SERVICES: dict[str, tuple[str, ...]] = {
    "web": ("GET /", "GET /static/{path}", DEFAULT_ROUTE),
    "checkout": ("POST /orders", "GET /orders/{id}", DEFAULT_ROUTE),
    "catalog": ("GET /items/{id}", "GET /search", DEFAULT_ROUTE),
    "auth": ("POST /token", DEFAULT_ROUTE),
}
PEERS = ("web", "checkout", "catalog", "auth", "batch", "h7")  # identities' names; h7 a node
HOSTS = ("h1", "h2", "h3")  # upstream nodes that serve outbound requests
# (status, weight): mostly 2xx, some redirects and client errors, a few failures; 0 = no
# status (cut off before a response), which the recorder files as "error".
STATUSES = ((200, 880), (201, 30), (304, 20), (404, 30), (429, 5), (500, 15), (503, 10), (0, 10))
# (low s, high s, weight): log-uniform inside each band, so every decade from 20 µs to 5 s
# holds values and the histograms fill many buckets, as real latencies do.
LATENCY_BANDS = ((20e-6, 300e-6, 20), (1e-3, 30e-3, 65), (30e-3, 0.5, 12), (0.5, 5.0, 3))


def label_mix(n: int, seed: int = 1) -> list[Call]:
    """``n`` deterministic request records with the mix above (pure)."""
    rng = random.Random(seed)
    services = list(SERVICES)
    statuses, s_weights = zip(*STATUSES, strict=True)
    bands = [(lo, hi) for lo, hi, _ in LATENCY_BANDS]
    b_weights = [w for *_, w in LATENCY_BANDS]
    out: list[Call] = []
    for _ in range(n):
        service = rng.choice(services)
        outbound = rng.random() < 0.5
        status = rng.choices(statuses, s_weights)[0]
        lo, hi = rng.choices(bands, b_weights)[0]
        seconds = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        out.append(
            (
                "outbound" if outbound else "inbound",
                service,
                rng.choice(PEERS),
                status,
                seconds,
                rng.choice(SERVICES[service]),
                rng.choice(HOSTS) if outbound else "",
            )
        )
    return out


@dataclass(frozen=True)
class Spread:
    median: float
    low: float  # minimum over rounds
    high: float  # maximum over rounds
    q1: float
    q3: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Median, extremes and quartiles (linear interpolation) of ``values`` (pure)."""
    if not values:
        raise ValueError("spread of no values")
    v = sorted(values)

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return Spread(q(0.5), v[0], v[-1], q(0.25), q(0.75), len(v))


# --- the callables ----------------------------------------------------------------------------


class Empty:
    def request(
        self,
        direction: str,
        service: str,
        peer: str,
        status: int,
        seconds: float,
        route: str = DEFAULT_ROUTE,
        endpoint: str = "",
    ) -> None:
        return None


class DictCounter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, int, str, str], int] = {}

    def request(
        self,
        direction: str,
        service: str,
        peer: str,
        status: int,
        seconds: float,
        route: str = DEFAULT_ROUTE,
        endpoint: str = "",
    ) -> None:
        key = (direction, service, peer, status, route, endpoint)
        self.counts[key] = self.counts.get(key, 0) + 1


class HdrOnly:
    def __init__(self) -> None:
        self.h = new_histogram()

    def request(
        self,
        direction: str,
        service: str,
        peer: str,
        status: int,
        seconds: float,
        route: str = DEFAULT_ROUTE,
        endpoint: str = "",
    ) -> None:
        self.h.record_value(min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US))


def _pass(fn: Callable[..., None], calls: Sequence[Call]) -> int:
    """ns for one pass of ``fn`` over ``calls``."""
    gc.collect()
    t0 = time.perf_counter_ns()
    for c in calls:
        fn(*c)
    return time.perf_counter_ns() - t0


def per_call(calls: Sequence[Call], rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    rec = Recorder()
    for c in calls:  # steady state: every label set has its series and histograms
        rec.request(*c)
    fns: dict[str, Callable[..., None]] = {
        "empty": Empty().request,
        "dict": DictCounter().request,
        "hdr": HdrOnly().request,
        "recorder": rec.request,
    }
    names = list(fns)
    ns: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            ns[name].append(_pass(fns[name], calls) / len(calls))
        say(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {ns[k][-1]:.0f}" for k in names))
    added = [a - b for a, b in zip(ns["recorder"], ns["empty"], strict=True)]
    return {
        "calls_per_pass": len(calls),
        "series": len(list(rec.series())),
        "ns_per_call": {k: asdict(spread(v)) | {"rounds": v} for k, v in ns.items()},
        "recorder_minus_empty_ns": asdict(spread(added)),
    }


# (series, requests per series) in one interval: quiet series, where the cut's per-series
# work dominates, and one busy series, where the fold's per-bucket work shows.
INTERVALS = ((100, 10), (10, 1_000), (1, 10_000))


def interval_calls(series: int, requests: int, mix: Sequence[Call]) -> list[Call]:
    """One interval: ``requests`` calls into each of ``series`` label sets (2xx), interleaved
    as traffic is, with the labels and latencies of ``mix`` (pure)."""
    out: list[Call] = []
    for k in range(requests):
        for i in range(series):
            d, svc, _, _, _, route, host = mix[i % len(mix)]
            seconds = mix[(k * series + i) % len(mix)][4]
            out.append((d, svc, f"peer-{i}", 200, seconds, route, host))
    return out


def distinct_buckets(calls: Sequence[Call]) -> int:
    """How many histogram buckets the calls' latencies fall in, across all their series."""
    h = new_histogram()
    return len(
        {h.get_lowest_equivalent_value(min(max(int(c[4] * 1e6), LOWEST_US), HIGHEST_US))
         for c in calls}
    )  # fmt: skip


def per_request(ns: float, requests: int) -> float:
    """``ns`` spread over ``requests`` (pure)."""
    if requests <= 0:
        raise ValueError(f"per_request of {requests} requests")
    return ns / requests


def interval(
    rounds: int, mix: Sequence[Call], added_ns: float, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The cut's share of a request, and memory per series, for each of ``INTERVALS``."""
    rows: list[dict[str, Any]] = []
    for series, requests in INTERVALS:
        calls = interval_calls(series, requests, mix)
        n = len(calls)
        record_ns: list[float] = []
        cut_ns: list[float] = []
        for _ in range(rounds):
            rec = Recorder()
            for c in calls[:series]:  # steady state: the series exist and were cut before
                rec.request(*c)
            rec.cut()
            record_ns.append(per_request(_pass(rec.request, calls), n))
            gc.collect()
            t0 = time.perf_counter_ns()
            cuts = rec.cut()
            cut_ns.append(per_request(time.perf_counter_ns() - t0, n))
            assert len(cuts) == series and sum(c.count for c in cuts) == n
            del rec, cuts
        cut = spread(cut_ns)
        row: dict[str, Any] = {
            "series": series,
            "requests_per_series": requests,
            "buckets_per_series": distinct_buckets(calls[::series]),
            "record_ns_per_request": asdict(spread(record_ns)),
            "cut_ns_per_request": asdict(cut),
            "recorder_minus_empty_plus_cut_ns": added_ns + cut.median,
            "memory": memory_per_series(series, calls),
        }
        mem = row["memory"]
        say(
            f"{series} x {requests}: cut {cut.median:,.0f} ns a request, total "
            f"{row['recorder_minus_empty_plus_cut_ns']:,.0f} ns; {mem['open_traced_bytes']:,.0f}"
            f" B a series open, {mem['cut_traced_bytes']:,.0f} B cut"
        )
        rows.append(row)
    return rows


def memory_per_series(series: int, calls: Sequence[Call], copies: int = 20) -> dict[str, float]:
    """Bytes allocated per series (tracemalloc) by ``copies`` recorders holding ``calls`` as
    one open interval, and after the cut.  Allocated, not resident: the counts arrays are
    zeroed allocations whose untouched pages may never become resident, and RSS growth in a
    process that freed as much before says little, so it is not reported."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    recs = [Recorder() for _ in range(copies)]
    for rec in recs:
        for c in calls:
            rec.request(*c)
    gc.collect()
    open_traced = tracemalloc.get_traced_memory()[0]
    for rec in recs:
        rec.cut()
    gc.collect()  # hdrh's histograms are reference cycles: freed by the collector only
    cut_traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del recs
    k = copies * series
    return {
        "open_traced_bytes": (open_traced - base) / k,
        "cut_traced_bytes": (cut_traced - base) / k,
    }


def new_series_cost(rounds: int, n: int = 2000) -> dict[str, Any]:
    """ns for a request whose label set is new (its Series and histograms are made)."""
    out: list[float] = []
    calls = [("inbound", "svc", f"peer-{i}", 200, 0.001, DEFAULT_ROUTE, "") for i in range(n)]
    for _ in range(rounds):
        rec = Recorder()
        out.append(_pass(rec.request, calls) / n)
        del rec
    return {"series_per_round": n, "ns_per_first_request": asdict(spread(out))}


def _filled(series: int, mix: Sequence[Call], seed: int) -> Recorder:
    """A recorder with ``series`` label sets that each saw between 1 and 2,000 requests."""
    rng = random.Random(seed)
    rec = Recorder()
    refill(rec, series, mix, rng)
    return rec


def refill(rec: Recorder, series: int, mix: Sequence[Call], rng: random.Random) -> int:
    """Record one interval's worth into ``series`` label sets; returns the request count."""
    total = 0
    for i in range(series):
        count = int(math.exp(rng.uniform(0, math.log(2000))))
        d, svc, _, status, _, route, host = mix[i % len(mix)]
        for k in range(count):
            seconds = mix[(i * 7919 + k) % len(mix)][4]
            rec.request(d, svc, f"peer-{i}", status, seconds, route, host)
        total += count
    return total


def cut_and_report(
    sizes: Sequence[int], rounds: int, mix: Sequence[Call], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        cut_ms: list[float] = []
        build_ms: list[float] = []
        dumps_ms: list[float] = []
        body = 0
        for r in range(rounds):
            rng = random.Random(r)
            rec = Recorder()
            refill(rec, n, mix, rng)
            gc.collect()
            t0 = time.perf_counter_ns()
            cuts = rec.cut()
            cut_ms.append((time.perf_counter_ns() - t0) / 1e6)
            assert len(cuts) == n
            refill(rec, n, mix, rng)
            gc.collect()
            t0 = time.perf_counter_ns()
            report = build_report("spiffe://nodemesh.local/dc/dc1/node/h1", r, 0.0, 10.0, rec,
                                  TcpDeltas(), 0)  # fmt: skip
            t1 = time.perf_counter_ns()
            data = json.dumps(report).encode()  # as ControllerClient._call sends it
            t2 = time.perf_counter_ns()
            build_ms.append((t1 - t0) / 1e6)
            dumps_ms.append((t2 - t1) / 1e6)
            body = max(body, len(data))
        row: dict[str, Any] = {
            "series": n,
            "cut_ms": asdict(spread(cut_ms)),
            "build_report_ms": asdict(spread(build_ms)),
            "json_dumps_ms": asdict(spread(dumps_ms)),
            "max_body_bytes": body,
        }
        say(
            f"{n} series: cut {row['cut_ms']['median']:.2f} ms, build_report "
            f"{row['build_report_ms']['median']:.2f} ms, json {row['json_dumps_ms']['median']:.2f}"
            f" ms, body {body:,} B"
        )
        rows.append(row)
    return rows


# --- the driver --------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"[recording {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(result: dict[str, Any]) -> str:
    pc = result["per_call"]["ns_per_call"]
    lines = [f"{'callable':<10} {'median ns':>10} {'min':>7} {'q1':>7} {'q3':>7} {'max':>7}"]
    for name, s in pc.items():
        lines.append(
            f"{name:<10} {s['median']:>10.0f} {s['low']:>7.0f} {s['q1']:>7.0f} {s['q3']:>7.0f} "
            f"{s['high']:>7.0f}"
        )
    add = result["per_call"]["recorder_minus_empty_ns"]
    lines.append(
        f"recording adds {add['median']:.0f} ns per request (range {add['low']:.0f}-"
        f"{add['high']:.0f} over {add['n']} rounds)"
    )
    lines.append(
        f"{'series x requests':>18} {'buckets':>8} {'cut ns/req':>11} {'total ns/req':>13} "
        f"{'KB/series open':>15} {'cut':>6}"
    )
    for row in result.get("interval", []):
        mem = row["memory"]
        lines.append(
            f"{row['series']:>8} x {row['requests_per_series']:<7,} {row['buckets_per_series']:>8}"
            f" {row['cut_ns_per_request']['median']:>11,.0f}"
            f" {row['recorder_minus_empty_plus_cut_ns']:>13,.0f}"
            f" {mem['open_traced_bytes'] / 1024:>15,.1f} {mem['cut_traced_bytes'] / 1024:>6,.1f}"
        )
    first = result["new_series"]["ns_per_first_request"]
    lines.append(f"first request of a new label set: {first['median'] / 1000:.0f} µs")
    lines.append(f"{'series':>7} {'cut ms':>8} {'build_report ms':>16} {'json ms':>8} {'body':>9}")
    for row in result["cut_and_report"]:
        lines.append(
            f"{row['series']:>7} {row['cut_ms']['median']:>8.2f} "
            f"{row['build_report_ms']['median']:>16.2f} {row['json_dumps_ms']['median']:>8.2f} "
            f"{row['max_body_bytes']:>9,}"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """Tables for docs/benchmarks.md from one result file (so no number is copied by hand)."""
    pc = result["per_call"]
    out = [
        "| callable | ns per call, median | quartiles | min – max |",
        "|---|---:|---|---|",
    ]
    for name, s in pc["ns_per_call"].items():
        out.append(
            f"| {name} | {s['median']:,.0f} | {s['q1']:,.0f} – {s['q3']:,.0f} "
            f"| {s['low']:,.0f} – {s['high']:,.0f} |"
        )
    add = pc["recorder_minus_empty_ns"]
    first = result["new_series"]["ns_per_first_request"]
    out.append(
        f"| recorder − empty, paired per round | {add['median']:,.0f} "
        f"| {add['q1']:,.0f} – {add['q3']:,.0f} | {add['low']:,.0f} – {add['high']:,.0f} |"
    )
    out.append(
        f"| first request of a new label set | {first['median']:,.0f} "
        f"| {first['q1']:,.0f} – {first['q3']:,.0f} | {first['low']:,.0f} – {first['high']:,.0f} |"
    )
    if "interval" in result:
        out += [
            "",
            "| series × requests in the interval | buckets a series | cut ns per request, median"
            " (min – max) | recorder − empty + cut, ns per request | KB allocated a series: "
            "interval open, after the cut |",
            "|---|---:|---|---:|---|",
        ]
        for row in result["interval"]:
            c, mem = row["cut_ns_per_request"], row["memory"]
            out.append(
                f"| {row['series']:,} × {row['requests_per_series']:,} "
                f"| {row['buckets_per_series']:,} "
                f"| {c['median']:,.0f} ({c['low']:,.0f} – {c['high']:,.0f}) "
                f"| {row['recorder_minus_empty_plus_cut_ns']:,.0f} "
                f"| {mem['open_traced_bytes'] / 1024:,.1f}, {mem['cut_traced_bytes'] / 1024:,.1f} |"
            )
    out += [
        "",
        "| series | cut ms | build_report ms (cut + encodings) | json.dumps ms | body bytes |",
        "|---:|---|---|---|---:|",
    ]
    for row in result["cut_and_report"]:
        cells = [
            f"{row[k]['median']:.2f} ({row[k]['low']:.2f} – {row[k]['high']:.2f})"
            for k in ("cut_ms", "build_report_ms", "json_dumps_ms")
        ]
        out.append(f"| {row['series']:,} | {' | '.join(cells)} | {row['max_body_bytes']:,} |")
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--markdown", nargs="+", type=Path, help="print tables of result files")
    ap.add_argument("--calls", type=int, default=200_000, help="calls per pass")
    ap.add_argument("--rounds", type=int, default=15, help="passes per callable")
    ap.add_argument("--cut-rounds", type=int, default=7, help="cuts/reports per size")
    ap.add_argument("--sizes", default="10,50,100,1000", help="series counts for cut/report")
    ap.add_argument("--rev", default="HEAD", help="commit to measure, or 'worktree'")
    ap.add_argument("--out", type=Path, help="the JSON result file (default: bench/results/)")
    args = ap.parse_args(argv)
    if not 1_000 <= args.calls <= 5_000_000:
        ap.error("--calls must be in [1000, 5000000]")
    if not 3 <= args.rounds <= 100 or not 1 <= args.cut_rounds <= 50:
        ap.error("--rounds must be in [3, 100] and --cut-rounds in [1, 50]")
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r} is not a comma-separated list of integers")
    if not all(1 <= s <= 5000 for s in args.sizes):
        ap.error("--sizes must each be in [1, 5000]")
    if args.out is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        args.out = HERE / "results" / f"recording-{stamp}.json"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    rev, _ = source.current()
    say(f"measuring nodemesh {rev}")
    load0 = loadavg()
    cpu0, busy0, wall0 = cpu_seconds(os.getpid()), machine_busy_seconds(), time.monotonic()
    calls = label_mix(args.calls)
    result: dict[str, Any] = {
        "benchmark": "recording",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "nodemesh": rev,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "loadavg_at_start": load0,
    }
    result["per_call"] = per_call(calls, args.rounds, say)
    added = result["per_call"]["recorder_minus_empty_ns"]["median"]
    result["interval"] = interval(args.cut_rounds, calls, added, say)
    result["new_series"] = new_series_cost(args.rounds)
    result["cut_and_report"] = cut_and_report(args.sizes, args.cut_rounds, calls, say)
    wall = time.monotonic() - wall0
    ours = cpu_seconds(os.getpid()) - cpu0
    result["wall_s"] = round(wall, 1)
    result["cores"] = {
        "bench": round(ours / wall, 2),
        # Anything else running on the machine competes for the other core and the caches.
        "not_ours": round((machine_busy_seconds() - busy0 - ours) / wall, 2),
    }
    result["loadavg_at_end"] = loadavg()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            print(f"**{path.name}**\n\n{markdown(json.loads(path.read_text()))}\n")
        return 0
    source.reexec_at(args.rev, Path(__file__).resolve(), argv)
    try:
        result = run(args)
    finally:
        source.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"results written to {args.out}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
