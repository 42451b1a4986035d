"""How ``nodemesh check`` prints its results: sections of √/‼/× lines, or JSON.  Pure.

    consul
    ------
    √ consul is reachable at 127.0.0.1:8500
    × consul has no leader
        the Consul servers have lost quorum: check `consul members` ...

    Status check results are ×

A terminal or pipe whose encoding cannot carry the marks gets ASCII ones instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from nodemesh.check.results import Level, Result

MARKS: dict[Level, str] = {"ok": "√", "warning": "‼", "error": "×"}
ASCII_MARKS: dict[Level, str] = {"ok": "[ok]", "warning": "[warn]", "error": "[FAIL]"}


def marks_for(encoding: str | None) -> dict[Level, str]:
    """The marks ``encoding`` can carry."""
    try:
        "".join(MARKS.values()).encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


def failed(results: Sequence[Result], strict: bool = False) -> bool:
    """Whether the run fails: any error, or with ``strict`` any warning too."""
    return any(r.level == "error" or (strict and r.level == "warning") for r in results)


def exit_code(results: Sequence[Result], strict: bool = False) -> int:
    return 1 if failed(results, strict) else 0


def text(results: Sequence[Result], marks: dict[Level, str], strict: bool = False) -> str:
    lines: list[str] = []
    section = None
    for r in results:
        if r.section != section:
            if section is not None:
                lines.append("")
            section = r.section
            lines += [section, "-" * len(section)]
        lines.append(f"{marks[r.level]} {r.message}")
        if r.hint:
            lines.append(f"    {r.hint}")
    if lines:
        lines.append("")
    verdict = marks["error"] if failed(results, strict) else marks["ok"]
    lines.append(f"Status check results are {verdict}")
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[Result]) -> str:
    return json.dumps([r.as_json() for r in results], indent=2) + "\n"
