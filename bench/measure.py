"""What one benchmark step measures: wrk's result, and the proxies' CPU time and memory.

wrk runs to completion inside a lab host; its numbers come from ``wrk_report.lua`` as one JSON
line (exact percentiles from wrk's own histogram), with the usual ``--latency`` text kept
beside them for a reader.  While wrk runs, a thread samples the resident memory of the
processes under test; their CPU time is read from ``/proc/PID/stat`` before and after, so it
counts every thread of a process (Go's runtime, trio's worker threads) and nothing else.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nodemesh.lab.mesh import Lab
from nodemesh.lab.netns import LabError

REPORT_MARK = "NODEMESH_BENCH "
RSS_EVERY = 0.1  # seconds between memory samples; wrk runs are >= 1 s
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(LabError):
    """A benchmark step could not run or produced no usable numbers."""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    errors: dict[str, int]
    latency_ms: dict[str, float]
    text: str  # wrk's own report, for a reader

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def parse_wrk(stdout: str) -> WrkResult:
    """wrk's stdout with ``wrk_report.lua`` loaded -> its numbers (pure)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(REPORT_MARK)]
    if len(lines) != 1:
        raise BenchError(
            f"wrk printed {len(lines)} report lines instead of 1; was it run with "
            f"-s wrk_report.lua? Its output: {stdout[-400:]!r}"
        )
    data = json.loads(lines[0][len(REPORT_MARK) :])
    duration = data["duration_us"] / 1e6
    if duration <= 0:
        raise BenchError(f"wrk reported a duration of {duration}s; its output: {stdout[-400:]!r}")
    text = "\n".join(ln for ln in stdout.splitlines() if not ln.startswith(REPORT_MARK))
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=duration,
        rps=data["requests"] / duration,
        errors={k: int(v) for k, v in data["errors"].items()},
        latency_ms={k: v / 1000.0 for k, v in data["latency_us"].items()},
        text=text,
    )


def wrk_argv(
    url: str, *, threads: int, connections: int, duration: float, script: Path
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(lab: Lab, host: str, argv: Sequence[str], duration: float, user: str | None) -> str:
    """Run wrk in ``host`` (as ``user``) to completion, bounded; its stdout."""
    p = lab.exec(host, argv, timeout=duration + 30.0, check=False, user=user)
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise BenchError(f"{host}: `{' '.join(argv)}` exited {p.returncode}: {err} {out[-300:]}")
    return out


# --- processes under test ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY_COLUMNS = ("user", "nice", "system", "irq", "softirq", "steal")


def machine_cpu_seconds() -> dict[str, float]:
    """The machine's CPU time so far by kind, summed over cores (the "cpu" line of /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return {name: v / CLK_TCK for name, v in zip(STAT_COLUMNS, fields, strict=False)}


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent busy so far (not idle, not waiting for I/O)."""
    cpu = machine_cpu_seconds()
    return sum(cpu[k] for k in BUSY_COLUMNS)


def children_cpu_seconds() -> float:
    """CPU time of this process's reaped children: wrk, once ``run_wrk`` has returned."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def all_cpu_seconds() -> dict[int, float]:
    """CPU seconds of every process on the machine, by pid (ones that vanish mid-read skipped)."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                continue
    return out


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160] or "?"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no VmRSS line


