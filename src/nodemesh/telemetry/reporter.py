"""Shipping each interval's metrics to the controller: nothing counted twice, nothing lost silently.

Theory of operation
-------------------
Every ``telemetry.interval`` the reporter *cuts* the recorder (each series' interval count and
HDR histogram, the TCP counters' deltas) into one report with the next sequence number and
queues it.  A single task delivers the queue oldest first, one report at a time, and pops a
report only once the controller said 200; so reports arrive in order, and a report whose
answer was lost is sent again and de-duplicated by the controller on ``(agent, seq)``.

- The sequence number is persisted in ``state_dir`` *before* a report carrying it is queued,
  so a restarted agent never reuses a seq the controller may already hold.
- While the controller is away the queue grows to ``BACKLOG`` reports (one hour at 10 s);
  past that the oldest is dropped and counted in ``nodemesh_reports_dropped_total``, and the
  count travels in every later report so the controller shows the loss too.
- Retries back off exponentially with jitter, from 1 s to ``BACKOFF_MAX``, but a cut is never
  delayed by more than one delivery attempt (``SEND_TIMEOUT``).
- A report the controller refuses as malformed (4xx) will never be accepted: it is dropped,
  counted and logged as an error instead of blocking the queue forever.

Stop and restart
----------------
After the daemon's drain (every in-flight request recorded) ``ReporterStop.stop`` ends the
periodic loop: the reporter cuts the last, partial interval and tries to deliver the whole
backlog within ``STOP_DEADLINE``, stopping at the first failed attempt (the controller is
away; hammering it would only delay the exit).  Whatever is left, on *any* exit, is written
to ``<state_dir>/metrics-backlog.jsonl`` (atomically, 0600) and queued again, before any new
cut, by the next start.  The file stays on disk until every report loaded from it has left
the backlog, so an agent killed meanwhile sends them once more, and the controller's
``(agent, seq)`` de-duplication counts each once.  A corrupt file is moved aside and logged,
its reports counted as dropped.

``Backlog``, ``SeqFile``, ``Cutter``, ``parse_backlog`` and ``build_report`` are synchronous;
``serve_reporter`` is the thin trio loop around them.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from nodemesh import log
from nodemesh.errors import ConfigError
from nodemesh.identity.client import ControllerRefused, ControllerUnavailable
from nodemesh.telemetry.metrics import Recorder

_log = log.get("nodemesh.reporter")

BACKLOG = 360  # reports kept while the controller is away: one hour at the 10 s default
SEND_TIMEOUT = 10.0  # seconds for one delivery attempt
BACKOFF_MIN = 1.0  # seconds
BACKOFF_MAX = 60.0  # seconds; the controller's restart fits well inside the backlog's hour
# Seconds for the last delivery at stop, after the drain.  Short: an unreachable controller
# must not hold up a restart, and the backlog file keeps what is not delivered.  systemd's
# stop timeout (90 s by default) must cover shutdown.grace plus this.
STOP_DEADLINE = 3.0
SEQ_FILE = "metrics-seq"
BACKLOG_FILE = "metrics-backlog.jsonl"


class Sender(Protocol):
    """What the reporter needs from ``ControllerClient``."""

    async def report_metrics(
        self, report: dict[str, Any], node_chain_pem: bytes, node_key_pem: bytes
    ) -> bool: ...


# --- sans-IO parts ---------------------------------------------------------------------------


@dataclass
class Backlog:
    """Reports not yet accepted by the controller, oldest first, bounded."""

    limit: int = BACKLOG
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0  # dropped because the backlog was full, or refused as malformed

    def __repr__(self) -> str:
        return f"<Backlog {len(self.queue)}/{self.limit} dropped={self.dropped}>"

    def push(self, report: dict[str, Any]) -> None:
        if len(self.queue) >= self.limit:
            gone = self.queue.popleft()
            self.dropped += 1
            _log.warning("metrics_report_dropped", seq=gone["seq"], why="backlog full")
        self.queue.append(report)

    def head(self) -> dict[str, Any] | None:
        return self.queue[0] if self.queue else None

    def delivered(self) -> None:
        self.queue.popleft()

    def refused(self) -> None:
        self.queue.popleft()
        self.dropped += 1


class SeqFile:
    """The next sequence number, kept in ``<state_dir>/metrics-seq`` across restarts."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SEQ_FILE
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            text = "0"
        except OSError as e:
            raise ConfigError(
                f"{self.path}: cannot read ({e.strerror}); make agent.state_dir readable"
            ) from None
        if not text.isdigit():
            raise ConfigError(
                f"{self.path}: holds {text[:20]!r}, not a sequence number; delete the file "
                "(the controller then sees this agent's reports as new only after its seq)"
            )
        self.next = int(text)

    def take(self) -> int:
        """A seq no report of this agent ever carried; persisted before it is handed out."""
        seq = self.next
        self._persist(seq + 1)
        return seq

    def skip_past(self, seq: int) -> None:
        """Never hand out ``seq`` or below: a saved backlog may hold seqs a lost or deleted
        seq file no longer covers."""
        if seq >= self.next:
            self._persist(seq + 1)

    def _persist(self, following: int) -> None:
        tmp = self.path.with_name(f".{SEQ_FILE}.tmp")
        try:
            # The identity store makes state_dir when it first persists a key, which may be
            # after the first cut when the controller is away.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(f"{following}\n")
            os.replace(tmp, self.path)
        except OSError as e:
            # Going on without persisting could reuse seqs after a restart: reports the
            # controller would silently discard as duplicates.
            raise ConfigError(
                f"{self.path}: cannot write ({e.strerror}); make agent.state_dir writable"
            ) from None
        self.next = following


