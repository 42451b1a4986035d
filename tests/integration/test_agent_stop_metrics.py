"""A stopping agent loses no counted request: a real agent process, a real controller, real Consul.

The agent runs as ``nodemesh agent`` (its own process, SIGTERM as systemd sends it) on loopback
with interception off, serving ``stopweb``, a small HTTP app in this test.  This test is the
peer: it dials the agent's inbound listener over mTLS with a node certificate from the
controller and sends N requests, well inside a 60 s reporting interval, then stops the agent.
No periodic cut ever happens, so only the last, partial interval carries the requests: the
controller must count exactly N, also when it was down while the agent stopped (the agent
saves its backlog and delivers it after a restart).
"""

from __future__ import annotations

import json
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from nodemesh.identity import spiffe, tls
from nodemesh.identity.client import ControllerClient
from nodemesh.protocol.http1 import DST_HEADER
from nodemesh.telemetry import reporter
from tests.integration.devconsul import NODE, DevConsul, free_ports
from tests.integration.test_controller_api import DC, TD, Running, _config, _start
from tests.integration.test_metrics_report import _node_pair

pytestmark = pytest.mark.integration
NODEMESH = Path(sys.executable).parent / "nodemesh"
SERVICE = "stopweb"
START_TIMEOUT = 30.0  # seconds for an agent to serve its first request
SLOT_S = 10  # the controller's slot (controller.metrics)
STOP_TIMEOUT = 20.0  # seconds for SIGTERM to end it (grace 5 s + deregister + STOP_DEADLINE)


# --- the app, the agent, the peer --------------------------------------------------------------


async def _app(stream: trio.SocketStream) -> None:
    """A keep-alive HTTP/1.1 app answering 200 to everything."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.EndOfMessage):
                headers = [("content-length", "2")]
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=b"ok")))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, h11.ProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


@dataclass
class Setup:
    consul: DevConsul
    tmp: Path
    controller_cfg: Any
    app_port: int
    agent_toml: Path
    inbound_port: int

    @property
    def state_dir(self) -> Path:
        return self.tmp / "agent"


@pytest.fixture
async def setup(dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery) -> Setup:
    ctl_port, app_port, outbound, inbound, admin = free_ports(5)
    listeners = await trio.open_tcp_listeners(app_port, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, _app, listeners)
    await trio.to_thread.run_sync(
        lambda: dev_consul.client().agent.service.register(
            SERVICE, service_id=f"{SERVICE}-1", address="127.0.0.1", port=app_port
        )
    )
    cfg = replace(_config(tmp_path, dev_consul.http_port), listen=("127.0.0.1", ctl_port))  # type: ignore[type-var]
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f"""
[agent]
node = "{NODE}"
datacenter = "{DC}"
trust_domain = "{TD}"
state_dir = "{tmp_path / "agent"}"

[listen]
outbound = "127.0.0.1:{outbound}"
inbound = "127.0.0.1:{inbound}"
admin = "127.0.0.1:{admin}"

[interception]
enabled = false

[consul]
address = "127.0.0.1:{dev_consul.http_port}"

[controller]
address = "127.0.0.1:{ctl_port}"
ca_file = "{tmp_path / "controller" / "ca.pem"}"
join_token_file = "{tmp_path / "join-token"}"

[shutdown]
grace = "5s"

[telemetry]
interval = "60s"

[log]
format = "json"
level = "debug"
"""
    )
    return Setup(dev_consul, tmp_path, cfg, app_port, toml, inbound)


@asynccontextmanager
async def controller(setup: Setup) -> AsyncIterator[Running]:
    """The real controller daemon, on the same port and state (CA) in every life."""
    async with trio.open_nursery() as life:
        yield await _start(life, setup.controller_cfg)
        life.cancel_scope.cancel()


class Agent:
    """One life of a real agent process; always ended by its pid."""

    def __init__(self, setup: Setup, life: int) -> None:
        self.setup = setup
        self.log = setup.tmp / f"agent-{life}.log"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await trio.lowlevel.open_process(
                [str(NODEMESH), "agent", "--config", str(self.setup.agent_toml)],
                stdout=out,
                stderr=out,
            )

    async def terminate(self) -> int:
        """SIGTERM, as systemd stops it; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(STOP_TIMEOUT):
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(5):
                await self.proc.wait()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


@asynccontextmanager
async def agent(setup: Setup, life: int) -> AsyncIterator[Agent]:
    a = Agent(setup, life)
    try:
        await a.start()
        yield a
    finally:
        await a.kill()