def children(pid: int) -> list[int]:
    """Direct children (nginx's and haproxy's workers), from every thread's children list."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


@dataclass
class ProcUsage:
    label: str  # "agent@h1", "nginx@h2"
    pids: list[int]
    cpu_s: float = 0.0
    max_rss_mib: float = 0.0


@dataclass
class Watch:
    """CPU seconds and peak RSS of labelled process groups over one wrk run.

    ``with Watch(groups) as w: run()`` then ``w.usage``.  A group is a label and its pids
    (a master and its workers count together).
    """

    groups: Mapping[str, Sequence[int]]
    usage: list[ProcUsage] = field(default_factory=list)
    wall_s: float = 0.0
    machine_busy_s: float = 0.0  # every process on the machine, ours included
    children_cpu_s: float = 0.0  # the driver's reaped children: wrk
    _cpu0: dict[str, float] = field(default_factory=dict)
    machine_by_kind_s: dict[str, float] = field(default_factory=dict)
    _start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _kinds0: dict[str, float] = field(default_factory=dict)
    _all0: dict[int, float] = field(default_factory=dict)
    busiest_others: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _cpu(self, pids: Sequence[int]) -> float:
        return sum(cpu_seconds(p) for p in pids)

    def __enter__(self) -> Watch:
        self.usage = [ProcUsage(label, list(pids)) for label, pids in self.groups.items()]
        self._cpu0 = {u.label: self._cpu(u.pids) for u in self.usage}
        self._start = (time.monotonic(), machine_busy_seconds(), children_cpu_seconds())
        self._kinds0 = machine_cpu_seconds()
        self._all0 = all_cpu_seconds()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            for u in self.usage:
                try:
                    rss = sum(rss_bytes(p) for p in u.pids) / (1 << 20)
                except OSError:
                    continue  # exited; its CPU read below fails loudly
                u.max_rss_mib = max(u.max_rss_mib, rss)
            self._stop.wait(RSS_EVERY)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for u in self.usage:
            u.cpu_s = self._cpu(u.pids) - self._cpu0[u.label]
        wall0, busy0, children0 = self._start
        self.wall_s = time.monotonic() - wall0
        self.machine_busy_s = machine_busy_seconds() - busy0
        self.children_cpu_s = children_cpu_seconds() - children0
        # Who else used the CPU (processes that ended meanwhile are not seen; wrk is reaped).
        watched = {p for u in self.usage for p in u.pids}
        deltas = [
            (cpu - self._all0.get(pid, 0.0), pid)
            for pid, cpu in all_cpu_seconds().items()
            if pid not in watched
        ]
        self.busiest_others = [
            {"pid": pid, "cpu_s": round(d, 2), "command": command_line(pid)}
            for d, pid in sorted(deltas, reverse=True)[:5]
            if d >= 0.1
        ]
        kinds = machine_cpu_seconds()
        self.machine_by_kind_s = {k: kinds[k] - self._kinds0[k] for k in BUSY_COLUMNS}

    def cpu_summary(self) -> dict[str, Any]:
        """Cores busy on the whole machine, by wrk, by the watched processes, and the rest:
        the lab's idle Consul and controller plus anything else running on the machine, which
        is what tells a clean run from a disturbed one."""
        watched = sum(u.cpu_s for u in self.usage)
        wall = self.wall_s or 1.0
        rest = self.machine_busy_s - watched - self.children_cpu_s
        return {
            "wall_s": round(self.wall_s, 2),
            "machine_cores_busy": round(self.machine_busy_s / wall, 2),
            "wrk_cores": round(self.children_cpu_s / wall, 2),
            "watched_cores": round(watched / wall, 2),
            "other_cores": round(rest / wall, 2),
            # Where the machine's busy time went: softirq is the network stack, steal is time
            # the hypervisor gave to someone else.
            "machine_cores_by_kind": {
                k: round(v / wall, 2) for k, v in self.machine_by_kind_s.items()
            },
        }


def usage_dicts(usage: Sequence[ProcUsage]) -> list[dict[str, Any]]:
    return [
        {**asdict(u), "cpu_s": round(u.cpu_s, 2), "max_rss_mib": round(u.max_rss_mib, 1)}
        for u in usage
    ]


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def wait_quiet(limit: float, max_wait: float, say: Any) -> tuple[float, bool]:
    """Bounded: wait until the 1-minute load average is at most ``limit``.

    Returns the load average when the wait ended and whether it was quiet then.
    """
    deadline = time.monotonic() + max_wait
    while True:
        one = loadavg()[0]
        if one <= limit:
            return one, True
        if time.monotonic() >= deadline:
            say(f"load average still {one:.2f} after {max_wait:g}s; running anyway")
            return one, False
        say(f"load average {one:.2f} > {limit:g}; waiting (at most {max_wait:g}s)")
        time.sleep(15.0)
