"""Route tables: which named route of its service a request belongs to.  Pure, no I/O.

Theory of operation
-------------------
An operator describes a service's routes in Consul KV at ``nodemesh/routes/<service>``, as JSON
(docs/observability.md, "Routes")::

    {"routes": [
      {"name": "GET /users/{id}", "method": "GET", "path": "/users/[^/]+"},
      {"name": "POST /orders", "method": "POST", "path": "/orders"}
    ]}

``path`` is a regular expression that must match the whole request path (the query string is
not part of it); ``method`` is optional.  The first route that matches names the request; a
request no route matches is ``[default]``.

Matching is RE2 (``google-re2``), not Python's ``re``: the path comes from whoever sends the
request, and a backtracking engine gives some patterns exponential time on a crafted path
(``(a+)+b`` takes ``re`` 0.5 s on 24 characters, and doubles with each one more), which would
stall the agent's event loop.  RE2 runs in time linear in the path whatever the pattern.  All
of a service's patterns go into one ``re2.Set``, so a request is classified in one pass
(~0.7 µs here) however many routes there are.  RE2 has no lookaround or backreferences; such
a pattern is rejected with RE2's reason, like any other bad entry.

Metrics carry the route's *name*, never the path, so a flood of unique paths adds no label
set: the label space is the table, at most ``MAX_ROUTES`` per service.

KV data is input from outside: a bad entry is skipped and named in ``rejected`` (the watch logs
it), the rest of the table still applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import re2

from nodemesh.telemetry.metrics import DEFAULT_ROUTE

PREFIX = "nodemesh/routes/"
MAX_ROUTES = 100  # per service: the bound on route label values
MAX_PATTERN = 1024  # characters in one path expression
MAX_VALUE = 256 * 1024  # bytes in one service's KV value
_NAME = re.compile(r"[\x20-\x7e]{1,128}")  # printable: names end up in labels and terminals
_METHOD = re.compile(r"[A-Z]{1,16}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is our error to name, not a line on stderr
    return options


_RE2 = _re2_options()


@dataclass(frozen=True)
class Route:
    name: str
    method: bytes | None  # None: any method
    path: Any  # an re2 pattern; ``path.pattern`` is its text as bytes

    def __repr__(self) -> str:
        method = self.method.decode() if self.method else "*"
        return f"<Route {self.name!r} {method} {self.path.pattern.decode()!r}>"


@dataclass(frozen=True)
class RouteTable:
    service: str
    routes: tuple[Route, ...] = ()
    _set: Any = field(default=None, repr=False, compare=False)  # every path, one re2.Set

    def __post_init__(self) -> None:
        if self.routes and self._set is None:
            object.__setattr__(self, "_set", _path_set(self.routes))

    def __repr__(self) -> str:
        return f"<RouteTable {self.service} routes={len(self.routes)}>"

    def classify(self, method: bytes, target: bytes) -> str:
        """The name of the first route matching ``method`` and ``target``'s path."""
        if self._set is None:
            return DEFAULT_ROUTE
        hits = self._set.Match(target.split(b"?", 1)[0])  # None for a path that is not UTF-8
        if hits:
            routes = self.routes
            for i in sorted(hits) if len(hits) > 1 else hits:
                r: Route = routes[i]
                if r.method is None or r.method == method:
                    return r.name
        return DEFAULT_ROUTE


def _path_set(routes: tuple[Route, ...]) -> Any:
    """One RE2 set of the routes' paths, anchored at both ends; index i is routes[i]."""
    paths = re2.Set.FullMatchSet(_RE2)
    for r in routes:
        paths.Add(r.path.pattern)
    paths.Compile()
    return paths


def classify(
    tables: Mapping[str, RouteTable], service: str, method: bytes | None, target: bytes | None
) -> str:
    table = tables.get(service)
    if table is None or method is None or target is None:
        return DEFAULT_ROUTE
    return table.classify(method, target)


def parse_table(service: str, raw: bytes) -> tuple[RouteTable, list[str]]:
    """One service's table from its KV value, and the reasons for every entry left out."""
    where = f"{PREFIX}{service}"
    if len(raw) > MAX_VALUE:
        return RouteTable(service), [f"{where}: value is {len(raw)} bytes, over {MAX_VALUE}"]
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return RouteTable(service), [f"{where}: not JSON ({e})"]
    routes = doc.get("routes") if isinstance(doc, dict) else None
    if not isinstance(routes, list):
        return RouteTable(service), [f'{where}: must be an object with a "routes" list']
    out: list[Route] = []
    rejected: list[str] = []
    names: set[str] = set()
    for i, entry in enumerate(routes):
        at = f"{where} routes[{i}]"
        if len(out) >= MAX_ROUTES:
            rejected.append(f"{at}: more than {MAX_ROUTES} routes; the rest are ignored")
            break
        route, reason = _route(entry, at)
        if route is None:
            rejected.append(reason)
        elif route.name in names:
            rejected.append(f"{at}: name = {route.name!r} is used by an earlier route")
        else:
            names.add(route.name)
            out.append(route)
    try:
        return RouteTable(service, tuple(out)), rejected
    except re2.error as e:  # each compiled alone, but together over RE2's memory bound
        return RouteTable(service), [
            *rejected,
            f"{where}: the routes together are too big for RE2 ({e}); use fewer or simpler paths",
        ]


def _route(entry: Any, at: str) -> tuple[Route | None, str]:
    if not isinstance(entry, dict):
        return None, f"{at}: must be an object with name and path"
    unknown = sorted(set(entry) - {"name", "method", "path"})
    if unknown:
        return None, f"{at}: unknown key {unknown[0]!r} (known: name, method, path)"
    name, method, path = entry.get("name"), entry.get("method"), entry.get("path")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == DEFAULT_ROUTE:
        return None, f"{at}: name = {name!r} is not 1-128 printable characters"
    if method is not None and (not isinstance(method, str) or not _METHOD.fullmatch(method)):
        return None, f"{at}: method = {method!r} is not an HTTP method like GET"
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATTERN:
        return None, f"{at}: path = {path!r} is not a regular expression of 1-{MAX_PATTERN} chars"
    try:
        pattern = re2.compile(path.encode("utf-8"), options=_RE2)
    except re2.error as e:
        why = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else e
        return None, f"{at}: path = {path!r} is not a regular expression RE2 accepts ({why})"
    return Route(name, method.encode() if method else None, pattern), ""


def build(entries: Any) -> tuple[dict[str, RouteTable], list[str]]:
    """Every table under ``nodemesh/routes/`` from a recursive KV read (None when empty)."""
    tables: dict[str, RouteTable] = {}
    rejected: list[str] = []
    if entries is None:
        return tables, rejected
    if not isinstance(entries, list):
        return tables, [f"{PREFIX}: KV answer is not a list"]
    for e in entries:
        key = e.get("Key") if isinstance(e, dict) else None
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        service = key[len(PREFIX) :]
        if not _SERVICE.fullmatch(service):
            rejected.append(f"{key}: {service!r} is not a service name")
            continue
        value = e.get("Value")
        if not value:  # a folder, or an empty value: no table
            continue
        if not isinstance(value, bytes):
            rejected.append(f"{key}: value is not bytes")
            continue
        table, why = parse_table(service, value)
        rejected.extend(why)
        tables[service] = table
    return tables, rejected
