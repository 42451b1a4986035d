"""``nodemesh stat``: per-service traffic, merged exactly across every agent.

Each agent's ``/stats.json`` carries cumulative counters and HDR histograms (V2 encoding);
merging histograms is exact, so fleet percentiles are exact to the histogram's precision.
Rows are the *inbound* (server-side) view of each service, as ``linkerd viz stat`` shows it;
a service whose agents saw no inbound traffic yet falls back to the outbound view.  RPS comes
from the difference between two samples.

This reads the agents directly (found in Consul); aggregation in the controller over rolling
windows replaces the transport later without changing the table.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from nodemesh.telemetry.metrics import new_histogram

COLUMNS = (
    "NAME",
    "MESHED",
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
    "TCP_CONN",
)


@dataclass
class Row:
    name: str
    meshed: int = 0
    requests: int = 0
    failures: int = 0
    rps: float | None = None
    latency: HdrHistogram = field(default_factory=new_histogram)
    tcp_open: int = 0

    @property
    def success(self) -> float | None:
        return None if self.requests == 0 else 1.0 - self.failures / self.requests

    def as_json(self) -> dict[str, Any]:
        h = self.latency
        has = h.get_total_count() > 0
        return {
            "name": self.name,
            "meshed": self.meshed,
            "requests": self.requests,
            "success": self.success,
            "rps": self.rps,
            "latency_ms_p50": h.get_value_at_percentile(50) / 1000 if has else None,
            "latency_ms_p95": h.get_value_at_percentile(95) / 1000 if has else None,
            "latency_ms_p99": h.get_value_at_percentile(99) / 1000 if has else None,
            "tcp_open_connections": self.tcp_open,
        }


def fetch(admin: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """One agent's stats document, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{admin}/stats.json", timeout=timeout) as r:
            doc = json.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _decode(hdr: Any) -> HdrHistogram | None:
    if not isinstance(hdr, str):
        return None
    try:
        base64.b64decode(hdr, validate=True)
        h: HdrHistogram = HdrHistogram.decode(hdr)
    except Exception:  # a hostile or corrupt agent document must not break the table
        return None
    return h


def rows(docs: Iterable[Mapping[str, Any]], meshed: Mapping[str, int]) -> dict[str, Row]:
    """Merge agents' documents into one row per service."""
    by_dir: dict[str, dict[str, Row]] = {"inbound": {}, "outbound": {}}
    out: dict[str, Row] = {}
    for doc in docs:
        for s in doc.get("series", []) if isinstance(doc.get("series"), list) else []:
            if not isinstance(s, dict) or s.get("direction") not in by_dir:
                continue
            name, count = s.get("service"), s.get("count")
            if not isinstance(name, str) or isinstance(count, bool):
                continue
            if not isinstance(count, int) or count < 0:
                continue
            row = by_dir[s["direction"]].setdefault(name, Row(name))
            row.requests += count
            if s.get("status") in ("5xx", "error"):
                row.failures += count
            h = _decode(s.get("hdr"))
            if h is not None:
                # Values beyond this build's range (another version's agent): keep the count only.
                with contextlib.suppress(IndexError):
                    row.latency.add(h)
        for t in doc.get("tcp", []) if isinstance(doc.get("tcp"), list) else []:
            if isinstance(t, dict) and t.get("direction") == "inbound":
                row = by_dir["inbound"].setdefault(
                    str(t.get("service")), Row(str(t.get("service")))
                )
                opened, closed = t.get("opened"), t.get("closed")
                if isinstance(opened, int) and isinstance(closed, int):
                    row.tcp_open += max(opened - closed, 0)
    for name in set(by_dir["inbound"]) | set(by_dir["outbound"]) | set(meshed):
        found = by_dir["inbound"].get(name)
        if found is None or found.requests == 0:
            found = by_dir["outbound"].get(name) or found
        row = found or Row(name)
        row.meshed = meshed.get(name, 0)
        out[name] = row
    return out


def with_rates(now: Mapping[str, Row], before: Mapping[str, Row], seconds: float) -> None:
    for name, row in now.items():
        prev = before.get(name)
        if prev is not None and seconds > 0:
            row.rps = max(row.requests - prev.requests, 0) / seconds


def _ms(h: HdrHistogram, pct: float) -> str:
    if h.get_total_count() == 0:
        return "-"
    return f"{h.get_value_at_percentile(pct) / 1000:.2f}ms"


def table(rows_: Sequence[Row]) -> str:
    lines = [COLUMNS]
    for r in sorted(rows_, key=lambda r: r.name):
        lines.append(
            (
                r.name,
                str(r.meshed),
                "-" if r.success is None else f"{r.success * 100:.2f}%",
                "-" if r.rps is None else f"{r.rps:.1f}",
                _ms(r.latency, 50),
                _ms(r.latency, 95),
                _ms(r.latency, 99),
                str(r.tcp_open),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
