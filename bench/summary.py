"""Medians over rounds, a table per workload, and the open-loop latency plot (pure but the plot).

Every number in a table is the median over the rounds in which that point succeeded (``n``
says how many).  "Added" columns subtract the direct path's median from the same workload and
setting; the bulk ratio divides by Consul's pair.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workloads import CONNECT, CONTENDERS, DIRECT, WORKLOADS

Point = tuple[str, int, str]  # workload, setting, contender


def dig(r: dict[str, Any], path: str) -> float | None:
    """``r["latency_ms"]["p99.9"]`` for "latency_ms.p99.9" (one level down at most)."""
    top, _, rest = path.partition(".")
    v = r.get(top)
    if rest:
        v = v.get(rest) if isinstance(v, dict) else None
    return _num(v)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


METRICS = (
    "rps", "latency_ms.p50", "latency_ms.p90", "latency_ms.p99", "latency_ms.p99.9",
    "error_count", "mib_per_s", "seconds",
)  # fmt: skip


def medians(results: Sequence[dict[str, Any]]) -> dict[Point, dict[str, Any]]:
    """Per point: the median of each metric and of each process's CPU and RSS, over rounds."""
    by: dict[Point, list[dict[str, Any]]] = {}
    failed: dict[Point, list[str]] = {}
    for r in results:
        key = (r["workload"], r["setting"], r["contender"])
        if r.get("error"):
            failed.setdefault(key, []).append(r["error"])
        else:
            by.setdefault(key, []).append(r)
    out: dict[Point, dict[str, Any]] = {}
    for key in sorted({*by, *failed}, key=_order):
        rows = by.get(key, [])
        m: dict[str, Any] = {"n": len(rows), "failed": failed.get(key, [])}
        for metric in METRICS:
            vals = [v for v in (dig(r, metric) for r in rows) if v is not None]
            if vals:
                m[metric] = statistics.median(vals)
        procs: dict[str, dict[str, list[float]]] = {}
        for r in rows:
            for p in r.get("processes", []):
                for k in ("cpu_us_per_request", "cpu_s_per_gib", "max_rss_mib"):
                    if k in p:
                        procs.setdefault(p["label"], {}).setdefault(k, []).append(p[k])
        m["processes"] = {
            label: {k: statistics.median(v) for k, v in d.items()} for label, d in procs.items()
        }
        for k in ("rss_mib_before", "rss_mib_held", "open_fds_held"):
            per: dict[str, list[float]] = {}
            for r in rows:
                for label, v in r.get(k, {}).items():
                    per.setdefault(label, []).append(v)
            if per:
                m[k] = {label: statistics.median(v) for label, v in per.items()}
        if rows and "connections" in rows[0]:
            m["connections_open"] = statistics.median(r["connections"]["open"] for r in rows)
        out[key] = m
    return out


def _order(key: Point) -> tuple[int, int, int]:
    w, s, c = key
    names = list(WORKLOADS)
    return (names.index(w) if w in names else 99, s, CONTENDERS.index(c))


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _procs(m: dict[str, Any], key: str, unit: str, fmt: str = ".0f") -> str:
    return "; ".join(
        f"{label} {d[key]:{fmt}}{unit}" for label, d in m["processes"].items() if key in d
    )


def tables(med: dict[Point, dict[str, Any]], idle_rss: dict[str, float]) -> str:
    out: list[str] = []
    for name, w in WORKLOADS.items():
        points = {k: v for k, v in med.items() if k[0] == name}
        if not points:
            continue
        out += ["", f"== {name}: {w.title} (medians over rounds)"]
        out += _table(name, points, med, idle_rss)
    return "\n".join(out).lstrip("\n")


def _fails(m: dict[str, Any]) -> str:
    if not m["failed"]:
        return ""
    return f"  FAILED {len(m['failed'])}x: {m['failed'][0][:160]}"


