"""The reporter's end and the next start: the last partial interval and the unsent backlog.

Same verified fake as ``test_reporter.py``: ``ApiSender`` hands reports to the controller's real
``ControllerApi`` (its de-duplication included) and can play a controller that is down, or one
that takes a report and loses the answer.  A "restart" is a new ``Recorder`` and a new
``serve_reporter`` on the same state dir, as a new agent process would have.
"""

from __future__ import annotations

import json
import os
import re
import stat
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nodemesh.controller.api import ControllerApi
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.telemetry import reporter
from nodemesh.telemetry.metrics import Recorder
from nodemesh.telemetry.reporter import (
    Backlog,
    BacklogFile,
    ReporterStop,
    dump_backlog,
    parse_backlog,
    serve_reporter,
)
from tests.component.test_reporter import (
    DC,
    NODE,
    PAIR,
    TD,
    ApiSender,
    Directory,
    total,
    traffic,
    wall,
)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def api(ca: CertificateAuthority) -> ControllerApi:
    return ControllerApi(ca, Directory(), "token", DC, 3600, clock=wall)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reporter, "BACKOFF_MAX", 2.0)


class Events:
    """The reporter's log, as (event, fields)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **kw: Any) -> None:
        self.seen.append((event, kw))

    debug = info = warning = error = _record

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for e, kw in self.seen if e == event]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Events:
    ev = Events()
    monkeypatch.setattr(reporter, "_log", ev)
    return ev


class Life:
    """One agent process's reporter: its own recorder, cancel scope and stopper."""

    def __init__(self, sender: Any, state_dir: Path, backlog: Backlog | None = None) -> None:
        self.rec = Recorder()
        self.sender = sender
        self.state_dir = state_dir
        self.stopper = ReporterStop()
        self.backlog_in = backlog
        self.backlog = Backlog()
        self.scope = trio.CancelScope()

    async def start(self, nursery: trio.Nursery) -> Backlog:
        async def run(task_status: trio.TaskStatus[Backlog]) -> None:
            with self.scope:
                await serve_reporter(
                    self.rec,
                    self.sender,
                    NODE.uri,
                    lambda: PAIR,
                    self.state_dir,
                    10.0,
                    backlog=self.backlog_in,
                    stopper=self.stopper,
                    wall=wall,
                    task_status=task_status,
                )

        self.backlog = await nursery.start(run)
        return self.backlog

    async def stop(self) -> float:
        """Stop as the daemon does after its drain; how long it took."""
        t0 = trio.current_time()
        await self.stopper.stop()
        return trio.current_time() - t0


def saved_seqs(state_dir: Path) -> list[int]:
    raw = (state_dir / reporter.BACKLOG_FILE).read_bytes()
    return [r["seq"] for r in parse_backlog(raw)]


