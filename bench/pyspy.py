"""Where an agent's CPU goes: py-spy's raw (collapsed) stacks, summed three ways (pure).

py-spy samples only threads that are running (not waiting in epoll), so the shares are of the
agent's busy time.  Time inside C code (OpenSSL, the kernel's send/recv) is charged to the
Python function that called it, which is what a reader needs: ``ssl.SSLObject.read`` is TLS.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")

# A sample's leaf frame -> the layer it is charged to, first match wins.  py-spy names files
# relative to their sys.path entry ("trio/_ssl.py", "nodemesh/proxy/http1.py", "ssl.py").
LAYERS: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    # epoll_wait(2) itself, and a woken loop waiting for a CPU: py-spy sees both as running.
    ("epoll wait / run queue", lambda func, file: func.endswith("get_events")),
    ("socket send/recv", lambda func, file: file == "trio/_socket.py"),
    ("TLS", lambda func, file: file in ("ssl.py", "trio/_ssl.py")),
    ("h11", lambda func, file: file.startswith("h11/")),
    ("HTTP/2 (h2, hpack)", lambda func, file: file.startswith(("h2/", "hpack/", "hyperframe/"))),
    ("nodemesh", lambda func, file: file.startswith("nodemesh/")),
    ("trio scheduler and streams", lambda func, file: file.startswith("trio/")),
    ("logging", lambda func, file: file.startswith(("structlog/", "logging/"))),
)


@dataclass
class Profile:
    samples: int = 0
    self_by_layer: Counter[str] = field(default_factory=Counter)
    self_by_package: Counter[str] = field(default_factory=Counter)
    self_by_function: Counter[str] = field(default_factory=Counter)
    inclusive_nodemesh: Counter[str] = field(default_factory=Counter)

    def shares(self, counter: Counter[str], top: int) -> list[tuple[str, float]]:
        total = self.samples or 1
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)]


def package(file: str) -> str:
    """``trio/_core/_run.py`` -> "trio"; ``nodemesh/proxy/http1.py`` -> "nodemesh.proxy";
    ``ssl.py`` -> "ssl" (py-spy's file names are relative to their sys.path entry)."""
    parts = file.split("/")
    if parts[0] == "nodemesh" and len(parts) > 2:
        return f"nodemesh.{parts[1]}"
    return parts[0].removesuffix(".py") or "?"


def layer(func: str, file: str) -> str:
    for name, match in LAYERS:
        if match(func, file):
            return name
    return "other (stdlib, click, ...)"


def frame_name(frame: str) -> tuple[str, str, str]:
    """``"SSLObject.read (ssl.py:1100)"`` -> ("SSLObject.read (ssl.py)", "SSLObject.read",
    "ssl.py"): line numbers merged away, so a function is one entry."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), frame.strip(), ""
    return f"{m['func']} ({m['file']})", m["func"], m["file"]


def summarize(lines: Iterable[str]) -> Profile:
    """Collapsed stacks, one ``frame;frame;...;leaf COUNT`` per line (py-spy ``--format raw``)."""
    prof = Profile()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # With --threads or --subprocesses py-spy adds "thread (...)"/"process ..." frames.
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        prof.samples += n
        leaf, func, file = frame_name(frames[-1])
        prof.self_by_function[leaf] += n
        prof.self_by_package[package(file)] += n
        prof.self_by_layer[layer(func, file)] += n
        names = {frame_name(f) for f in frames}
        for name in {name for name, _, file in names if file.startswith("nodemesh/")}:
            prof.inclusive_nodemesh[name] += n
    return prof


def report(prof: Profile, top: int = 12) -> dict[str, Any]:
    return {
        "samples": prof.samples,
        "self_by_layer_pct": prof.shares(prof.self_by_layer, top),
        "self_by_package_pct": prof.shares(prof.self_by_package, top),
        "self_by_function_pct": prof.shares(prof.self_by_function, top),
        "inclusive_nodemesh_pct": prof.shares(prof.inclusive_nodemesh, top),
    }


def main(argv: list[str]) -> int:
    """``python bench/pyspy.py RAW...``: summarize py-spy raw files again (a new layer table)."""
    for path in argv:
        with open(path) as f:
            print(json.dumps({"file": path, **report(summarize(f))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
