"""The reporter against the controller's real API decisions, on trio's autojump clock.

``ApiSender`` hands each report to a real ``ControllerApi.handle`` (no sockets) and can play a
controller that is down or an answer that is lost after the controller took the report; the
integration test does the same over real mTLS.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from nodemesh.controller.api import ControllerApi, Request
from nodemesh.controller.catalog import NodeInfo
from nodemesh.identity import spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.client import ControllerRefused, ControllerUnavailable
from nodemesh.telemetry import reporter
from nodemesh.telemetry.metrics import Recorder
from nodemesh.telemetry.reporter import Backlog, SeqFile, serve_reporter

TD, DC = "mesh.test", "dc1"
NODE = spiffe.node_id(TD, DC, "host-a")
T0 = 1_764_080_000.0
PAIR = (b"chain", b"key")


class Directory:
    """Every node runs ``web``, the service the agents' recorders here count."""

    async def node(self, name: str) -> NodeInfo | None:
        return NodeInfo(name, "198.18.0.1", frozenset({"web"}), alive=True)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def wall() -> float:
    return T0 + trio.current_time()


class ApiSender:
    def __init__(self, api: ControllerApi) -> None:
        self.api = api
        self.down = False
        self.lose_answers = 0  # the next N reports reach the controller, their answers do not
        self.seen: list[tuple[int, bool]] = []  # (seq, duplicate) per accepted delivery
        self.attempts = 0

    async def report_metrics(self, report: dict[str, Any], chain: bytes, key: bytes) -> bool:
        assert (chain, key) == PAIR
        self.attempts += 1
        if self.down:
            raise ControllerUnavailable("controller at 127.0.0.1:4190 unreachable: refused")
        body = json.dumps(report).encode()
        resp = await self.api.handle(Request("POST", "/v1/metrics/report", {}, body, "", NODE))
        doc = json.loads(resp.body)
        if resp.status != 200:
            raise ControllerRefused(resp.status, doc["error"])
        if self.lose_answers:
            self.lose_answers -= 1
            raise ControllerUnavailable("controller at 127.0.0.1:4190 failed: reset")
        self.seen.append((report["seq"], doc["duplicate"]))
        return bool(doc["duplicate"])


@pytest.fixture
def api(ca: CertificateAuthority) -> ControllerApi:
    return ControllerApi(ca, Directory(), "token", DC, 3600, clock=wall)


def total(api: ControllerApi) -> int:
    rows = api.fleet.query(wall() + 20, 3600, "service")["rows"]
    return sum(int(r["requests"]) for r in rows)


async def traffic(rec: Recorder, seconds: int) -> int:
    """One request a second for ``seconds``, each half-way between ticks so none coincides
    with a cut; returns how many."""
    for _ in range(seconds):
        await trio.sleep(0.5)
        rec.request("inbound", "web", "spiffe://mesh.test/dc/dc1/svc/api", 200, 0.002)
        await trio.sleep(0.5)
    return seconds


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Retries within 2 s, so a test knows when the backlog has drained.
    monkeypatch.setattr(reporter, "BACKOFF_MAX", 2.0)


async def start(
    nursery: trio.Nursery,
    rec: Recorder,
    sender: ApiSender,
    state_dir: Path,
    *,
    agent: str = NODE.uri,
    pair: Callable[[], tuple[bytes, bytes] | None] = lambda: PAIR,
    backlog: Backlog | None = None,
) -> Backlog:
    run = partial(serve_reporter, backlog=backlog, wall=wall)
    started: Backlog = await nursery.start(run, rec, sender, agent, pair, state_dir, 10.0)
    return started


