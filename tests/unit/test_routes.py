"""Route tables from Consul KV: parsing, hostile values, and classifying requests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nodemesh.discovery import routes
from nodemesh.discovery.routes import MAX_ROUTES, RouteTable, build, classify, parse_table
from nodemesh.telemetry.metrics import DEFAULT_ROUTE, Recorder

TABLE = {
    "routes": [
        {"name": "GET /users/{id}", "method": "GET", "path": "/users/[^/]+"},
        {"name": "POST /orders", "method": "POST", "path": "/orders"},
        {"name": "health", "path": "/(healthz|livez)"},
    ]
}


def table(doc: Any = TABLE, service: str = "web") -> tuple[RouteTable, list[str]]:
    return parse_table(service, json.dumps(doc).encode())


def test_a_good_table_classifies_by_method_and_whole_path() -> None:
    t, rejected = table()
    assert rejected == []
    assert t.classify(b"GET", b"/users/42") == "GET /users/{id}"
    assert t.classify(b"GET", b"/users/42?full=1") == "GET /users/{id}"  # query is not the path
    assert t.classify(b"DELETE", b"/users/42") == DEFAULT_ROUTE  # method must match
    assert t.classify(b"GET", b"/users/42/orders") == DEFAULT_ROUTE  # whole path must match
    assert t.classify(b"GET", b"/xusers/42") == DEFAULT_ROUTE
    assert t.classify(b"POST", b"/orders") == "POST /orders"
    assert t.classify(b"HEAD", b"/livez") == "health"  # no method: any
    assert repr(t) == "<RouteTable web routes=3>"


def test_first_match_wins() -> None:
    doc = {"routes": [{"name": "a", "path": "/x.*"}, {"name": "b", "path": "/xy"}]}
    assert table(doc)[0].classify(b"GET", b"/xy") == "a"


def test_classify_without_a_table_or_a_request_is_the_default() -> None:
    t, _ = table()
    assert classify({}, "web", b"GET", b"/users/1") == DEFAULT_ROUTE
    assert classify({"web": t}, "web", None, b"/users/1") == DEFAULT_ROUTE
    assert classify({"web": t}, "web", b"GET", None) == DEFAULT_ROUTE
    assert classify({"web": t}, "web", b"GET", b"/users/1") == "GET /users/{id}"


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("nope", "must be an object"),
        ({"name": "x", "path": "/a", "retry": True}, "unknown key 'retry'"),
        ({"name": "", "path": "/a"}, "name = ''"),
        ({"name": "a\nb", "path": "/a"}, "name = 'a\\nb'"),
        ({"name": "[default]", "path": "/a"}, "name = '[default]'"),
        ({"name": 7, "path": "/a"}, "name = 7"),
        ({"name": "x", "method": "get", "path": "/a"}, "method = 'get'"),
        ({"name": "x", "method": 1, "path": "/a"}, "method = 1"),
        ({"name": "x"}, "path = None"),
        ({"name": "x", "path": "(/a"}, "path = '(/a' is not a regular expression"),
        ({"name": "x", "path": "a" * 2000}, "regular expression of 1-1024"),
    ],
)
def test_a_bad_entry_is_named_and_skipped_the_rest_applies(entry: Any, words: str) -> None:
    doc = {"routes": [entry, {"name": "ok", "path": "/ok"}]}
    t, rejected = table(doc)
    assert len(rejected) == 1
    assert rejected[0].startswith("nodemesh/routes/web routes[0]: ")
    assert words in rejected[0]
    assert t.classify(b"GET", b"/ok") == "ok"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", '"routes" list'),
        (b'{"routes": {}}', '"routes" list'),
        (b"x" * (routes.MAX_VALUE + 1), "over"),
    ],
)
def test_a_bad_value_gives_an_empty_table_and_a_reason(raw: bytes, words: str) -> None:
    t, rejected = parse_table("web", raw)
    assert t.routes == ()
    assert len(rejected) == 1 and words in rejected[0]
    assert rejected[0].startswith("nodemesh/routes/web")


def test_duplicate_names_keep_the_first() -> None:
    doc = {"routes": [{"name": "a", "path": "/1"}, {"name": "a", "path": "/2"}]}
    t, rejected = table(doc)
    assert [r.path.pattern for r in t.routes] == [b"/1"]
    assert "used by an earlier route" in rejected[0]


def test_the_label_space_is_bounded_by_max_routes() -> None:
    doc = {"routes": [{"name": f"r{i}", "path": f"/r{i}"} for i in range(MAX_ROUTES + 50)]}
    t, rejected = table(doc)
    assert len(t.routes) == MAX_ROUTES
    assert rejected == [
        f"nodemesh/routes/web routes[{MAX_ROUTES}]: more than 100 routes; the rest are ignored"
    ]


def test_a_flood_of_unique_paths_adds_no_series() -> None:
    t, _ = table()
    rec = Recorder()
    for i in range(5000):
        path = f"/users/{i}" if i % 2 else f"/random/{i}"
        rec.request("inbound", "web", "api", 200, 0.001, t.classify(b"GET", path.encode()))
    assert sorted(s.route for s in rec.series()) == ["GET /users/{id}", DEFAULT_ROUTE]
    assert sum(s.count for s in rec.series()) == 5000


def test_build_from_a_kv_tree() -> None:
    entries = [
        {"Key": "nodemesh/routes/", "Value": None},  # the folder
        {"Key": "nodemesh/routes/web", "Value": json.dumps(TABLE).encode()},
        {"Key": "nodemesh/routes/db", "Value": b"garbage"},
        {"Key": "nodemesh/routes/bad name", "Value": b"{}"},
        {"Key": "nodemesh/routes/empty", "Value": b""},
        {"Key": "elsewhere/x", "Value": b"{}"},
        "not a dict",
    ]
    tables, rejected = build(entries)
    assert sorted(tables) == ["db", "web"]
    assert len(tables["web"].routes) == 3 and tables["db"].routes == ()
    assert any("nodemesh/routes/db: not JSON" in r for r in rejected)
    assert any("'bad name' is not a service name" in r for r in rejected)
    assert build(None) == ({}, [])
    assert build({"x": 1})[1] == ["nodemesh/routes/: KV answer is not a list"]


# --- hostile paths against risky patterns ----------------------------------------------------


def test_a_backtracking_pattern_cannot_stall_on_a_crafted_path() -> None:
    """``/(a+)+b`` against ``/aaa...a`` takes a backtracking engine 2^n steps (``re``: 0.5 s at
    n = 24, doubling per character); RE2 answers in time linear in the path."""
    import threading

    t, why = table({"routes": [{"name": "evil", "path": "/(a+)+b"}, {"name": "ok", "path": "/x"}]})
    assert why == []
    got: list[str] = []
    worker = threading.Thread(
        target=lambda: got.extend(t.classify(b"GET", b"/" + b"a" * n) for n in (30, 100_000)),
        daemon=True,  # under a backtracking engine it would never end: let the test fail
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "route matching did not finish on a crafted path"
    assert got == [DEFAULT_ROUTE, DEFAULT_ROUTE]
    assert t.classify(b"GET", b"/aaab") == "evil"


def test_lookaround_and_backreferences_are_rejected_with_re2s_reason() -> None:
    t, why = table(
        {
            "routes": [
                {"name": "ahead", "path": "/(?=a)a"},
                {"name": "back", "path": "/(a)\\1"},
                {"name": "fine", "path": "/users/[^/]+"},
            ]
        }
    )
    assert [r.name for r in t.routes] == ["fine"]
    assert len(why) == 2 and all("is not a regular expression RE2 accepts" in w for w in why)
    assert "routes[0]" in why[0] and "routes[1]" in why[1]


def test_a_path_that_is_not_utf8_is_the_default_route() -> None:
    t, _ = table({"routes": [{"name": "any", "path": "/files/.*"}]})
    assert t.classify(b"GET", b"/files/\xff\xfe") == DEFAULT_ROUTE
    assert t.classify(b"GET", b"/files/readme") == "any"