def _table(
    name: str,
    points: dict[Point, dict[str, Any]],
    med: dict[Point, dict[str, Any]],
    idle_rss: dict[str, float],
) -> list[str]:
    lines: list[str] = []

    def direct(setting: int, metric: str) -> float | None:
        return med.get((name, setting, DIRECT), {}).get(metric)

    if name in ("c1", "c16", "pieces", "h2", "grpc"):
        lines.append(
            f"{'path':<15} {'n':>2} {'req/s':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'+p50 ms':>7}  CPU per request"
        )
        for (_, s, c), m in points.items():
            p50, base = m.get("latency_ms.p50"), direct(s, "latency_ms.p50")
            added = None if p50 is None or base is None or c == DIRECT else p50 - base
            lines.append(
                f"{c:<15} {m['n']:>2} {_f(m.get('rps'), ',.0f'):>9} {_f(p50):>7} "
                f"{_f(m.get('latency_ms.p90')):>7} {_f(m.get('latency_ms.p99')):>7} "
                f"{_f(m.get('error_count'), '.0f'):>6} {_f(added):>7}  "
                f"{_procs(m, 'cpu_us_per_request', 'us')}{_fails(m)}"
            )
    elif name == "open":
        lines.append(
            f"{'rate':>5} {'path':<15} {'n':>2} {'achieved':>8} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7} {'p99.9':>7} {'errors':>6} {'+p99 ms':>7}  CPU per request"
        )
        for (_, s, c), m in points.items():
            p99, base = m.get("latency_ms.p99"), direct(s, "latency_ms.p99")
            added = None if p99 is None or base is None or c == DIRECT else p99 - base
            lines.append(
                f"{s:>5} {c:<15} {m['n']:>2} {_f(m.get('rps'), ',.0f'):>8} "
                f"{_f(m.get('latency_ms.p50')):>7} {_f(m.get('latency_ms.p90')):>7} "
                f"{_f(p99):>7} {_f(m.get('latency_ms.p99.9')):>7} "
                f"{_f(m.get('error_count'), '.0f'):>6} {_f(added):>7}  "
                f"{_procs(m, 'cpu_us_per_request', 'us')}{_fails(m)}"
            )
    elif name == "bulk":
        lines.append(f"{'path':<15} {'n':>2} {'MiB/s':>8} {'seconds':>8} {'/consul':>7}  CPU s/GiB")
        for (_, s, c), m in points.items():
            rate = m.get("mib_per_s")
            ref = med.get((name, s, CONNECT), {}).get("mib_per_s")
            ratio = None if rate is None or not ref else rate / ref
            lines.append(
                f"{c:<15} {m['n']:>2} {_f(rate, ',.0f'):>8} {_f(m.get('seconds')):>8} "
                f"{_f(ratio):>7}  {_procs(m, 'cpu_s_per_gib', 's', '.2f')}{_fails(m)}"
            )
    elif name == "memory":
        lines.append(
            f"{'path':<15} {'n':>2} {'conns':>5}  RSS MiB idle at start / before / with the "
            "connections (targets: <= 40 idle, <= 80 with 1,000)"
        )
        for (_, _s, c), m in points.items():
            held = m.get("rss_mib_held", {})
            before = m.get("rss_mib_before", {})
            rss = "; ".join(
                f"{label} {_f(idle_rss.get(label), '.0f')} / {_f(before.get(label), '.0f')} / "
                f"{_f(v, '.0f')}"
                for label, v in held.items()
            )
            conns = _f(m.get("connections_open"), ".0f")
            lines.append(f"{c:<15} {m['n']:>2} {conns:>5}  {rss}{_fails(m)}")
    return lines


def plot_open_loop(med: dict[Point, dict[str, Any]], rate: int, path: Path) -> bool:
    """Latency percentiles per path at ``rate`` req/s offered; False when nothing to plot."""
    series = {
        c: [m.get(f"latency_ms.{p}") for p in ("p50", "p90", "p99", "p99.9")]
        for (w, s, c), m in med.items()
        if w == "open" and s == rate and m.get("latency_ms.p50") is not None
    }
    if not series:
        return False
    import matplotlib  # only the plot needs it (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = ["p50", "p90", "p99", "p99.9"]
    for contender, ys in series.items():
        pts = [(x, y) for x, y in zip(labels, ys, strict=True) if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=contender)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, not 5x10^-1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_xlabel("percentile (median over rounds)")
    ax.set_title(f"Open loop HTTP/1.1 at {rate:,} req/s offered (h2load --h1 -c10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
