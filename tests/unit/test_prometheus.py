"""Prometheus text rendering, checked by a strict parser of the 0.0.4 exposition format."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest

from nodemesh.telemetry.metrics import Recorder
from nodemesh.telemetry.prometheus import QUANTILES, render

# --- a strict parser of the text exposition format 0.0.4 ---------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
_HELP = re.compile(rf"^# HELP ({_NAME}) ((?:[^\\\n]|\\[\\n])*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")
_SAMPLE = re.compile(
    rf"^({_NAME})(\{{(?:{_LABEL}={_VALUE}(?:,{_LABEL}={_VALUE})*)?\}})? (?P<v>\S+)$"
)
_PAIR = re.compile(rf"({_LABEL})={_VALUE}")
_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "summary": ("", "_sum", "_count"),
    "histogram": ("_bucket", "_sum", "_count"),
}


class ExpositionError(AssertionError):
    pass


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        if name.startswith("nodemesh_request"):  # the request families' labels with defaults
            labels = {"route": "[default]", "dst_host": ""} | labels
        return self.samples[(name, frozenset(labels.items()))]

    def named(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {lb: v for (n, lb), v in self.samples.items() if n == name}


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def _float(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf"))
    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", text):
        raise ExpositionError(f"bad sample value {text!r}")
    return float(text)


def parse(text: str) -> Exposition:
    """Parse ``text`` or raise ExpositionError naming the first rule it breaks."""
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a newline")
    out = Exposition()
    current: str | None = None  # the family whose lines we are in
    done: set[str] = set()  # families already closed: each must be one group
    for no, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            m = _HELP.match(line) or _TYPE.match(line)
            if m is None:
                if line.startswith(("# HELP", "# TYPE")):
                    raise ExpositionError(f"line {no}: malformed {line!r}")
                continue  # a plain comment
            name = m.group(1)
            table = out.helps if line.startswith("# HELP") else out.types
            if name in table:
                raise ExpositionError(f"line {no}: second HELP/TYPE for {name}")
            if line.startswith("# TYPE") and any(n == name for n, _ in out.samples):
                raise ExpositionError(f"line {no}: TYPE for {name} after its samples")
            table[name] = m.group(2)
            family = name
        else:
            m = _SAMPLE.match(line)
            if m is None:
                raise ExpositionError(f"line {no}: not a sample: {line!r}")
            name, labelset, value = m.group(1), m.group(2) or "{}", m.group("v")
            labels = {k: _unescape(v) for k, v in _PAIR.findall(labelset)}
            if len(labels) != len(_PAIR.findall(labelset)):
                raise ExpositionError(f"line {no}: repeated label in {line!r}")
            family = _family(out, name)
            kind = out.types.get(family, "untyped")
            if kind == "summary" and name == family and "quantile" not in labels:
                raise ExpositionError(f"line {no}: summary sample without quantile")
            if "quantile" in labels:
                if kind != "summary" or name != family:
                    raise ExpositionError(f"line {no}: quantile label outside a summary")
                if not 0 <= _float(labels["quantile"]) <= 1:
                    raise ExpositionError(f"line {no}: quantile out of [0, 1]")
            key = (name, frozenset(labels.items()))
            if key in out.samples:
                raise ExpositionError(f"line {no}: duplicate sample {line!r}")
            out.samples[key] = _float(value)
        if family != current:
            if family in done:
                raise ExpositionError(f"line {no}: {family} is split into several groups")
            if current is not None:
                done.add(current)
            current = family
    return out


def _family(out: Exposition, name: str) -> str:
    for family, kind in out.types.items():
        for suffix in _SUFFIXES[kind]:
            if name == family + suffix:
                return family
    return name


# --- the parser itself must reject what it should -----------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a 1",  # no final newline
        'a{b="x"} 1\na{b="x"} 2\n',  # duplicate
        'a{b="x\ny"} 1\n',  # raw newline in a value
        'a{b="\\q"} 1\n',  # unknown escape
        "a one\n",
        "# TYPE a counter\n# TYPE a gauge\na 1\n",
        "a 1\n# TYPE a counter\n",
        '# TYPE a counter\na 1\nb 1\na{x="1"} 2\n',  # split group
        "# TYPE s summary\ns 1\n",  # summary value without quantile
        '# TYPE s summary\ns{quantile="2"} 1\n',
        '# TYPE c counter\nc{quantile="0.5"} 1\n',
        "9a 1\n",
        "# HELP a bad \\q escape\n",
    ],
)
def test_the_parser_is_strict(text: str) -> None:
    with pytest.raises(ExpositionError):
        parse(text)


# --- render -------------------------------------------------------------------------------------


def recorder() -> Recorder:
    rec = Recorder()
    for ms in range(1, 1001):
        rec.request("inbound", "web", "shop", 200, ms / 1000)
    rec.request("inbound", "web", "shop", 503, 0.25)
    rec.request("outbound", "web", "shop", 0, 2.0)
    t = rec.tcp("inbound", "db")
    t.opened, t.closed, t.bytes_in, t.bytes_out = 7, 4, 1234, 56789
    rec.tcp("egress", "198.18.0.9:443").opened = 1
    return rec


def test_render_parses_and_declares_every_family() -> None:
    exp = parse(render(recorder()))
    assert exp.types == {
        "nodemesh_requests_total": "counter",
        "nodemesh_request_duration_seconds": "summary",
        "nodemesh_tcp_connections_total": "counter",
        "nodemesh_tcp_closed_total": "counter",
        "nodemesh_tcp_read_bytes_total": "counter",
        "nodemesh_tcp_write_bytes_total": "counter",
        "nodemesh_tcp_open_connections": "gauge",
        "nodemesh_series_overflow_total": "counter",
        "nodemesh_reports_dropped_total": "counter",
    }
    assert set(exp.helps) == set(exp.types)


def test_request_counts() -> None:
    exp = parse(render(recorder()))
    counts = exp.named("nodemesh_requests_total")
    assert counts == {
        frozenset(
            {
                "direction": "inbound",
                "service": "web",
                "peer": "shop",
                "route": "[default]",
                "dst_host": "",
                "status_class": "2xx",
            }.items()
        ): 1000,
        frozenset(
            {
                "direction": "inbound",
                "service": "web",
                "peer": "shop",
                "route": "[default]",
                "dst_host": "",
                "status_class": "5xx",
            }.items()
        ): 1,
        frozenset(
            {
                "direction": "outbound",
                "service": "web",
                "peer": "shop",
                "route": "[default]",
                "dst_host": "",
                "status_class": "error",
            }.items()
        ): 1,
    }


def test_quantiles_are_the_histogram_values() -> None:
    rec = recorder()
    exp = parse(render(rec))
    base = {"direction": "inbound", "service": "web", "peer": "shop", "status_class": "2xx"}
    h = next(s for s in rec.series() if s.status == "2xx").latency
    for q in QUANTILES:
        got = exp.value("nodemesh_request_duration_seconds", **base, quantile=str(q))
        assert got == pytest.approx(h.get_value_at_percentile(q * 100) / 1e6, abs=1e-6)
        assert abs(got - q) <= q * 0.001 + 1e-6  # exact to 0.1 %, not interpolated in a bucket
    assert exp.value("nodemesh_request_duration_seconds_count", **base) == 1000
    assert exp.value("nodemesh_request_duration_seconds_sum", **base) == pytest.approx(
        500.5, rel=1e-3
    )
    assert len(exp.named("nodemesh_request_duration_seconds")) == 3 * len(QUANTILES)


def test_tcp_families() -> None:
    exp = parse(render(recorder()))
    db = {"direction": "inbound", "service": "db"}
    assert exp.value("nodemesh_tcp_connections_total", **db) == 7
    assert exp.value("nodemesh_tcp_closed_total", **db) == 4
    assert exp.value("nodemesh_tcp_read_bytes_total", **db) == 1234
    assert exp.value("nodemesh_tcp_write_bytes_total", **db) == 56789
    assert exp.value("nodemesh_tcp_open_connections", **db) == 3
    egress = {"direction": "egress", "service": "198.18.0.9:443"}
    assert exp.value("nodemesh_tcp_open_connections", **egress) == 1
    assert exp.value("nodemesh_series_overflow_total") == 0


@pytest.mark.parametrize(
    "name", ['we"b', "back\\slash", "new\nline", "trailing\\", "ünïcode ✓", '{a="b"}', ""]
)
def test_hostile_label_values_round_trip(name: str) -> None:
    rec = Recorder()
    rec.request("outbound", name, name, 200, 0.001)
    rec.tcp("egress", name).opened = 1
    exp = parse(render(rec))
    lb = {"direction": "outbound", "service": name, "peer": name, "status_class": "2xx"}
    assert exp.value("nodemesh_requests_total", **lb) == 1
    assert exp.value("nodemesh_tcp_connections_total", direction="egress", service=name) == 1


def test_empty_recorder_renders_valid_text() -> None:
    exp = parse(render(Recorder()))
    assert exp.samples == {
        ("nodemesh_series_overflow_total", frozenset()): 0,
        ("nodemesh_reports_dropped_total", frozenset()): 0,
    }


def test_dropped_reports_are_a_counter() -> None:
    rec = Recorder()
    rec.reports_dropped = 3
    assert parse(render(rec)).value("nodemesh_reports_dropped_total") == 3


def test_overflow_count_and_extra_lines() -> None:
    rec = Recorder()
    rec.overflowed = 12
    text = render(
        rec, ["# HELP nodemesh_up Always 1.", "# TYPE nodemesh_up gauge", "nodemesh_up 1"]
    )
    exp = parse(text)
    assert exp.value("nodemesh_series_overflow_total") == 12
    assert exp.value("nodemesh_up") == 1
    assert text.endswith("nodemesh_up 1\n")


def test_output_is_sorted_and_stable() -> None:
    rec = Recorder()
    for svc in ("zeta", "alpha", "mid"):
        rec.request("outbound", svc, "p", 200, 0.001)
    text = render(rec)
    assert text == render(rec)
    order = [
        m.group(1)
        for m in re.finditer(r'^nodemesh_requests_total\{[^}]*service="(\w+)"', text, re.M)
    ]
    assert order == ["alpha", "mid", "zeta"]
    assert all(math.isfinite(v) for v in parse(text).samples.values())