@dataclass
class TcpDeltas:
    """TCP counters are cumulative in the recorder; reports carry what changed since the last."""

    last: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)

    def cut(self, rec: Recorder) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for t in rec.tcp_series():
            now = (t.opened, t.closed, t.bytes_in, t.bytes_out)
            before = self.last.get((t.direction, t.service), (0, 0, 0, 0))
            self.last[(t.direction, t.service)] = now
            if now != before:
                delta = [a - b for a, b in zip(now, before, strict=True)]
                out.append(
                    {"direction": t.direction, "service": t.service}
                    | dict(zip(("opened", "closed", "bytes_in", "bytes_out"), delta, strict=True))
                )
        return out


def build_report(
    agent: str,
    seq: int,
    start: float,
    end: float,
    rec: Recorder,
    tcp: TcpDeltas,
    dropped: int,
) -> dict[str, Any]:
    """Cut ``rec`` into one report (docs/observability.md, "Controller metrics API")."""
    series = [
        {
            "labels": {
                "direction": c.direction,
                "service": c.service,
                "peer": c.peer,
                "status": c.status,
                "route": c.route,
                "endpoint": c.endpoint,
            },
            "count": c.count,
            "hdr": c.latency.encode().decode("ascii"),
        }
        for c in rec.cut()
    ]
    return {
        "agent": agent,
        "seq": seq,
        "start": start,
        "end": end,
        "series": series,
        "tcp": tcp.cut(rec),
        "dropped": dropped,
    }


@dataclass
class Cutter:
    """Consecutive intervals of one recorder, each cut into the next numbered report."""

    agent: str
    rec: Recorder
    seqs: SeqFile
    started: float  # wall-clock start of the interval not cut yet
    tcp: TcpDeltas = field(default_factory=TcpDeltas)

    def cut(self, queue: Backlog, end: float) -> None:
        seq = self.seqs.take()
        queue.push(
            build_report(self.agent, seq, self.started, end, self.rec, self.tcp, queue.dropped)
        )
        self.rec.reports_dropped = queue.dropped
        self.started = end


def backoff(failures: int, rng: random.Random) -> float:
    """Exponential from ``BACKOFF_MIN`` to ``BACKOFF_MAX``, jitter 0.5 so a fleet that lost
    its controller does not come back in step."""
    base = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(max(failures - 1, 0), 32))
    return base * (1 - 0.5 * rng.random())


def dump_backlog(reports: Iterable[dict[str, Any]]) -> bytes:
    """One report per line, oldest first (JSON keeps floats exact, so ``end`` round-trips)."""
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in reports)


def parse_backlog(raw: bytes) -> list[dict[str, Any]]:
    """The reports of a backlog file, oldest first; ValueError naming the line and the flaw."""
    reports: list[dict[str, Any]] = []
    last = -1
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"line {n} is not JSON ({type(e).__name__})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"line {n} is not a JSON object")
        seq = doc.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"line {n}: seq {seq!r} is not a sequence number")
        if seq <= last:
            raise ValueError(f"line {n}: seq {seq} does not follow {last}")
        if not isinstance(doc.get("agent"), str) or not isinstance(doc.get("series"), list):
            raise ValueError(f"line {n} is not a report (no agent or series)")
        last = seq
        reports.append(doc)
    return reports


