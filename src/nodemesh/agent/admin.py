"""The admin listener (127.0.0.1:4191): ``/live``, ``/ready``, ``/metrics``, ``/stats.json``.

``/stats.json`` carries each series' HDR histogram in the standard V2 encoding (base64), so
``nodemesh stat`` can merge hosts exactly.  Requests are GET only, heads are bounded, and a
misbehaving client only ever affects its own connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import trio

from nodemesh import __version__
from nodemesh.agent.state import AgentState
from nodemesh.errors import malformed_request
from nodemesh.protocol.h1codec import LENGTH, ProtocolError, Request, Response, ServerConn
from nodemesh.proxy.http1 import next_event, respond_error
from nodemesh.telemetry import prometheus
from nodemesh.transport.edges import downstream_errors

IDLE_TIMEOUT = 30.0


def stats(agent: AgentState) -> dict[str, object]:
    rec = agent.recorder
    return {
        "node": agent.cfg.node,
        "version": __version__,
        "time": time.time(),
        "started": rec.started,
        "series": [
            {
                "direction": s.direction,
                "service": s.service,
                "peer": s.peer,
                "route": s.route,
                "endpoint": s.endpoint,
                "status": s.status,
                "count": s.count,
                "hdr": s.latency.encode().decode("ascii"),
            }
            for s in rec.series()
        ],
        "tcp": [
            {
                "direction": t.direction,
                "service": t.service,
                "opened": t.opened,
                "closed": t.closed,
                "bytes_in": t.bytes_in,
                "bytes_out": t.bytes_out,
            }
            for t in rec.tcp_series()
        ],
    }


def _extra_metrics(agent: AgentState) -> list[str]:
    out = [
        "# HELP nodemesh_ready Whether the agent is ready to proxy (1) or not (0).",
        "# TYPE nodemesh_ready gauge",
        f"nodemesh_ready {int(agent.ready())}",
        "# HELP nodemesh_catalog_services Meshed services in the current catalog snapshot.",
        "# TYPE nodemesh_catalog_services gauge",
        f"nodemesh_catalog_services {len(agent.snapshot.endpoints)}",
        "# HELP nodemesh_identity_expiry_timestamp_seconds When each held certificate expires.",
        "# TYPE nodemesh_identity_expiry_timestamp_seconds gauge",
    ]
    for info in agent.identities.identities():
        ident = str(info.identity).replace('"', "")
        out.append(
            f'nodemesh_identity_expiry_timestamp_seconds{{identity="{ident}"}} {info.not_after:.0f}'
        )
    return out


def _routes(agent: AgentState) -> dict[bytes, Callable[[], tuple[int, bytes, bytes]]]:
    def live() -> tuple[int, bytes, bytes]:
        return 200, b"text/plain", b"live\n"

    def ready() -> tuple[int, bytes, bytes]:
        ok = agent.ready()
        return (200 if ok else 503), b"text/plain", b"ready\n" if ok else b"not ready\n"

    def metrics() -> tuple[int, bytes, bytes]:
        body = prometheus.render(agent.recorder, _extra_metrics(agent)).encode()
        return 200, b"text/plain; version=0.0.4; charset=utf-8", body

    def stats_json() -> tuple[int, bytes, bytes]:
        return 200, b"application/json", json.dumps(stats(agent)).encode()

    return {b"/live": live, b"/ready": ready, b"/metrics": metrics, b"/stats.json": stats_json}


class Admin:
    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
        self.routes = _routes(agent)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = ServerConn()
        while True:
            ev: object = None
            with trio.move_on_after(IDLE_TIMEOUT):
                try:
                    ev = await next_event(conn, stream)
                    while type(ev) is Request and not conn.request_done:
                        await next_event(conn, stream)  # discard any request body
                except ProtocolError as e:
                    err = malformed_request(f"malformed request: {e}", e.error_status_hint)
                    await respond_error(conn, stream, err)
                    return
            if type(ev) is not Request or not conn.request_done:
                return
            path = ev.target.split(b"?", 1)[0]
            fn = self.routes.get(path)
            if ev.method not in (b"GET", b"HEAD"):
                status, ctype, body = 405, b"text/plain", b"only GET is allowed\n"
            elif fn is None:
                status, ctype, body = 404, b"text/plain", b"not found; try /live /ready /metrics\n"
            else:
                status, ctype, body = fn()
            headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
            out = conn.send_response(Response(status, [], framing=LENGTH), headers)
            out += conn.send_data(body) + conn.send_end()
            with downstream_errors():
                await stream.send_all(out)
            if not conn.reusable:
                return
            conn.start_next_cycle()
