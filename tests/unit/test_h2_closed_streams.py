"""A long-lived HTTP/2 connection's memory does not grow with the streams it has carried.

h2 remembers the last 65,536 closed streams of a connection; on the one long-lived connection
between two agents that grew the agents' RSS by about 13 MiB over 40,000 h2c requests in the
benchmark lab.  ``H2Protocol`` remembers ``CLOSED_STREAMS_KEPT``."""

from __future__ import annotations

import gc
import tracemalloc

import h2.config
import h2.connection

from nodemesh.transport.h2conn import CLOSED_STREAMS_KEPT, H2Protocol

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a")]


def _pair(cls: type[h2.connection.H2Connection]) -> tuple[h2.connection.H2Connection, ...]:
    c = cls(h2.config.H2Configuration(client_side=True, header_encoding=None))
    s = cls(h2.config.H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    return c, s


def _streams(c: h2.connection.H2Connection, s: h2.connection.H2Connection, n: int) -> None:
    for _ in range(n):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, REQUEST, end_stream=True)
        s.receive_data(c.data_to_send())
        s.send_headers(sid, [(b":status", b"200")], end_stream=True)
        c.receive_data(s.data_to_send())


def _growth(cls: type[h2.connection.H2Connection]) -> int:
    """Bytes still held after 10,000 more streams, once the first 10,000 filled what is kept."""
    tracemalloc.start()  # before the first streams: entries they leave are freed under tracing
    try:
        c, s = _pair(cls)
        _streams(c, s, 10_000)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        _streams(c, s, 10_000)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_closed_streams_are_remembered_within_a_bound() -> None:
    c, s = _pair(H2Protocol)
    _streams(c, s, CLOSED_STREAMS_KEPT + 500)
    assert len(s._closed_streams) == CLOSED_STREAMS_KEPT


def test_memory_stops_growing_once_the_bound_is_reached() -> None:
    stock, ours = _growth(h2.connection.H2Connection), _growth(H2Protocol)
    assert stock > 2_000_000  # the control: h2's default keeps growing (~130 bytes a stream)
    assert ours < 100_000