class BacklogFile:
    """The backlog as the last run left it, in ``<state_dir>/metrics-backlog.jsonl``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / BACKLOG_FILE
        self.upto: int | None = None  # highest seq loaded from the file while it is kept

    def __repr__(self) -> str:
        return f"<BacklogFile {self.path} upto={self.upto}>"

    def load(self) -> tuple[list[dict[str, Any]], int]:
        """The saved reports, oldest first, and how many a corrupt file lost (it is moved
        aside to ``<file>.corrupt`` and logged; never an error)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        except OSError as e:
            self._set_aside(f"cannot read ({e.strerror})", lost=0)
            return [], 0
        try:
            reports = parse_backlog(raw)
        except ValueError as e:
            lost = sum(1 for line in raw.splitlines() if line.strip())  # one report a line
            self._set_aside(str(e), lost)
            return [], lost
        if reports:
            self.upto = reports[-1]["seq"]
            _log.info(
                "metrics_backlog_loaded",
                file=str(self.path),
                reports=len(reports),
                first_seq=reports[0]["seq"],
                last_seq=self.upto,
            )
        return reports, 0

    def settle(self, queue: Backlog) -> None:
        """Remove the file once every report loaded from it has left the backlog."""
        head = queue.head()
        if self.upto is None or (head is not None and head["seq"] <= self.upto):
            return
        self.upto = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            _log.error("metrics_backlog_remove_failed", file=str(self.path), error=e.strerror)

    def save(self, queue: Backlog) -> None:
        """Replace the file with the backlog (atomically, 0600), or remove it when empty.
        Never raises: it runs while the agent exits, and says what it could not keep."""
        self.upto = None
        reports = list(queue.queue)
        tmp = self.path.with_name(f".{BACKLOG_FILE}.tmp")
        try:
            if not reports:
                self.path.unlink(missing_ok=True)
                return
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                os.fchmod(fd, 0o600)  # a tmp file left behind may carry another mode
                f.write(dump_backlog(reports))
                f.flush()
                # Durable before the rename: a power loss must not leave an empty backlog.
                os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            _log.error(
                "metrics_backlog_save_failed",
                file=str(self.path),
                reports_lost=len(reports),
                error=e.strerror,
            )
            return
        _log.info(
            "metrics_backlog_saved",
            file=str(self.path),
            reports=len(reports),
            first_seq=reports[0]["seq"],
            last_seq=reports[-1]["seq"],
        )

    def _set_aside(self, why: str, lost: int) -> None:
        aside = self.path.with_name(f"{BACKLOG_FILE}.corrupt")
        try:
            os.replace(self.path, aside)
            moved: str | None = str(aside)
        except OSError:
            moved = None
        _log.error(
            "metrics_backlog_corrupt",
            file=str(self.path),
            error=why,
            moved_to=moved,
            reports_lost=lost,
        )


# --- the task --------------------------------------------------------------------------------


class ReporterStop:
    """The daemon's hand on the reporter's end: ``stop`` after the drain."""

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._requested = False
        self._done = trio.Event()

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "stopping" if self._requested else "running"
        return f"<ReporterStop {state}>"

    async def stop(self) -> None:
        """Cut the last interval, deliver what the controller takes within ``STOP_DEADLINE``,
        save the rest; returns once the reporter has ended (at once if it is not running)."""
        self._requested = True
        if self._scope is None:
            return
        self._scope.cancel()
        # The reporter bounds its own delivery; this bounds a reporter that misbehaves.
        with trio.move_on_after(STOP_DEADLINE + 2.0):
            await self._done.wait()

    def _attach(self, scope: trio.CancelScope) -> None:
        self._scope = scope
        if self._requested:
            scope.cancel()

    def _ended(self) -> None:
        self._scope = None
        self._done.set()


