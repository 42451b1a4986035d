"""Hostile input against the controller's API, generated: the report decoder, the endpoints'
decisions and the HTTP layer under them.  Every input gets one status (or, for bytes that are
not HTTP, an error answer or a close); nothing raises, and nothing a request leaves behind grows
past its bound."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controller import api as api_module
from nodemesh.controller import metrics
from nodemesh.controller.api import ControllerApi, Request
from nodemesh.controller.catalog import NodeInfo
from nodemesh.identity import spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.telemetry.metrics import new_histogram

TD, DC = "mesh.test", "dc1"
T0 = 1_764_080_000.0
NODE = spiffe.node_id(TD, DC, "host-a")
CA = CertificateAuthority.create(TD)
PATHS = ["/v1/health", "/v1/ca/roots", "/v1/sign/node", "/v1/sign/service",
         "/v1/metrics/report", "/v1/metrics", "/", "/v1/metrics/report/x"]  # fmt: skip
STATUSES = {200, 400, 401, 403, 404, 405, 413, 503}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Directory:
    async def node(self, name: str) -> NodeInfo | None:
        if name != "host-a":
            return None
        return NodeInfo(name, "198.18.0.1", frozenset({"web"}), alive=True)


def _valid_report() -> dict[str, Any]:
    h = new_histogram()
    h.record_value(250)
    labels = {"direction": "inbound", "service": "web", "peer": "", "status": "2xx",
              "route": "", "endpoint": ""}  # fmt: skip
    return {
        "agent": NODE.uri,
        "seq": 0,
        "start": T0,
        "end": T0 + 10,
        "series": [{"labels": labels, "count": 1, "hdr": h.encode().decode()}],
        "tcp": [
            {
                "direction": "inbound",
                "service": "web",
                "opened": 1,
                "closed": 0,
                "bytes_in": 1,
                "bytes_out": 1,
            }
        ],
        "dropped": 0,
    }


VALID = _valid_report()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in ``doc`` a value sits: where a mutation may go."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PLACES = _paths(VALID)[1:]


@st.composite
def near_reports(draw: st.DrawFn) -> Any:
    """A valid report with one to three of its values replaced by anything JSON can hold."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        place = draw(st.sampled_from(PLACES))
        target = doc
        try:
            for key in place[:-1]:
                target = target[key]
            target[place[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed the path
    return doc


@FUZZ
@given(st.one_of(json_values, near_reports()))
def test_the_report_decoder_accepts_or_names_the_bad_field(doc: Any) -> None:
    try:
        report = metrics.parse_report(doc)
    except metrics.BadReport as e:
        assert str(e)
        return
    kept, series, tcp = metrics.attribute(report, frozenset({"web"}))
    assert len(kept.series) == len(series) <= len(report.series)
    assert len(kept.tcp) == len(tcp) <= len(report.tcp)


bodies = st.one_of(
    st.binary(max_size=300),
    near_reports().map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda d: json.dumps(d).encode()),
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]) | st.text(max_size=8),
    path=st.sampled_from(PATHS) | st.text(max_size=30),
    query=st.text(max_size=40),
    body=bodies,
    auth=st.sampled_from(["", "Bearer token", "Bearer nope", "Basic x"]) | st.text(max_size=20),
    peer=st.sampled_from(
        [None, NODE, spiffe.service_id(TD, DC, "web"), spiffe.node_id("other.test", DC, "x")]
    ),
)
def test_every_request_gets_one_status_and_a_sentence(
    method: str, path: str, query: str, body: bytes, auth: str, peer: spiffe.SpiffeId | None
) -> None:
    api = ControllerApi(CA, Directory(), "token", DC, 3600, clock=lambda: T0 + 15)

    async def one() -> None:
        req = Request(method, path, {"authorization": auth}, body, "198.18.0.1", peer, query)
        head = api.admit(req)
        resp = head if head is not None else await api.handle(req)
        assert resp.status in STATUSES, (resp.status, resp.body[:200])
        if resp.status >= 400:
            assert json.loads(resp.body)["error"]

    trio.run(one)
    assert len(api._nodes) <= 1 and len(api._answers) <= 1


def _http_request(method: bytes, path: bytes, body: bytes, extra: bytes) -> bytes:
    head = method + b" " + path + b" HTTP/1.1\r\nhost: c\r\n" + extra
    return head + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body


http_inputs = st.one_of(
    st.binary(max_size=400),
    st.builds(
        _http_request,
        st.sampled_from([b"GET", b"POST", b"PUT", b"G\x00T"]),
        st.sampled_from([p.encode() for p in PATHS] + [b"/v1/metrics?window=5d", b"*"]),
        bodies,
        st.sampled_from(
            [
                b"",
                b"transfer-encoding: chunked\r\n",
                b"content-length: 99999999\r\n",
                b"connection: close\r\n",
                b"x: " + b"y" * 70_000 + b"\r\n",
            ]
        ),
    ),
)


@FUZZ
@given(data=http_inputs, close=st.booleans())
def test_the_http_layer_answers_or_closes_on_any_bytes(data: bytes, close: bool) -> None:
    """Bytes from a client that passed TLS: the server answers each request it can parse with
    a status, answers what it cannot with 4xx, and ends the connection; whether or not the
    client closes its side, the server task ends (by its own timeouts at worst)."""
    api = ControllerApi(CA, Directory(), "token", DC, 3600, clock=lambda: T0 + 15)

    async def one() -> None:
        client, server = trio.testing.memory_stream_pair()
        got = bytearray()
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                # What _serve_connection treats as the client's doing, and nothing else.
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError
                ):
                    await api_module._serve_http(api, server, "198.18.0.1", NODE, trio.Semaphore(2))
                await server.aclose()

            nursery.start_soon(serve)
            await client.send_all(data)
            if close:
                await client.send_eof()
            with trio.fail_after(3600):  # virtual: the server's own timeouts end it well before
                while chunk := await client.receive_some(65536):
                    got.extend(chunk)
        assert not got or got.startswith(b"HTTP/1.1 "), bytes(got[:80])

    # Virtual time jumps once nothing has run for 20 ms of real time: a query's worker thread
    # (``to_thread``) is not a trio task, so a zero threshold would jump past it.
    trio.run(one, clock=trio.testing.MockClock(autojump_threshold=0.02))