async def send_requests(setup: Setup, pair: tuple[bytes, bytes], roots: bytes, n: int) -> None:
    """``n`` requests through the agent's inbound listener, as a peer agent sends them.

    Retried (bounded) until the agent holds its service identity and answers; every request
    after that must succeed, so exactly ``n`` reach the recorder.
    """
    ctx = tls.client_context(pair[0], pair[1], roots)
    sni = spiffe.server_name(spiffe.service_id(TD, DC, SERVICE))
    with trio.fail_after(START_TIMEOUT):
        while True:
            try:
                tcp = await trio.open_tcp_stream("127.0.0.1", setup.inbound_port)
                stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
                await stream.do_handshake()
                break
            except (OSError, trio.BrokenResourceError):
                await trio.sleep(0.2)
    conn = h11.Connection(h11.CLIENT)
    head = [("host", SERVICE), (DST_HEADER.decode(), f"127.0.0.1:{setup.app_port}")]
    with trio.fail_after(30):
        for _ in range(n):
            await stream.send_all(conn.send(h11.Request(method="GET", target="/", headers=head)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert status == 200
            conn.start_next_cycle()
    await trio.aclose_forcefully(stream)


async def counted(ctl: Running, pair: tuple[bytes, bytes]) -> int:
    """The controller's inbound request count for the service, once every report delivered
    so far is in a slot the controller answers for (it leaves out the slot still running)."""
    await trio.sleep(SLOT_S - time.time() % SLOT_S + 0.5)
    client = ControllerClient(lambda: ctl.address, ctl.roots, "unused")
    with trio.fail_after(10):
        doc = await client.metrics("10m", "service", *pair)
    rows = [r for r in doc["rows"] if r["name"] == SERVICE]
    return int(rows[0]["requests"]) if rows else 0


def saved(setup: Setup) -> list[dict[str, Any]]:
    return reporter.parse_backlog((setup.state_dir / reporter.BACKLOG_FILE).read_bytes())


# --- the tests ---------------------------------------------------------------------------------


async def test_the_last_partial_interval_is_counted_once_across_a_restart(setup: Setup) -> None:
    async with controller(setup) as ctl:
        pair = await _node_pair(ctl)
        async with agent(setup, 1) as first:
            await send_requests(setup, pair, ctl.roots, 37)
            assert await first.terminate() == 0, first.tail()
        flushed = [e for e in first.events() if e.get("event") == "metrics_reports_flushed"]
        assert flushed and flushed[0]["left"] == 0, first.tail()
        assert not (setup.state_dir / reporter.BACKLOG_FILE).exists()
        assert await counted(ctl, pair) == 37

        async with agent(setup, 2) as second:
            await send_requests(setup, pair, ctl.roots, 5)
            assert await second.terminate() == 0, second.tail()
        # Nothing of the first life was sent again, the second life's stop is counted too.
        assert await counted(ctl, pair) == 42


async def test_controller_down_at_stop_the_restarted_agent_delivers_exactly_n(
    setup: Setup,
) -> None:
    async with controller(setup) as ctl:
        pair = await _node_pair(ctl)
        roots = ctl.roots
        first = Agent(setup, 1)
        try:
            await first.start()
            await send_requests(setup, pair, roots, 23)
            # The controller goes away first (its context ends); the agent stops after it.
        except BaseException:
            await first.kill()
            raise
    try:
        t0 = trio.current_time()
        assert await first.terminate() == 0, first.tail()
        # The drain is immediate (no request in flight); the last delivery gives up fast.
        assert trio.current_time() - t0 < 5 + reporter.STOP_DEADLINE + 2, first.tail()
    finally:
        await first.kill()
    path = setup.state_dir / reporter.BACKLOG_FILE
    assert path.exists(), first.tail()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reports = saved(setup)
    assert sum(s["count"] for r in reports for s in r["series"]) == 23

    async with controller(setup) as ctl, agent(setup, 2) as second:
        # The controller never received these requests; the restarted agent's backlog brings
        # them, and the file goes once all it held is delivered.
        with trio.fail_after(START_TIMEOUT):
            while path.exists():
                await trio.sleep(0.2)
        assert await second.terminate() == 0, second.tail()
        assert await counted(ctl, pair) == 23
        loaded = [e for e in second.events() if e.get("event") == "metrics_backlog_loaded"]
        assert [(e["first_seq"], e["last_seq"]) for e in loaded] == [
            (reports[0]["seq"], reports[-1]["seq"])
        ]
