"""``nodemesh top``'s pure half: rows, sorting, filtering, key handling and screen lines.

Theory of operation
-------------------
``View`` is the whole state of the screen: the last rows fetched, the sort column, the service
filter, a status line and, while the operator types a filter, the prompt text.  ``press``
turns one key into a new state (and says whether to quit); ``lines`` turns a state and a
terminal size into the exact strings to draw.  The curses layer (``top.screen``) only reads
keys, fetches rows and draws those strings, so everything an operator sees is tested here
without a terminal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from nodemesh.identity import spiffe

# The columns ``linkerd viz top`` shows, in its order.
HEADERS = (
    "Source",
    "Destination",
    "Method",
    "Path",
    "Count",
    "Best",
    "Worst",
    "Last",
    "Success Rate",
)
# Sort columns, cycled by ``s``.  Counts and latencies sort high first, names A-Z.
SORTS = ("count", "worst", "best", "last", "success", "source", "destination", "path")
MIN_FLEX = 6  # narrowest a name column may get before columns are dropped
_METHOD = re.compile(r"[A-Z]{1,16}")
ELLIPSIS = "~"  # ASCII, so every terminal draws a truncated cell in one column


@dataclass(frozen=True)
class TopRow:
    source: str
    destination: str
    method: str
    path: str
    count: int
    best_ms: float | None
    worst_ms: float | None
    last_ms: float | None
    success: float | None  # 0..1


@dataclass(frozen=True)
class View:
    rows: tuple[TopRow, ...] = ()
    sort: str = "count"
    service: str = ""  # filter: rows whose source or destination is this service
    status: str = ""  # "" when the last fetch worked
    prompt: str | None = None  # the filter being typed, or None


# --- rows from the controller -------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) and f >= 0 else None


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _us_to_ms(latency: Any, key: str) -> float | None:
    us = _num(latency.get(key)) if isinstance(latency, Mapping) else None
    return None if us is None else us / 1000


def _edge(d: Any) -> tuple[str, str, str] | None:
    key = d.get("key") if isinstance(d, Mapping) else None
    if not isinstance(key, Mapping):
        return None
    src, dst, route = _text(key.get("src")), _text(key.get("dst")), _text(key.get("route"))
    return (src, dst, route) if dst else None


def split_route(route: str) -> tuple[str, str]:
    """(method, path) shown for a route: a name like ``GET /users/{id}`` splits at its first
    space; any other name is all path, under any method."""
    method, sep, path = route.partition(" ")
    if sep and path and _METHOD.fullmatch(method):
        return method, path
    return ("*", route) if route else ("", "")


def _name(identity: str) -> str:
    """A caller is shown by its service name; one without an identity was not mTLS."""
    ident = spiffe.parse(identity)
    return ident.name if ident is not None else (identity or "unknown")


def parse_rows(window: Sequence[Any], last: Sequence[Any] = ()) -> tuple[TopRow, ...]:
    """Rows from the controller's ``by=edge_route`` answers: ``window`` over the view's window
    and ``last`` over the newest 10 s slot.

    The controller keeps histograms, not single requests, so Best is the window's fastest
    request (``min``, when the controller sends it), Worst its slowest (``max``) and Last the
    median of the newest slot: what the edge is doing right now.  Method and Path are the
    route's (``split_route``): the mesh counts routes, never raw paths, so that a flood of
    unique paths cannot grow it; a request no route matched shows as ``[default]``.
    """
    recent: dict[tuple[str, str, str], float | None] = {}
    for d in last:
        edge = _edge(d)
        if edge is not None:
            recent[edge] = _us_to_ms(d.get("latency_us"), "p50")
    out = []
    for d in window:
        edge = _edge(d)
        count = d.get("requests") if edge is not None else None
        if edge is None or isinstance(count, bool) or not isinstance(count, int) or count < 0:
            continue
        lat = d.get("latency_us")
        success = _num(d.get("success_rate"))
        method, path = split_route(edge[2])
        out.append(
            TopRow(
                source=_name(edge[0]),
                destination=edge[1],
                method=method,
                path=path,
                count=count,
                best_ms=_us_to_ms(lat, "min"),
                worst_ms=_us_to_ms(lat, "max"),
                last_ms=recent.get(edge),
                success=success if success is not None and success <= 1 else None,
            )
        )
    return tuple(out)


# --- sorting and filtering ----------------------------------------------------------------------


def _tie(r: TopRow) -> tuple[str, str, str, str]:
    return (r.source, r.destination, r.method, r.path)


def sort_rows(rows: Sequence[TopRow], key: str) -> list[TopRow]:
    """Numbers high first (missing ones last), names A-Z; ties in a stable, readable order."""
    if key in ("source", "destination", "path"):
        return sorted(rows, key=lambda r: (getattr(r, key), _tie(r)))
    field = {"count": "count", "worst": "worst_ms", "best": "best_ms", "last": "last_ms"}.get(
        key, key
    )

    def k(r: TopRow) -> tuple[bool, float, tuple[str, str, str, str]]:
        v = getattr(r, field)
        return (v is None, -(v or 0.0), _tie(r))

    return sorted(rows, key=k)


def filter_rows(rows: Sequence[TopRow], service: str) -> list[TopRow]:
    if not service:
        return list(rows)
    return [r for r in rows if service in (r.source, r.destination)]


def next_sort(key: str) -> str:
    return SORTS[(SORTS.index(key) + 1) % len(SORTS)] if key in SORTS else SORTS[0]


# --- keys ---------------------------------------------------------------------------------------

ENTER = ("\n", "\r", "KEY_ENTER")
ESCAPE = "\x1b"
BACKSPACE = ("KEY_BACKSPACE", "\x7f", "\b")


def press(view: View, key: str) -> tuple[View, bool]:
    """(the view after ``key``, whether to quit).  Keys are curses names or single characters."""
    if view.prompt is not None:
        if key in ENTER:
            return replace(view, service=view.prompt.strip(), prompt=None), False
        if key == ESCAPE:
            return replace(view, prompt=None), False
        if key in BACKSPACE:
            return replace(view, prompt=view.prompt[:-1]), False
        if len(key) == 1 and key.isprintable():
            return replace(view, prompt=(view.prompt + key)[:128]), False
        return view, False
    if key in ("q", "Q"):
        return view, True
    if key == "s":
        return replace(view, sort=next_sort(view.sort)), False
    if key == "f":
        return replace(view, prompt=""), False
    return view, False


# --- drawing ------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}ms" if v >= 100 else f"{v:.1f}ms"


def cells(r: TopRow) -> tuple[str, ...]:
    return (
        r.source,
        r.destination,
        r.method or "-",
        r.path or "-",
        str(r.count),
        _ms(r.best_ms),
        _ms(r.worst_ms),
        _ms(r.last_ms),
        "-" if r.success is None else f"{r.success * 100:.2f}%",
    )


FLEX = (0, 1, 3)  # source, destination, path: these shrink; the rest keep their width
DROP_ORDER = (7, 2, 5, 6)  # dropped first when even shrunk names do not fit: last, method, ...


def fit(widths: Sequence[int], total: int, gap: int = 2) -> list[int]:
    """Column widths that fit ``total``: 0 means the column is not shown.

    Name columns shrink (widest first) down to ``MIN_FLEX``; if that is not enough, the least
    needed columns are dropped in ``DROP_ORDER``; the last resort cuts whatever remains.
    """
    w = list(widths)

    def used() -> int:
        shown = [x for x in w if x > 0]
        return sum(shown) + gap * max(len(shown) - 1, 0)

    while used() > total:
        flex = [i for i in FLEX if w[i] > MIN_FLEX]
        if not flex:
            break
        widest = max(flex, key=lambda i: w[i])
        w[widest] -= min(used() - total, w[widest] - MIN_FLEX, max(w[widest] // 4, 1))
    for i in DROP_ORDER:
        if used() <= total:
            break
        w[i] = 0
    return w


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(width - 1, 0)] + ELLIPSIS


def _row(values: Sequence[str], widths: Sequence[int], numeric_from: int, total: int) -> str:
    parts = []
    for i, (v, w) in enumerate(zip(values, widths, strict=True)):
        if w <= 0:
            continue
        v = _cut(v, w)
        parts.append(v.rjust(w) if i >= numeric_from else v.ljust(w))
    return "  ".join(parts).rstrip()[:total]


def visible(view: View) -> list[TopRow]:
    return sort_rows(filter_rows(view.rows, view.service), view.sort)


def lines(view: View, width: int, height: int) -> list[str]:
    """The screen, top to bottom: a title, the column headers, then as many rows as fit."""
    if width <= 0 or height <= 0:
        return []
    rows = visible(view)
    # A status (the controller is away) replaces the name, so even a narrow terminal shows it.
    title = f"[{view.status}]" if view.status else "nodemesh top"
    title += f"  sort: {view.sort}"
    if view.service:
        title += f"  filter: {view.service}"
    title += f"  rows: {len(rows)}"
    if view.prompt is not None:
        title = f"filter by service (Enter to apply, Esc to cancel): {view.prompt}"
    help_ = "" if view.prompt is not None else "  s: sort  f: filter  q: quit"
    out = [(title + help_ if len(title) + len(help_) <= width else title)[:width]]
    table = [cells(r) for r in rows[: max(height - 2, 0)]]
    widths = [max([len(HEADERS[i])] + [len(c[i]) for c in table]) for i in range(len(HEADERS))]
    widths = fit(widths, width)
    if height > 1:
        out.append(_row(HEADERS, widths, 4, width))
    out.extend(_row(c, widths, 4, width) for c in table)
    return out[:height]
