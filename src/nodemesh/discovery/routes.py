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
request no route matches is ``[default]``.  Metrics carry the route's *name*, never the path, so
a flood of unique paths adds no label set: the label space is the table, at most
``MAX_ROUTES`` per service.

KV data is input from outside: a bad entry is skipped and named in ``rejected`` (the watch logs
it), the rest of the table still applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodemesh.telemetry.metrics import DEFAULT_ROUTE

PREFIX = "nodemesh/routes/"
MAX_ROUTES = 100  # per service: the bound on route label values
MAX_PATTERN = 1024  # characters in one path expression
MAX_VALUE = 256 * 1024  # bytes in one service's KV value
_NAME = re.compile(r"[\x20-\x7e]{1,128}")  # printable: names end up in labels and terminals
_METHOD = re.compile(r"[A-Z]{1,16}")
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Route:
    name: str
    method: bytes | None  # None: any method
    path: re.Pattern[bytes]

    def __repr__(self) -> str:
        method = self.method.decode() if self.method else "*"
        return f"<Route {self.name!r} {method} {self.path.pattern.decode()!r}>"


@dataclass(frozen=True)
class RouteTable:
    service: str
    routes: tuple[Route, ...] = ()

    def __repr__(self) -> str:
        return f"<RouteTable {self.service} routes={len(self.routes)}>"

    def classify(self, method: bytes, target: bytes) -> str:
        """The name of the first route matching ``method`` and ``target``'s path."""
        path = target.split(b"?", 1)[0]
        for r in self.routes:
            if (r.method is None or r.method == method) and r.path.fullmatch(path):
                return r.name
        return DEFAULT_ROUTE


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
    return RouteTable(service, tuple(out)), rejected


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
        pattern = re.compile(path.encode("utf-8"))
    except re.error as e:
        return None, f"{at}: path = {path!r} is not a regular expression ({e})"
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
