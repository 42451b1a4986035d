"""Render a ``Recorder`` in the Prometheus text exposition format (version 0.0.4).

Latency is a summary whose quantiles come from the HDR histogram, so they are exact to its
precision instead of interpolated inside buckets.  Names follow Prometheus conventions: base
units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

from collections.abc import Iterable

from nodemesh.telemetry.metrics import Recorder, Series

QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _request_labels(s: Series) -> dict[str, str]:
    return {
        "direction": s.direction,
        "service": s.service,
        "peer": s.peer,
        "route": s.route,
        "dst_host": s.endpoint,
        "status_class": s.status,
    }


def render(rec: Recorder, extra: Iterable[str] = ()) -> str:
    out: list[str] = []
    series = sorted(
        rec.series(),
        key=lambda s: (s.direction, s.service, s.peer, s.route, s.endpoint, s.status),
    )
    out.append("# HELP nodemesh_requests_total HTTP requests proxied, by status class.")
    out.append("# TYPE nodemesh_requests_total counter")
    for s in series:
        lb = _labels(**_request_labels(s))
        out.append(f"nodemesh_requests_total{lb} {s.count}")
    out.append(
        "# HELP nodemesh_request_duration_seconds Proxied request latency (HDR, exact quantiles)."
    )
    out.append("# TYPE nodemesh_request_duration_seconds summary")
    for s in series:
        base = _request_labels(s)
        h = s.latency
        for q in QUANTILES:
            v = h.get_value_at_percentile(q * 100) / 1e6
            out.append(
                f"nodemesh_request_duration_seconds{_labels(**base, quantile=str(q))} {v:.6f}"
            )
        total = h.get_mean_value() * h.get_total_count() / 1e6
        out.append(f"nodemesh_request_duration_seconds_sum{_labels(**base)} {total:.6f}")
        out.append(
            f"nodemesh_request_duration_seconds_count{_labels(**base)} {h.get_total_count()}"
        )
    tcp = sorted(rec.tcp_series(), key=lambda t: (t.direction, t.service))
    for name, help_, kind, attr in (
        ("nodemesh_tcp_connections_total", "TCP connections opened.", "counter", "opened"),
        ("nodemesh_tcp_closed_total", "TCP connections closed.", "counter", "closed"),
        (
            "nodemesh_tcp_read_bytes_total",
            "Bytes read from the client side.",
            "counter",
            "bytes_in",
        ),
        (
            "nodemesh_tcp_write_bytes_total",
            "Bytes written to the client side.",
            "counter",
            "bytes_out",
        ),
    ):
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for t in tcp:
            out.append(
                f"{name}{_labels(direction=t.direction, service=t.service)} {getattr(t, attr)}"
            )
    out.append("# HELP nodemesh_tcp_open_connections TCP connections open now.")
    out.append("# TYPE nodemesh_tcp_open_connections gauge")
    for t in tcp:
        lb = _labels(direction=t.direction, service=t.service)
        out.append(f"nodemesh_tcp_open_connections{lb} {t.opened - t.closed}")
    out.append("# HELP nodemesh_series_overflow_total Requests recorded in the overflow series.")
    out.append("# TYPE nodemesh_series_overflow_total counter")
    out.append(f"nodemesh_series_overflow_total {rec.overflowed}")
    out.append(
        "# HELP nodemesh_reports_dropped_total Interval reports dropped before the controller "
        "accepted them (backlog full, or refused as malformed)."
    )
    out.append("# TYPE nodemesh_reports_dropped_total counter")
    out.append(f"nodemesh_reports_dropped_total {rec.reports_dropped}")
    out.extend(extra)
    return "\n".join(out) + "\n"