async def test_stop_delivers_the_last_partial_interval(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    sender = ApiSender(api)
    life = Life(sender, tmp_path)
    await life.start(nursery)
    sent = await traffic(life.rec, 25)  # cuts at 10 s and 20 s; five requests after the last
    assert total(api) == 20
    assert await life.stop() < 0.1
    assert total(api) == sent == 25
    assert [s for s, _ in sender.seen] == [0, 1, 2]
    assert not (tmp_path / reporter.BACKLOG_FILE).exists()
    assert repr(life.stopper) == "<ReporterStop done>"
    await life.stopper.stop()  # a second stop (a second signal) is harmless


async def test_controller_down_at_stop_the_next_start_delivers_each_once(
    api: ControllerApi,
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    events: Events,
) -> None:
    sender = ApiSender(api)
    first = Life(sender, tmp_path)
    await first.start(nursery)
    sent = await traffic(first.rec, 15)
    sender.down = True
    sent += await traffic(first.rec, 20)  # reports 1 and 2 wait; 5 requests not cut yet
    await first.stop()
    assert total(api) == 10
    path = tmp_path / reporter.BACKLOG_FILE
    assert saved_seqs(tmp_path) == [1, 2, 3]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [reporter.BACKLOG_FILE, reporter.SEQ_FILE]
    (saved,) = events.named("metrics_backlog_saved")
    assert saved == {"file": str(path), "reports": 3, "first_seq": 1, "last_seq": 3}

    await trio.sleep(60)  # the agent is stopped a minute; then the controller is back
    sender.down = False
    second = Life(sender, tmp_path)
    await second.start(nursery)
    await trio.sleep(1)
    # Queued before any new cut, delivered in order with their seqs; new cuts follow them.
    assert [s for s, _ in sender.seen] == [0, 1, 2, 3]
    assert not path.exists()  # every loaded report left the backlog
    sent += await traffic(second.rec, 10)
    await second.stop()
    assert total(api) == sent == 45
    assert sender.seen == [(seq, False) for seq in range(6)]
    assert not path.exists()
    assert second.rec.reports_dropped == 0


async def test_a_report_delivered_but_unanswered_at_stop_is_counted_once(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    sender = ApiSender(api)
    first = Life(sender, tmp_path)
    await first.start(nursery)
    sent = await traffic(first.rec, 14)
    sender.lose_answers = 1  # the controller takes the last report, its answer is lost
    await first.stop()
    assert total(api) == sent == 14
    assert saved_seqs(tmp_path) == [1]

    second = Life(sender, tmp_path)
    await second.start(nursery)
    await trio.sleep(1)
    assert sender.seen == [(0, False), (1, True)]
    assert total(api) == 14


async def test_stop_is_bounded_when_the_controller_hangs(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    class Hanging(ApiSender):
        async def report_metrics(self, report: dict[str, Any], chain: bytes, key: bytes) -> bool:
            self.attempts += 1
            await trio.sleep_forever()

    sender = Hanging(api)
    life = Life(sender, tmp_path)
    await life.start(nursery)
    await traffic(life.rec, 13)
    took = await life.stop()
    assert reporter.STOP_DEADLINE - 0.01 <= took <= reporter.STOP_DEADLINE + 0.01
    # The report in flight when the stop came, and the last partial interval.
    assert saved_seqs(tmp_path) == [0, 1]


async def test_cancelled_without_a_stop_still_keeps_what_was_recorded(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    sender = ApiSender(api)
    sender.down = True
    life = Life(sender, tmp_path)
    await life.start(nursery)
    await traffic(life.rec, 12)
    life.scope.cancel()  # e.g. the agent stopped while still starting: no drain, no stop()
    await trio.testing.wait_all_tasks_blocked()
    reports = parse_backlog((tmp_path / reporter.BACKLOG_FILE).read_bytes())
    assert [r["seq"] for r in reports] == [0, 1]
    assert sum(s["count"] for r in reports for s in r["series"]) == 12
    await life.stopper.stop()  # returns at once: the reporter has ended


async def test_a_corrupt_backlog_file_is_set_aside_logged_and_counted(
    api: ControllerApi,
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    events: Events,
) -> None:
    path = tmp_path / reporter.BACKLOG_FILE
    good = {"agent": NODE.uri, "seq": 0, "start": 1.0, "end": 2.0, "series": []}
    path.write_bytes(dump_backlog([good]) + b'{"agent": "x", "seq": 1, "ser\n')
    sender = ApiSender(api)
    life = Life(sender, tmp_path)
    backlog = await life.start(nursery)
    assert not backlog.queue and backlog.dropped == 2 and life.rec.reports_dropped == 2
    (bad,) = events.named("metrics_backlog_corrupt")
    assert bad["file"] == str(path) and bad["reports_lost"] == 2
    assert bad["moved_to"] == str(tmp_path / "metrics-backlog.jsonl.corrupt")
    assert "line 2" in bad["error"]
    assert not path.exists() and (tmp_path / "metrics-backlog.jsonl.corrupt").exists()
    # The reporter goes on, and the loss travels to the controller.
    await traffic(life.rec, 11)
    assert total(api) == 10
    assert (
        api.fleet.query(wall() + 20, 3600, "service")["overflow"]["reports_dropped_by_agents"] == 2
    )


async def test_the_bound_applies_to_a_reloaded_backlog_and_seqs_stay_ahead(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    old = [
        {"agent": NODE.uri, "seq": s, "start": 1.0 * s, "end": 1.0 * s + 1, "series": []}
        for s in range(5, 10)
    ]
    (tmp_path / reporter.BACKLOG_FILE).write_bytes(dump_backlog(old))
    # No seq file (lost or deleted): the next cut must still follow the saved seqs.
    sender = ApiSender(api)
    sender.down = True
    life = Life(sender, tmp_path, backlog=Backlog(limit=3))
    backlog = await life.start(nursery)
    assert [r["seq"] for r in backlog.queue] == [7, 8, 9] and backlog.dropped == 2
    await trio.sleep(10.5)
    assert [r["seq"] for r in backlog.queue] == [8, 9, 10]


async def test_stop_without_a_node_identity_saves_everything(
    api: ControllerApi, tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    sender = ApiSender(api)
    stopper = ReporterStop()
    rec = Recorder()
    run = partial(serve_reporter, stopper=stopper, wall=wall)
    await nursery.start(run, rec, sender, NODE.uri, lambda: None, tmp_path, 10.0)
    await traffic(rec, 5)
    await stopper.stop()
    assert sender.attempts == 0 and saved_seqs(tmp_path) == [0]


async def test_stop_before_the_reporter_runs_returns_at_once() -> None:
    stopper = ReporterStop()
    with trio.fail_after(1):
        await stopper.stop()
    assert repr(stopper) == "<ReporterStop stopping>"


# --- sans-IO parts ---------------------------------------------------------------------------


def test_a_backlog_round_trips_exactly() -> None:
    reports = [
        {"agent": NODE.uri, "seq": 3, "start": 1764080000.1, "end": 1764080010.3, "series": []},
        {"agent": NODE.uri, "seq": 4, "start": 0.1 + 0.2, "end": 1e-7, "series": [{"n": 1}]},
    ]
    assert parse_backlog(dump_backlog(reports)) == reports
    assert parse_backlog(b"") == [] and parse_backlog(b"\n\n") == []


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"not json\n", "line 1 is not JSON"),
        (b"\xff\xfe\n", "line 1 is not JSON"),
        (b"[1, 2]\n", "line 1 is not a JSON object"),
        (b'{"agent": "a", "series": []}\n', "seq None is not a sequence number"),
        (b'{"agent": "a", "seq": true, "series": []}\n', "seq True is not"),
        (b'{"agent": "a", "seq": -1, "series": []}\n', "seq -1 is not"),
        (b'{"seq": 1, "series": []}\n', "line 1 is not a report"),
        (b'{"agent": "a", "seq": 1, "series": {}}\n', "line 1 is not a report"),
        (
            b'{"agent": "a", "seq": 2, "series": []}\n{"agent": "a", "seq": 2, "series": []}\n',
            "line 2: seq 2 does not follow 2",
        ),
        (b"[" * 100_000 + b"\n", "line 1 is not JSON"),
    ],
)
def test_parse_backlog_names_the_flaw(raw: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_backlog(raw)


def test_save_is_atomic_private_and_removes_an_empty_backlog(tmp_path: Path) -> None:
    f = BacklogFile(tmp_path / "state")
    queue = Backlog()
    queue.push({"agent": "a", "seq": 0, "start": 0.0, "end": 1.0, "series": []})
    # A tmp file a crash left behind, world-readable: replaced, and the result is 0600.
    (tmp_path / "state").mkdir()
    tmp = tmp_path / "state" / f".{reporter.BACKLOG_FILE}.tmp"
    tmp.write_text("stale")
    tmp.chmod(0o644)
    f.save(queue)
    assert stat.S_IMODE(f.path.stat().st_mode) == 0o600 and not tmp.exists()
    assert json.loads(f.path.read_text())["seq"] == 0
    queue.delivered()
    f.save(queue)
    assert not f.path.exists()


def test_an_unwritable_state_dir_is_logged_not_raised(tmp_path: Path, events: Events) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    f = BacklogFile(blocker / "state")  # a path under a regular file: ENOTDIR
    queue = Backlog()
    queue.push({"agent": "a", "seq": 0, "start": 0.0, "end": 1.0, "series": []})
    f.save(queue)
    (failed,) = events.named("metrics_backlog_save_failed")
    assert failed["reports_lost"] == 1 and failed["file"] == str(f.path)
