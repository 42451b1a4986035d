"""The agent's DataFrame repr (transport/h2conn.py): the text hyperframe gives, without the
copy and hex dump of the whole payload that h2 pays for on every frame it receives."""

from __future__ import annotations

import hyperframe.frame
import pytest

import nodemesh.transport.h2conn  # noqa: F401  (installs the short repr)


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 16384])
def test_same_text_as_hyperframe(size: int) -> None:
    # hyperframe's own text: the hex of the whole body, cut at 20 characters.
    data = bytes(range(256)) * 64
    frame = hyperframe.frame.DataFrame(1, data[:size])
    expected = hyperframe.frame._raw_data_repr(data[:size])
    assert repr(frame) == f"DataFrame(stream_id=1, flags=[]): {expected}"


def test_a_memoryview_payload() -> None:
    frame = hyperframe.frame.DataFrame(3, memoryview(b"abcdefghijklmnop"))
    assert repr(frame).endswith("<hex:6162636465666768696a...>")