async def _send_head(
    sender: Sender, queue: Backlog, rec: Recorder, pair: tuple[bytes, bytes]
) -> str | None:
    """Offer the oldest report once.  None when it left the backlog (accepted, or refused for
    good); else why it stays for a later attempt."""
    report = queue.head()
    assert report is not None
    try:
        with trio.fail_after(SEND_TIMEOUT):
            duplicate = await sender.report_metrics(report, *pair)
    except (ControllerUnavailable, trio.TooSlowError) as e:
        return str(e) or "timeout"
    except ControllerRefused as e:
        if e.status >= 500 or e.status in (401, 408, 429):
            return str(e)
        queue.refused()
        rec.reports_dropped = queue.dropped
        _log.error("metrics_report_refused", seq=report["seq"], error=str(e))
        return None
    queue.delivered()
    _log.debug("metrics_report_delivered", seq=report["seq"], duplicate=duplicate)
    return None


async def _deliver_all(
    sender: Sender, queue: Backlog, rec: Recorder, pair: tuple[bytes, bytes] | None
) -> None:
    """Oldest first until the backlog is empty or one attempt fails: the stop's last try."""
    sent = 0
    while pair is not None and queue.head() is not None:
        error = await _send_head(sender, queue, rec, pair)
        if error is not None:
            _log.info("metrics_report_deferred", seq=queue.queue[0]["seq"], error=error)
            break
        sent += 1
    _log.info("metrics_reports_flushed", sent=sent, left=len(queue.queue))


async def serve_reporter(
    rec: Recorder,
    sender: Sender,
    agent: str,
    node_pair: Callable[[], tuple[bytes, bytes] | None],
    state_dir: Path,
    interval: float,
    *,
    backlog: Backlog | None = None,
    stopper: ReporterStop | None = None,
    wall: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Backlog] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Cut ``rec`` every ``interval`` seconds and deliver the reports; returns only after
    ``stopper.stop()``.

    ``node_pair()`` gives the node certificate chain and key (None until the node identity is
    held: reports queue meanwhile).  ``task_status.started`` hands out the backlog so the
    admin endpoint and tests can see it.  The backlog saved by the last run is queued first.
    """
    seqs = SeqFile(state_dir)
    queue = backlog if backlog is not None else Backlog()
    saved = BacklogFile(state_dir)
    reports, lost = saved.load()
    for old in reports:
        queue.push(old)  # the bound applies: past it the oldest go, counted
    if reports:
        seqs.skip_past(reports[-1]["seq"])
    queue.dropped += lost
    rec.reports_dropped = queue.dropped
    cutter = Cutter(agent, rec, seqs, wall())
    cut_last = False
    rng = random.Random()
    failures = 0
    next_cut = trio.current_time() + interval
    retry_at = trio.current_time()
    try:
        with trio.CancelScope() as periodic:
            if stopper is not None:
                stopper._attach(periodic)
            task_status.started(queue)
            while True:
                now = trio.current_time()
                if now >= next_cut:
                    cutter.cut(queue, wall())
                    # Skip cuts missed while a send was in flight: one report spans the gap.
                    while next_cut <= now:
                        next_cut += interval
                    continue
                report, pair = queue.head(), node_pair()
                if report is not None and pair is not None and now >= retry_at:
                    error = await _send_head(sender, queue, rec, pair)
                    if error is not None:
                        failures += 1
                        retry_at = trio.current_time() + backoff(failures, rng)
                        _log.info(
                            "metrics_report_deferred",
                            seq=report["seq"],
                            backlog=len(queue.queue),
                            retry_in=round(retry_at - trio.current_time(), 2),
                            error=error,
                        )
                    else:
                        failures = 0
                        saved.settle(queue)
                    continue
                wake = next_cut if report is None or pair is None else min(next_cut, retry_at)
                await trio.sleep_until(wake)
        # Only the stopper cancels ``periodic``: the daemon has drained, every request is in.
        cut_last = True
        cutter.cut(queue, wall())
        with trio.move_on_after(STOP_DEADLINE):
            await _deliver_all(sender, queue, rec, node_pair())
    finally:
        if not cut_last:
            # Cancelled or failing: the requests recorded since the last cut still go to disk.
            try:
                cutter.cut(queue, wall())
            except ConfigError as e:
                _log.error("metrics_last_cut_failed", error=str(e))
        saved.save(queue)
        close = getattr(sender, "aclose", None)  # ControllerClient keeps a report connection
        if close is not None:
            with trio.CancelScope(shield=True):
                await close()
        if stopper is not None:
            stopper._ended()
