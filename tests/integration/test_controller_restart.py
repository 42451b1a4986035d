"""A controller process restarted on the same state dir loses no counted request.

The controller is the real ``nodemesh controller`` process with a real Consul; reports arrive
over mTLS with the node certificate it issued.  It is stopped with SIGTERM and with SIGKILL
and started again on the same state dir: it answers the same ``/v1/metrics`` numbers, and a
report resent after the restart is acknowledged as a duplicate.  Under load, with the agent's
real reporter delivering while the controller is killed, the fleet's count and percentiles
equal the agent's own record of every request.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nodemesh.controller.metrics import slot_of
from nodemesh.identity import keys, spiffe
from nodemesh.identity.client import ControllerClient, ControllerRefused
from nodemesh.telemetry import reporter
from nodemesh.telemetry.metrics import Recorder, new_histogram
from nodemesh.telemetry.reporter import Backlog, serve_reporter
from tests.integration.devconsul import NODE, DevConsul, free_ports

pytestmark = pytest.mark.integration

TD, DC = "mesh.test", "dc1"
TOKEN = "restart-join-token"
PEER = f"spiffe://{TD}/dc/{DC}/svc/api"
QUERIES = [(by, d) for by in ("service", "route", "edge", "host") for d in ("inbound", "outbound")]


class Controller:
    """One state dir and port; each ``start`` is a new ``nodemesh controller`` process."""

    def __init__(self, tmp: Path, consul_port: int) -> None:
        (tmp / "join-token").write_text(TOKEN + "\n")
        (tmp / "join-token").chmod(0o600)
        (self.port,) = free_ports(1)
        self.state = tmp / "state"
        self.config = tmp / "controller.toml"
        self.config.write_text(
            "[controller]\n"
            f'node = "{NODE}"\ntrust_domain = "{TD}"\ndatacenter = "{DC}"\n'
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "{self.state}"\n'
            f'join_token_file = "{tmp / "join-token"}"\n'
            f'[consul]\naddress = "127.0.0.1:{consul_port}"\n'
        )
        self.logs = tmp / "controller.log"
        self.proc: trio.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        assert self.proc is None
        main = "from nodemesh.controller.cli import controller; controller()"
        with self.logs.open("a") as log:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", main, "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        out = b""
        with trio.fail_after(30):  # the process prints it once it serves
            while not out.endswith(b"\n"):
                chunk = await self.proc.stdout.receive_some(1024)
                assert chunk, self.logs.read_text()
                out += chunk
        assert out.decode() == f"nodemesh controller listening on {self.address}\n"

    async def stop(self, how: signal.Signals) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(how)
        try:
            with trio.fail_after(15):
                return await proc.wait()
        finally:
            await _close_pipe(proc)

    async def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.proc.wait()
            await _close_pipe(self.proc)


async def _close_pipe(proc: trio.Process) -> None:
    if proc.stdout is not None:
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()


@pytest.fixture
async def controller(dev_consul: DevConsul, tmp_path: Path) -> AsyncIterator[Controller]:
    # The controller counts only what a report's node can be held to: web runs on NODE.
    dev_consul.client().agent.service.register("web", service_id="restart-test-web", port=8080)
    ctl = Controller(tmp_path, dev_consul.http_port)
    try:
        yield ctl
    finally:
        await ctl.close()
        dev_consul.client().agent.service.deregister("restart-test-web")


async def _node_pair(client: ControllerClient) -> tuple[bytes, bytes]:
    key = keys.generate_key()
    signed = await client.sign_node(keys.make_csr(key, spiffe.node_id(TD, DC, NODE)))
    return signed.certificate, key


async def _answers(client: ControllerClient, pair: tuple[bytes, bytes]) -> list[Any]:
    """Every grouping of the last hour, minus the window's edges (they move with the clock).
    A controller still replaying its journal answers 503: ask again."""
    with trio.fail_after(30):
        while True:
            try:
                docs = [await client.metrics("1h", by, *pair, direction=d) for by, d in QUERIES]
            except ControllerRefused as e:
                assert e.status == 503, e.message
                await trio.sleep(0.1)
                continue
            return [{k: v for k, v in doc.items() if k not in ("start", "end")} for doc in docs]


def _report(agent: str, seq: int, end: float, base_us: int) -> dict[str, Any]:
    items = []
    for k, (direction, service, status) in enumerate(
        [("inbound", "web", "2xx"), ("inbound", "web", "5xx"), ("outbound", "db", "2xx")]
    ):
        h = new_histogram()
        for i in range(20 + seq):
            h.record_value(base_us + 13 * i * (k + 1))
        peer = PEER if direction == "inbound" else agent  # the caller: web's, or this node
        labels = {"direction": direction, "service": service, "peer": peer, "status": status,
                  "route": "get" if k else "", "endpoint": "db-1" if k == 2 else ""}  # fmt: skip
        items.append({"labels": labels, "count": 20 + seq, "hdr": h.encode().decode()})
    tcp = [{"direction": "inbound", "service": "web", "opened": seq, "closed": 1,
            "bytes_in": 100 * seq, "bytes_out": 7}]  # fmt: skip
    return {"agent": agent, "seq": seq, "start": end - 10, "end": end, "series": items,
            "tcp": tcp, "dropped": 0}  # fmt: skip


async def test_sigterm_and_sigkill_restarts_answer_the_same_numbers(
    controller: Controller,
) -> None:
    await controller.start()
    client = ControllerClient(
        lambda: controller.address, (controller.state / "ca.pem").read_bytes(), TOKEN
    )
    pair = await _node_pair(client)
    agent = spiffe.node_id(TD, DC, NODE).uri
    # Intervals that have ended, a few slots back, so every query sees them at once.
    now = time.time()
    reports = [_report(agent, seq, now - 200 + 10 * seq, 300 + 50 * seq) for seq in range(12)]
    for doc in reports:
        assert await client.report_metrics(doc, *pair) is False
    assert await client.report_metrics(reports[3], *pair) is True  # a lost 200, resent
    before = await _answers(client, pair)
    web = next(r for r in before[0]["rows"] if r["name"] == "web")
    assert web["requests"] == sum(2 * (20 + seq) for seq in range(12))
    assert web["tcp"]["opened"] == sum(range(12))

    assert await controller.stop(signal.SIGTERM) == 0
    await controller.start()
    assert await _answers(client, pair) == before
    assert await client.report_metrics(reports[11], *pair) is True
    more = _report(agent, 12, now - 60, 900)
    assert await client.report_metrics(more, *pair) is False
    after_term = await _answers(client, pair)
    assert after_term != before

    assert await controller.stop(signal.SIGKILL) == -signal.SIGKILL
    # A crash in the middle of a write leaves a torn line; it is skipped and named.
    torn = controller.state / "metrics" / f"{slot_of(now - 60)}.jsonl"
    with torn.open("ab") as f:
        f.write(b'{"accepted": 1764080000.0, "series_dropped": 0, "report": {"agent": "sp')
    await controller.start()
    assert await _answers(client, pair) == after_term
    for doc in (reports[0], more):
        assert await client.report_metrics(doc, *pair) is True
    logs = controller.logs.read_text()
    assert "metrics_journal_line_skipped" in logs and f"file={torn} line=2" in logs
    assert "metrics_journal_replayed" in logs
    # The next line does not glue onto the torn one: one more restart reads it back.
    last = _report(agent, 13, now - 60, 1200)
    assert await client.report_metrics(last, *pair) is False
    latest = await _answers(client, pair)
    assert await controller.stop(signal.SIGKILL) == -signal.SIGKILL
    await controller.start()
    assert await _answers(client, pair) == latest
    assert await controller.stop(signal.SIGTERM) == 0


async def test_a_controller_killed_under_load_loses_no_counted_request(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reporter, "BACKOFF_MAX", 0.5)
    await controller.start()
    client = ControllerClient(
        lambda: controller.address, (controller.state / "ca.pem").read_bytes(), TOKEN
    )
    pair = await _node_pair(client)
    rec, whole = Recorder(), new_histogram()
    recorded, failed = [0], [0]

    async def load(seconds: float) -> None:
        """~150 requests a second through the agent's recorder, every value kept here too."""
        with trio.move_on_after(seconds):
            for _ in range(100_000):
                i = recorded[0]
                us = 200 + (i * 37) % 20_000
                status = 503 if i % 40 == 0 else 200
                rec.request("inbound", "web", PEER, status, us / 1e6)
                whole.record_value(us)
                recorded[0] += 1
                failed[0] += status == 503
                await trio.sleep(0.005)

    async def counted() -> dict[str, Any]:
        # Slots count once they have ended, and the backlog drains with backoff: wait for
        # both, but never past the agent's own count.
        with trio.fail_after(40):
            while True:
                rows = (await _answers(client, pair))[0]["rows"]
                if rows and rows[0]["requests"] >= recorded[0]:
                    row: dict[str, Any] = rows[0]
                    return row
                await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        backlog: Backlog = await nursery.start(
            serve_reporter,
            rec,
            client,
            spiffe.node_id(TD, DC, NODE).uri,
            lambda: pair,
            tmp_path / "agent",
            0.5,
        )
        for how in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
            await load(2.0)
            await controller.stop(how)
            await load(1.0)  # intervals cut while the controller is away wait in the backlog
            await controller.start()
        await load(1.0)
        row = await counted()
        assert not backlog.queue and backlog.dropped == 0
        nursery.cancel_scope.cancel()

    assert recorded[0] > 500
    assert (row["requests"], row["successes"]) == (recorded[0], recorded[0] - failed[0])
    assert row["latency_us"] == {
        "p50": whole.get_value_at_percentile(50),
        "p95": whole.get_value_at_percentile(95),
        "p99": whole.get_value_at_percentile(99),
        "p999": whole.get_value_at_percentile(99.9),
        "min": whole.get_min_value(),
        "max": whole.get_max_value(),
    }
