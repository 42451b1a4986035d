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

``Backlog``, ``SeqFile`` and ``build_report`` are synchronous; ``serve_reporter`` is the thin
trio loop around them.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable
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
SEQ_FILE = "metrics-seq"


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
        tmp = self.path.with_name(f".{SEQ_FILE}.tmp")
        try:
            # The identity store makes state_dir when it first persists a key, which may be
            # after the first cut when the controller is away.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(f"{seq + 1}\n")
            os.replace(tmp, self.path)
        except OSError as e:
            # Going on without persisting could reuse seqs after a restart: reports the
            # controller would silently discard as duplicates.
            raise ConfigError(
                f"{self.path}: cannot write ({e.strerror}); make agent.state_dir writable"
            ) from None
        self.next = seq + 1
        return seq


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


def backoff(failures: int, rng: random.Random) -> float:
    """Exponential from ``BACKOFF_MIN`` to ``BACKOFF_MAX``, jitter 0.5 so a fleet that lost
    its controller does not come back in step."""
    base = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(max(failures - 1, 0), 32))
    return base * (1 - 0.5 * rng.random())


# --- the task --------------------------------------------------------------------------------


async def serve_reporter(
    rec: Recorder,
    sender: Sender,
    agent: str,
    node_pair: Callable[[], tuple[bytes, bytes] | None],
    state_dir: Path,
    interval: float,
    *,
    backlog: Backlog | None = None,
    wall: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Backlog] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Cut ``rec`` every ``interval`` seconds and deliver the reports; never returns.

    ``node_pair()`` gives the node certificate chain and key (None until the node identity is
    held: reports queue meanwhile).  ``task_status.started`` hands out the backlog so the
    admin endpoint and tests can see it.
    """
    seqs = SeqFile(state_dir)
    queue = backlog if backlog is not None else Backlog()
    tcp = TcpDeltas()
    rng = random.Random()
    failures = 0
    started = wall()
    next_cut = trio.current_time() + interval
    retry_at = trio.current_time()
    task_status.started(queue)
    while True:
        now = trio.current_time()
        if now >= next_cut:
            end = wall()
            queue.push(build_report(agent, seqs.take(), started, end, rec, tcp, queue.dropped))
            rec.reports_dropped = queue.dropped
            started = end
            # Skip cuts missed while a send was in flight: one report spans the gap.
            while next_cut <= now:
                next_cut += interval
            continue
        report, pair = queue.head(), node_pair()
        if report is not None and pair is not None and now >= retry_at:
            try:
                with trio.fail_after(SEND_TIMEOUT):
                    duplicate = await sender.report_metrics(report, *pair)
            except (ControllerUnavailable, trio.TooSlowError) as e:
                failures += 1
                retry_at = trio.current_time() + backoff(failures, rng)
                _log.info(
                    "metrics_report_deferred",
                    seq=report["seq"],
                    backlog=len(queue.queue),
                    retry_in=round(retry_at - trio.current_time(), 2),
                    error=str(e) or "timeout",
                )
                continue
            except ControllerRefused as e:
                if e.status >= 500 or e.status in (401, 408, 429):
                    failures += 1
                    retry_at = trio.current_time() + backoff(failures, rng)
                    _log.info("metrics_report_deferred", seq=report["seq"], error=str(e))
                    continue
                queue.refused()
                rec.reports_dropped = queue.dropped
                _log.error("metrics_report_refused", seq=report["seq"], error=str(e))
                continue
            queue.delivered()
            failures = 0
            _log.debug("metrics_report_delivered", seq=report["seq"], duplicate=duplicate)
            continue
        wake = next_cut if report is None or pair is None else min(next_cut, retry_at)
        await trio.sleep_until(wake)