async def test_outage_backlog_is_delivered_once_in_order(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    rec, sender = Recorder(), ApiSender(api)
    await start(nursery, rec, sender, tmp_path)
    sent = await traffic(rec, 25)
    sender.down = True
    sent += await traffic(rec, 120)  # twelve intervals queue up
    assert total(api) == 20
    sender.down = False
    sender.lose_answers = 1  # the first report after the outage is retried
    sent += await traffic(rec, 15)
    await trio.sleep(30)
    seqs = [s for s, _ in sender.seen]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 18
    assert [s for s, dup in sender.seen if dup] == [2]  # its answer was lost, then retried
    assert total(api) == sent == 160
    assert rec.reports_dropped == 0


async def test_full_backlog_drops_the_oldest_and_counts(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    rec, sender = Recorder(), ApiSender(api)
    sender.down = True
    backlog = Backlog(limit=3)
    assert await start(nursery, rec, sender, tmp_path, backlog=backlog) is backlog
    await traffic(rec, 60)  # six reports, room for three
    await trio.sleep(1)
    assert backlog.dropped == 3 and rec.reports_dropped == 3
    assert [r["seq"] for r in backlog.queue] == [3, 4, 5]
    sender.down = False
    await trio.sleep(120)
    assert [s for s, _ in sender.seen][:3] == [3, 4, 5]
    assert total(api) == 30  # the three dropped intervals are lost, and said so:
    answer = api.fleet.query(wall() + 20, 3600, "service")
    assert answer["overflow"]["reports_dropped_by_agents"] == 3


async def test_a_refused_report_is_dropped_counted_and_the_queue_moves_on(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    rec, sender = Recorder(), ApiSender(api)
    # Another agent's identity: the controller answers 403 forever.
    await start(nursery, rec, sender, tmp_path, agent=spiffe.node_id(TD, DC, "host-b").uri)
    await traffic(rec, 25)
    assert rec.reports_dropped == 2 and sender.attempts == 2


async def test_reports_wait_for_the_node_identity(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    rec, sender = Recorder(), ApiSender(api)
    pair: list[tuple[bytes, bytes] | None] = [None]
    await start(nursery, rec, sender, tmp_path, pair=lambda: pair[0])
    await traffic(rec, 30)
    assert sender.attempts == 0
    pair[0] = PAIR
    await trio.sleep(15)
    assert [s for s, _ in sender.seen] == [0, 1, 2, 3] and total(api) == 30


# --- sans-IO parts -------------------------------------------------------------------------


def test_a_restart_never_reuses_a_seq(tmp_path: Path) -> None:
    first = SeqFile(tmp_path / "state")
    assert [first.take() for _ in range(3)] == [0, 1, 2]
    assert SeqFile(tmp_path / "state").take() == 3


def test_a_corrupt_seq_file_names_itself(tmp_path: Path) -> None:
    (tmp_path / reporter.SEQ_FILE).write_text("garbage")
    with pytest.raises(Exception, match="metrics-seq"):
        SeqFile(tmp_path)


def test_cut_hands_over_the_interval_and_keeps_the_total() -> None:
    rec = Recorder()
    for ms in (1, 2, 3):
        rec.request("inbound", "web", "p", 200, ms / 1000)
    (c,) = rec.cut()
    assert c.count == 3 and c.latency.get_total_count() == 3
    assert rec.cut() == []
    rec.request("inbound", "web", "p", 200, 0.004)
    (s,) = list(rec.series())
    assert s.count == 4 and s.latency.get_total_count() == 4
    assert s.latency.get_max_value() == pytest.approx(4000, rel=0.001)
    (c,) = rec.cut()
    assert c.count == 1 and c.latency.get_max_value() == pytest.approx(4000, rel=0.001)


def test_tcp_deltas() -> None:
    rec = Recorder()
    deltas = reporter.TcpDeltas()
    rec.tcp("inbound", "web").opened = 3
    assert deltas.cut(rec) == [
        {
            "direction": "inbound",
            "service": "web",
            "opened": 3,
            "closed": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }
    ]
    assert deltas.cut(rec) == []
    rec.tcp("inbound", "web").closed = 2
    assert deltas.cut(rec)[0]["closed"] == 2


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    rng = random.Random(1)
    delays = [reporter.backoff(n, rng) for n in range(1, 12)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1])
    assert all(d <= reporter.BACKOFF_MAX for d in delays)
    assert delays[-1] >= reporter.BACKOFF_MAX / 2
