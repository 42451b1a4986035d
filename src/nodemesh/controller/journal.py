"""The controller's metrics journal: what it counted survives a restart of the controller.

Theory of operation
-------------------
``FleetMetrics`` lives in memory.  Without more, a restarted controller forgets the last hour
of windows *and* which ``(agent, seq)`` it already counted, so a report an agent resends after
a lost 200 would be counted twice.  The journal closes both holes:

- **Append before answering.**  ``record`` ingests a report and, when it is new and not late,
  appends one line to ``<state_dir>/metrics/<slot>.jsonl`` (the 10 s slot of the report's
  ``end``) before the API answers 200.  A 200 therefore means "on disk"; a crash before the
  write means no 200, the agent resends, and the restarted controller counts it then.
- **Replay at start.**  ``replay`` feeds every line of the files still inside retention, slot
  by slot and in append order (each agent's own order), through ``parse_report`` and
  ``FleetMetrics.ingest`` with one ``now`` for the whole replay, so no retained slot turns
  "late" half way through.  Counts, windows, percentiles and the seen-seq sets come back as
  they were; duplicates after a restart are still answered ``"duplicate": true``.
- **Memory and journal hold the same.**  A line holds only the series memory kept: when
  ``ingest`` drops trailing series at its caps, the line is cut to match and carries the
  number dropped, so a replay neither revives what memory refused nor loses the ``overflow``
  count.  Files of slots older than ``RETENTION_S`` are deleted at replay and, as time
  passes, whenever a new slot file is opened (at most once per slot).
- **Torn lines.**  A crash in the middle of a write can leave a partial last line (never
  answered 200, so the agent resends it).  Replay skips any line that does not parse, logging
  file and line, never raising; a file is reopened for appending behind a newline, so a torn
  tail never glues onto the next line.
- **A failed write** (disk full, EIO) answers 503, so the agent keeps the report and resends
  it.  Memory counted it already, so the resend is a duplicate to ``ingest``; the journal
  remembers which ``(agent, seq)`` it still owes and writes the line on the resend.

Durability: no fsync.  The restarts this is for (SIGTERM, SIGKILL, a crash, the OOM killer)
end the process, not the kernel: its page cache still writes every completed ``write`` to
disk.  Only a power loss or kernel crash can lose lines, those of the last ~30 s
(``vm.dirty_expire_centisecs``), and it takes the controller down with them.  An fdatasync
per report measured 1.5 ms here (ext4 on virtio): ten times the write it would guard, on
the event loop or a thread per report, for statistics that agents recount anyway from the
next interval on.

Cost, measured here on a 50-series report (each histogram 1,000 log-normal latencies; its
V2 encoding ~950 base64 characters): the line is ~57 KB; ``json.dumps`` takes ~0.26 ms and
the append ~0.03 ms, well under a millisecond, so ``record`` writes synchronously on the
trio loop.  (The API's ``parse_report`` of that report takes 4-7 ms: the journal adds under 10 %.)

Size: 1,000 agents x 50 series report 100 lines a second, ~5.7 MB/s, ~20 GB for the hour
memory keeps (it no longer stops at 500,000 histograms: closed slots are compacted, see
metrics.py).  Replay costs what ingesting cost, 2-4 ms per 50-series report here plus the
compaction it does after each slot file, so a 100-agent hour loads in about two minutes and a
1,000-agent one in about twenty.  It runs in a worker thread (``load``); until it finishes
the metrics endpoints answer 503 (agents keep their reports and retry), while the CA serves
at once.  Journaling compacted slots instead of raw reports would bound both; not yet done.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nodemesh import log
from nodemesh.controller import metrics
from nodemesh.controller.metrics import FleetMetrics, Ingested, Report
from nodemesh.errors import ConfigError, NodemeshError

_log = log.get("nodemesh.controller")

JOURNAL_DIR = "metrics"  # under controller.state_dir
MAX_OPEN = 8  # slot files kept open: the current slot, the one before, and backlogs' slots
MAX_UNWRITTEN = 10_000  # reports owed a line after a failed write; one per agent in practice
_FILE = re.compile(r"^(\d{1,12})\.jsonl$")


class JournalError(NodemeshError):
    """A journal line could not be written; the API answers 503 and the agent resends."""


@dataclass(frozen=True)
class SkippedLine:
    path: Path
    line: int  # 1-based
    why: str


@dataclass
class Replayed:
    """What ``replay`` did, for the log line and for tests."""

    files: int = 0
    reports: int = 0
    duplicates: int = 0
    pruned: int = 0
    seconds: float = 0.0
    skipped: list[SkippedLine] = field(default_factory=list)


def oldest_slot(now: float) -> int:
    """The oldest slot ``FleetMetrics`` still keeps at ``now`` (its own pruning rule)."""
    return metrics.slot_of(now) - metrics.RETENTION_S // metrics.SLOT_S + 1


class MetricsJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ready = False  # set once the replay is done: the API refuses metrics until then
        self._fds: dict[int, int] = {}  # slot -> fd open for appending
        self._unwritten: dict[tuple[str, int], int] = {}  # (agent, seq) -> series dropped
        self._next_prune = 0.0
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"{directory}: cannot create the metrics journal ({e.strerror}); "
                "make controller.state_dir writable"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{directory}: the metrics journal is not writable; "
                "make controller.state_dir writable by the controller's user"
            )

    def __repr__(self) -> str:
        state = "ready" if self.ready else "loading"
        return (
            f"<MetricsJournal {self.directory} {state} open={len(self._fds)} "
            f"unwritten={len(self._unwritten)}>"
        )

    # --- start ---------------------------------------------------------------------------------

    async def load(self, fleet: FleetMetrics, now: float) -> Replayed:
        """``replay`` in a worker thread, then mark the journal ready.

        The API leaves ``fleet`` alone until ``ready``, so the thread is its only user.  A stop
        during a long replay abandons the thread rather than waiting for it.
        """
        done = await trio.to_thread.run_sync(self.replay, fleet, now, abandon_on_cancel=True)
        self.ready = True
        return done

    def replay(self, fleet: FleetMetrics, now: float) -> Replayed:
        """Feed the retained lines into ``fleet`` and delete expired files; never raises for
        bad content (each bad line is logged with its file and line number)."""
        started = time.monotonic()
        done = Replayed()
        keep = oldest_slot(now)
        for slot, path in self._files():
            if slot < keep:
                done.pruned += self._unlink(path)
                continue
            done.files += 1
            self._replay_file(path, fleet, now, done)
            # Fold as it goes (no slot after this one is complete yet), so pending series stay
            # one slot's worth and the blocks are built once.
            fleet.compact(now, through=slot)
        done.seconds = round(time.monotonic() - started, 3)
        self._next_prune = now + metrics.SLOT_S
        _log.info(
            "metrics_journal_replayed",
            directory=str(self.directory),
            files=done.files,
            reports=done.reports,
            duplicates=done.duplicates,
            skipped=len(done.skipped),
            pruned=done.pruned,
            seconds=done.seconds,
        )
        return done

    def _replay_file(self, path: Path, fleet: FleetMetrics, now: float, done: Replayed) -> None:
        try:
            f = path.open("rb")
        except OSError as e:
            _log.error("metrics_journal_file_unreadable", file=str(path), error=e.strerror)
            done.skipped.append(SkippedLine(path, 0, f"unreadable: {e.strerror}"))
            return

        def skip(number: int, why: str) -> None:
            _log.warning("metrics_journal_line_skipped", file=str(path), line=number, why=why)
            done.skipped.append(SkippedLine(path, number, why))

        with f:
            for number, raw in enumerate(f, start=1):
                try:
                    report, cut = _parse_line(raw)
                except ValueError as e:
                    skip(number, str(e))
                    continue
                got = fleet.ingest(report, now)
                if got.ahead:  # written before the clock bound, or the clock went back
                    skip(number, f"end is {got.ahead:.0f}s ahead of the controller's clock")
                    continue
                if got.duplicate:
                    done.duplicates += 1
                    continue
                fleet.overflow.series += cut
                done.reports += 1

    # --- the request path ----------------------------------------------------------------------

    def record(
        self, fleet: FleetMetrics, doc: dict[str, Any], report: Report, now: float
    ) -> Ingested:
        """Ingest ``report`` (parsed from ``doc``) and journal it if it is new; raises
        ``JournalError`` when the line could not be written (answer 503: the agent resends)."""
        before = fleet.overflow.series
        done = fleet.ingest(report, now)
        key = (report.agent, report.seq)
        if done.late or done.ahead:
            return done
        if done.duplicate:
            if key not in self._unwritten:
                return done
            # Counted when the write failed; the agent never had a 200 for it.
            cut, done = self._unwritten.pop(key), Ingested(duplicate=False)
            if metrics.slot_of(report.end) < oldest_slot(now):
                return done  # its slot is gone from memory too: nothing left to keep
        else:
            cut = fleet.overflow.series - before
        try:
            self._append(metrics.slot_of(report.end), _line(doc, cut, now), now)
        except OSError as e:
            self._owe(key, cut)
            raise JournalError(
                f"cannot append to the metrics journal in {self.directory} ({e.strerror}); "
                "free disk space or fix controller.state_dir"
            ) from None
        return done

    def _owe(self, key: tuple[str, int], cut: int) -> None:
        if len(self._unwritten) >= MAX_UNWRITTEN:
            gone = next(iter(self._unwritten))
            del self._unwritten[gone]
            # Still counted in memory; only a restart before it ages out would lose it.
            _log.error("metrics_journal_gave_up", agent=gone[0], seq=gone[1])
        self._unwritten[key] = cut

    def _append(self, slot: int, line: bytes, now: float) -> None:
        fd = self._fds.get(slot)
        if fd is None:
            if now >= self._next_prune:
                self.prune(now)
            fd = self._open(slot)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            # Take back a partial line; if even that fails, the reopen adds a newline.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            self._close(slot)
            raise

    def _open(self, slot: int) -> int:
        if len(self._fds) >= MAX_OPEN:
            self._close(min(self._fds))
        path = self.directory / f"{slot}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # a torn tail from a crash stays a line of its own
        except OSError:
            os.close(fd)
            raise
        self._fds[slot] = fd
        return fd

    def _close(self, slot: int) -> None:
        fd = self._fds.pop(slot, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- housekeeping --------------------------------------------------------------------------

    def prune(self, now: float) -> int:
        """Delete the files of slots memory no longer keeps; the number deleted."""
        self._next_prune = now + metrics.SLOT_S
        keep = oldest_slot(now)
        gone = 0
        for slot, path in self._files():
            if slot < keep:
                self._close(slot)
                gone += self._unlink(path)
        if gone:
            _log.debug("metrics_journal_pruned", files=gone, directory=str(self.directory))
        return gone

    def close(self) -> None:
        for slot in list(self._fds):
            self._close(slot)

    def _files(self) -> list[tuple[int, Path]]:
        """Slot files, oldest first; anything else in the directory is left alone."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            _log.error(
                "metrics_journal_unlistable", directory=str(self.directory), error=e.strerror
            )
            return []
        found = [(int(m[1]), self.directory / n) for n in names if (m := _FILE.match(n))]
        return sorted(found)

    def _unlink(self, path: Path) -> int:
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as e:
            _log.warning("metrics_journal_prune_failed", file=str(path), error=e.strerror)
            return 0
        return 1


def _line(doc: dict[str, Any], cut: int, now: float) -> bytes:
    """One line: when accepted, how many trailing series memory dropped, and the report as
    memory holds it.  ``json.dumps`` escapes every newline inside strings, so it is one line
    whatever the agent's formatting was."""
    if cut:
        series = doc["series"]
        doc = {**doc, "series": series[: len(series) - cut]}
    entry = {"accepted": now, "series_dropped": cut, "report": doc}
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _parse_line(raw: bytes) -> tuple[Report, int]:
    """The report and its dropped-series count, or ``ValueError`` saying what is wrong."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("the line is not JSON (a write cut short by a crash?)") from None
    if not isinstance(entry, dict) or "report" not in entry:
        raise ValueError("the line is not a journal entry with a report")
    cut = entry.get("series_dropped", 0)
    if isinstance(cut, bool) or not isinstance(cut, int) or cut < 0:
        raise ValueError(f"series_dropped = {cut!r} is not a non-negative integer")
    return metrics.parse_report(entry["report"]), cut  # BadReport is a ValueError
