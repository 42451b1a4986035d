"""How ``nodemesh check`` prints: sections, marks, hints, the verdict, JSON, the exit status."""

from __future__ import annotations

import json

import pytest

from nodemesh.check.render import ASCII_MARKS, MARKS, exit_code, marks_for, text, to_json
from nodemesh.check.results import Result, fail, ok, warn

RESULTS = [
    ok("consul", "consul-reachable", "consul is reachable at 127.0.0.1:8500"),
    fail("consul", "consul-leader", "consul has no leader", "check `consul members`"),
    warn("controller", "controller-reachable", "no controller to ask", "start it"),
]


def test_text_groups_sections_and_puts_hints_under_failures() -> None:
    assert text(RESULTS, MARKS) == (
        "consul\n"
        "------\n"
        "√ consul is reachable at 127.0.0.1:8500\n"
        "× consul has no leader\n"
        "    check `consul members`\n"
        "\n"
        "controller\n"
        "----------\n"
        "‼ no controller to ask\n"
        "    start it\n"
        "\n"
        "Status check results are ×\n"
    )


def test_warnings_alone_pass_unless_strict() -> None:
    only_warning = [RESULTS[0], RESULTS[2]]
    assert text(only_warning, MARKS).endswith("Status check results are √\n")
    assert exit_code(only_warning) == 0
    assert text(only_warning, MARKS, strict=True).endswith("Status check results are ×\n")
    assert exit_code(only_warning, strict=True) == 1
    assert exit_code(RESULTS) == 1
    assert exit_code([RESULTS[0]], strict=True) == 0


@pytest.mark.parametrize(
    ("encoding", "marks"),
    [
        ("utf-8", MARKS),
        ("UTF-8", MARKS),
        ("ascii", ASCII_MARKS),
        ("latin-1", ASCII_MARKS),
        (None, ASCII_MARKS),
        ("no-such-codec", ASCII_MARKS),
    ],
)
def test_marks_fall_back_to_ascii(encoding: str | None, marks: dict[str, str]) -> None:
    assert marks_for(encoding) == marks


def test_ascii_output_encodes_as_ascii() -> None:
    out = text(RESULTS, ASCII_MARKS)
    out.encode("ascii")
    assert "[FAIL] consul has no leader" in out and "[warn] no controller" in out
    assert out.endswith("Status check results are [FAIL]\n")


def test_json_is_a_list_of_results() -> None:
    doc = json.loads(to_json(RESULTS))
    assert doc[1] == {
        "section": "consul",
        "name": "consul-leader",
        "ok": False,
        "level": "error",
        "message": "consul has no leader",
        "hint": "check `consul members`",
    }
    assert [d["ok"] for d in doc] == [True, False, False]


def test_result_ok_follows_level() -> None:
    assert Result("s", "n", "ok", "m").ok
    assert not Result("s", "n", "warning", "m", "h").ok
