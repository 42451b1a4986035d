"""``nodemesh top``'s pure half: rows from the controller, sort, filter, keys, screen lines."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from nodemesh.top.model import (
    HEADERS,
    MIN_FLEX,
    SORTS,
    TopRow,
    View,
    filter_rows,
    fit,
    lines,
    next_sort,
    parse_rows,
    press,
    sort_rows,
    split_route,
)
from tests.fixtures.controller import rows

TD = "spiffe://nodemesh.local/dc/dc1"


def fixture_rows() -> tuple[TopRow, ...]:
    return parse_rows(rows("edge", "1m"), rows("edge", "10s"))


def test_rows_from_edge_answers() -> None:
    got = {(r.source, r.destination): r for r in fixture_rows()}
    assert set(got) == {("shop", "web"), ("load", "shop"), ("unknown", "web")}
    web = got[("shop", "web")]
    assert (web.count, web.best_ms, web.worst_ms, web.last_ms) == (1100, 0.312, 12.031, 0.79)
    assert web.success == pytest.approx(1090 / 1100)
    plain = got[("unknown", "web")]
    assert plain.best_ms is None  # no min in that row
    assert plain.last_ms is None  # no traffic in the newest slot


@pytest.mark.parametrize(
    ("route", "shown"),
    [
        ("GET /users/{id}", ("GET", "/users/{id}")),
        ("POST /orders", ("POST", "/orders")),
        ("[default]", ("*", "[default]")),
        ("health", ("*", "health")),
        ("get /x", ("*", "get /x")),
        ("GET ", ("*", "GET ")),
        ("", ("", "")),
    ],
)
def test_split_route(route: str, shown: tuple[str, str]) -> None:
    assert split_route(route) == shown


def test_rows_carry_the_route_as_method_and_path() -> None:
    key = {"src": f"{TD}/svc/shop", "dst": "web"}
    window = [
        {"key": key | {"route": "GET /users/{id}"}, "requests": 7},
        {"key": key | {"route": "[default]"}, "requests": 2},
    ]
    last = [{"key": key | {"route": "[default]"}, "requests": 1, "latency_us": {"p50": 900}}]
    got = {r.path: r for r in parse_rows(window, last)}
    assert (got["/users/{id}"].method, got["/users/{id}"].count) == ("GET", 7)
    assert got["/users/{id}"].last_ms is None  # the newest slot had none of that route
    assert (got["[default]"].method, got["[default]"].last_ms) == ("*", 0.9)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "row",
        {"key": {"src": "a"}, "requests": 1},
        {"key": {"src": "a", "dst": "b"}, "requests": -1},
        {"key": {"src": "a", "dst": "b"}, "requests": True},
        {"key": {"src": "a", "dst": "b"}, "requests": "5"},
        {"key": "a -> b", "requests": 5},
    ],
    ids=repr,
)
def test_bad_rows_are_skipped(bad: Any) -> None:
    assert len(parse_rows([bad, *rows("edge", "1m")], [bad])) == 3


def _r(src: str, dst: str, count: int, worst: float | None = None) -> TopRow:
    return TopRow(src, dst, "", "", count, None, worst, None, 1.0)


def test_sorted_by_count_then_by_names() -> None:
    rs = [_r("b", "x", 5), _r("a", "x", 5), _r("c", "x", 9)]
    assert [r.source for r in sort_rows(rs, "count")] == ["c", "a", "b"]


def test_latency_sorts_put_missing_last() -> None:
    rs = [_r("a", "x", 1, None), _r("b", "x", 1, 3.0), _r("c", "x", 1, 7.0)]
    assert [r.source for r in sort_rows(rs, "worst")] == ["c", "b", "a"]


def test_name_sorts_are_alphabetical() -> None:
    rs = [_r("b", "y", 1), _r("a", "z", 2), _r("c", "x", 3)]
    assert [r.source for r in sort_rows(rs, "source")] == ["a", "b", "c"]
    assert [r.destination for r in sort_rows(rs, "destination")] == ["x", "y", "z"]


def test_sort_cycle_visits_every_column_and_wraps() -> None:
    seen = ["count"]
    for _ in range(len(SORTS) - 1):
        seen.append(next_sort(seen[-1]))
    assert sorted(seen) == sorted(SORTS)
    assert next_sort(seen[-1]) == "count"
    assert next_sort("bogus") == "count"


def test_filter_matches_either_end() -> None:
    rs = list(fixture_rows())
    assert {(r.source, r.destination) for r in filter_rows(rs, "shop")} == {
        ("shop", "web"),
        ("load", "shop"),
    }
    assert filter_rows(rs, "") == rs
    assert filter_rows(rs, "nobody") == []


# --- keys ---------------------------------------------------------------------------------------


def _typed(view: View, keys: list[str]) -> View:
    for k in keys:
        view, quit_ = press(view, k)
        assert not quit_
    return view


def test_keys() -> None:
    v = View()
    assert press(v, "q") == (v, True)
    assert press(v, "s")[0].sort == SORTS[1]
    v = _typed(v, ["f", "w", "e", "x", "KEY_BACKSPACE", "b", "\n"])
    assert (v.service, v.prompt) == ("web", None)
    v2 = _typed(v, ["f", "a", "\x1b"])
    assert (v2.service, v2.prompt) == ("web", None)  # Esc keeps the old filter
    v3 = _typed(v, ["f", "\n"])
    assert v3.service == ""  # an empty filter clears it


def test_q_and_s_are_text_while_typing_a_filter() -> None:
    v = _typed(View(), ["f", "q", "s"])
    assert v.prompt == "qs" and v.sort == "count"


def test_unknown_keys_change_nothing() -> None:
    v = View()
    for k in ("KEY_RESIZE", "x", "KEY_UP", ""):
        assert press(v, k) == (v, False)
    v = _typed(v, ["f"])
    assert press(v, "KEY_LEFT") == (v, False)


# --- drawing ------------------------------------------------------------------------------------


def test_lines_at_full_width() -> None:
    out = lines(View(rows=fixture_rows()), 140, 20)
    assert out[0].startswith("nodemesh top  sort: count")
    assert out[1].split() == " ".join(HEADERS).split()
    assert out[2].split() == ["shop", "web", "-", "-", "1100", "0.3ms", "12.0ms", "0.8ms", "99.09%"]
    assert out[3].split()[:2] == ["load", "shop"]
    assert out[4].split()[:2] == ["unknown", "web"]
    assert len(out) == 5


def test_status_and_filter_show_in_the_title() -> None:
    v = View(rows=fixture_rows(), service="shop", status="controller unreachable, retrying")
    out = lines(v, 200, 10)
    assert "filter: shop" in out[0] and "[controller unreachable, retrying]" in out[0]
    assert len(out) == 4
    prompt = lines(replace(v, prompt="we"), 200, 10)[0]
    assert prompt.endswith(": we")


@pytest.mark.parametrize("width", [1, 10, 30, 45, 60, 80, 100])
@pytest.mark.parametrize("height", [1, 2, 3, 30])
def test_lines_always_fit_the_terminal(width: int, height: int) -> None:
    long = TopRow("a-very-long-source-name" * 3, "dest" * 20, "GET", "/p" * 40, 1, 1, 2, 3, 1)
    out = lines(View(rows=(*fixture_rows(), long)), width, height)
    assert len(out) <= height
    assert all(len(line) <= width for line in out)


def test_narrow_terminal_keeps_count_and_success() -> None:
    out = lines(View(rows=fixture_rows()), 60, 10)
    assert "Count" in out[1] and "Success Rate" in out[1]
    assert out[2].split()[-1] == "99.09%"


def test_empty_terminal_draws_nothing() -> None:
    assert lines(View(), 0, 10) == [] and lines(View(), 10, 0) == []


def test_fit_shrinks_names_before_dropping_columns() -> None:
    widths = [20, 20, 6, 20, 5, 5, 5, 5, 12]
    full = sum(widths) + 2 * (len(widths) - 1)
    assert fit(widths, full) == widths
    shrunk = fit(widths, full - 10)
    assert all(shrunk[i] > 0 for i in range(len(HEADERS)))
    assert sum(shrunk) + 16 <= full - 10
    tiny = fit(widths, 50)
    assert tiny[0] == tiny[1] == tiny[3] == MIN_FLEX
    assert 0 in tiny and tiny[4] > 0 and tiny[8] > 0
