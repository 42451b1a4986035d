"""What one check reports, and the wording helpers every section shares.  Pure.

A result is ``ok``, an ``error`` (the run exits 1) or a ``warning`` (shown with ‼; fails the
run only with ``--strict``).  Its ``name`` is stable, for ``-o json`` and scripts; its
``message`` says what was found; its ``hint``, when it is not ok, is one sentence with the fix.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from nodemesh.check.facts import Owner, Socket

Level = Literal["ok", "warning", "error"]

CONFIG, CONSUL, CLOCK, AGENT = "config", "consul", "clock", "agent"
INTERCEPTION, IDENTITY, SERVICES, CONTROLLER = "interception", "identity", "services", "controller"
HOST, KERNEL, PORTS = "host", "kernel", "ports"


START_AGENT = (
    "start the agent (systemctl start nodemesh) and read its log (journalctl -u nodemesh) "
    "if it does not stay up"
)


CLOCK_HINT = (
    "synchronise this host's clock (chrony or systemd-timesyncd, on every host): certificates, "
    "their renewal and the metric windows all depend on it"
)


@dataclass(frozen=True)
class Result:
    section: str
    name: str
    level: Level
    message: str
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.level == "ok"

    def as_json(self) -> dict[str, object]:
        return {
            "section": self.section,
            "name": self.name,
            "ok": self.ok,
            "level": self.level,
            "message": self.message,
            "hint": self.hint,
        }


def ok(section: str, name: str, message: str) -> Result:
    return Result(section, name, "ok", message)


def fail(section: str, name: str, message: str, hint: str) -> Result:
    return Result(section, name, "error", message, hint)


def warn(section: str, name: str, message: str, hint: str) -> Result:
    return Result(section, name, "warning", message, hint)


def when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def span(seconds: float) -> str:
    """``"2d 3h"``, ``"5h 10m"``, ``"4m 2s"``, ``"12s"``: two units at most."""
    s = int(abs(seconds))
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {s % 60}s"
    return f"{s}s"


def addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def holder(s: Socket, owners: Mapping[int, tuple[Owner, ...]]) -> str:
    """Who holds a listening socket: ``"nodemesh pid 812, uid 999"``."""
    procs = owners.get(s.inode, ())
    if not procs:
        return f"a process this user cannot see (socket uid {s.uid})"
    return " and ".join(
        f"{o.command} pid {o.pid}" + (f", uid {o.uid}" if o.uid is not None else "") for o in procs
    )
