"""``nodemesh stat`` and ``nodemesh edges`` from the controller's rows: tables, JSON and a graph.

The controller answers ``GET /v1/metrics`` with JSON rows (docs/observability.md, fetched by
``telemetry.query``); everything here is pure:
rows in, text out.  A row from a controller of another version may lack a field or carry a
wrong type; such a value shows as ``-`` and never breaks the table (the controller's answer is
input like any other).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nodemesh.identity import spiffe
from nodemesh.telemetry.stat import COLUMNS as STAT_COLUMNS

EDGE_COLUMNS = ("SRC", "DST", "SRC_ID", "DST_ID", "SECURED")
KINDS = ("services", "routes", "hosts")


@dataclass(frozen=True)
class StatRow:
    name: str
    meshed: int | None
    requests: int | None
    success: float | None  # 0..1
    rps: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    tcp_opened: int | None  # connections opened in the window


@dataclass(frozen=True)
class EdgeRow:
    src: str
    dst: str
    src_id: str
    dst_id: str
    secured: bool
    requests: int | None
    success: float | None
    latency_ms_p99: float | None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) and f >= 0 else None


def _ratio(v: Any) -> float | None:
    f = _num(v)
    return f if f is not None and f <= 1.0 else None


def _str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _ms(latency: Any, key: str) -> float | None:
    us = _num(latency.get(key)) if isinstance(latency, Mapping) else None
    return None if us is None else us / 1000


def stat_rows(docs: Sequence[Any]) -> list[StatRow]:
    """One ``StatRow`` per well-formed controller row (``by`` service, route or host), sorted
    by name; nameless rows are dropped.

    TCP_CONN is the number of connections *opened* in the window: the controller keeps interval
    deltas, not a gauge of open connections (docs/observability.md).
    """
    out = []
    for d in docs:
        if not isinstance(d, Mapping) or not _str(d.get("name")):
            continue
        lat, tcp = d.get("latency_us"), d.get("tcp")
        out.append(
            StatRow(
                name=d["name"],
                meshed=_int(d.get("hosts")),
                requests=_int(d.get("requests")),
                success=_ratio(d.get("success_rate")),
                rps=_num(d.get("rps")),
                latency_ms_p50=_ms(lat, "p50"),
                latency_ms_p95=_ms(lat, "p95"),
                latency_ms_p99=_ms(lat, "p99"),
                tcp_opened=_int(tcp.get("opened")) if isinstance(tcp, Mapping) else None,
            )
        )
    return sorted(out, key=lambda r: r.name)


def edge_rows(docs: Sequence[Any]) -> list[EdgeRow]:
    """One ``EdgeRow`` per ``by=edge`` row, sorted by (src, dst).

    The controller's edge key is the client identity and the destination service, seen on the
    server side.  A client identity that is a SPIFFE ID came from a verified client certificate,
    so that edge is secured by mTLS; anything else (no identity) is not.  The destination's
    identity is the service's SPIFFE ID in the client's trust domain and datacenter.
    """
    out = []
    for d in docs:
        key = d.get("key") if isinstance(d, Mapping) else None
        if not isinstance(d, Mapping) or not isinstance(key, Mapping):
            continue
        src_id, dst = _str(key.get("src")), _str(key.get("dst"))
        if not dst:
            continue
        src = spiffe.parse(src_id)
        dst_id = spiffe.service_id(src.trust_domain, src.datacenter, dst).uri if src else ""
        out.append(
            EdgeRow(
                src=src.name if src else (src_id or "unknown"),
                dst=dst,
                src_id=src_id,
                dst_id=dst_id,
                secured=src is not None,
                requests=_int(d.get("requests")),
                success=_ratio(d.get("success_rate")),
                latency_ms_p99=_ms(d.get("latency_us"), "p99"),
            )
        )
    return sorted(out, key=lambda r: (r.src, r.dst))


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}ms"


def _opt(v: int | float | None, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def columns(lines: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns three spaces apart, no trailing blanks (like ``linkerd viz``)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def stat_table(rows: Sequence[StatRow]) -> str:
    lines: list[Sequence[str]] = [STAT_COLUMNS]
    for r in rows:
        lines.append(
            (
                r.name,
                _opt(r.meshed),
                pct(r.success),
                _opt(r.rps, "{:.1f}"),
                ms(r.latency_ms_p50),
                ms(r.latency_ms_p95),
                ms(r.latency_ms_p99),
                _opt(r.tcp_opened),
            )
        )
    return columns(lines)


def edges_table(rows: Sequence[EdgeRow]) -> str:
    lines: list[Sequence[str]] = [EDGE_COLUMNS]
    for r in rows:
        lines.append((r.src, r.dst, r.src_id or "-", r.dst_id or "-", "yes" if r.secured else "no"))
    return columns(lines)


def to_json(rows: Sequence[StatRow] | Sequence[EdgeRow]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)


def _dot_id(s: str) -> str:
    """A DOT quoted ID: backslashes and quotes escaped, newlines flattened."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def edges_dot(rows: Sequence[EdgeRow]) -> str:
    """A Graphviz digraph of who calls whom; each edge labelled with success rate and p99.
    Unsecured (plaintext) edges are drawn dashed and red so they stand out."""
    lines = [
        "digraph nodemesh {",
        "  rankdir=LR;",
        '  node [shape=box, style=rounded, fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    for name in sorted({r.src for r in rows} | {r.dst for r in rows}):
        lines.append(f"  {_dot_id(name)};")
    for r in rows:
        label = f"{pct(r.success)}  p99 {ms(r.latency_ms_p99)}"
        if r.requests is not None:
            label += f"\\n{r.requests} req"
        style = "" if r.secured else ", style=dashed, color=red"
        # The label has already-escaped "\n" (a DOT line break) and no quotes of its own.
        lines.append(f'  {_dot_id(r.src)} -> {_dot_id(r.dst)} [label="{label}"{style}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
