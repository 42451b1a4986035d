"""The agent's DataFrame repr (transport/h2conn.py): the text hyperframe gives, without the
copy and hex dump of the whole payload that h2 pays for on every frame it receives."""

from __future__ import annotations

import binascii

import hyperframe.frame
import pytest

import nodemesh.transport.h2conn  # noqa: F401  (installs the short repr)


def _hyperframe_text(data: bytes) -> str:
    # hyperframe's own rule: hex of the whole body, cut at 20 characters.
    if not data:
        return "None"
    r = binascii.hexlify(data).decode("ascii")
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 16384])
def test_same_text_as_hyperframe(size: int) -> None:
    data = bytes(range(256)) * 64
    frame = hyperframe.frame.DataFrame(1, data[:size])
    assert repr(frame) == f"DataFrame(stream_id=1, flags=[]): {_hyperframe_text(data[:size])}"


def test_a_memoryview_payload() -> None:
    frame = hyperframe.frame.DataFrame(3, memoryview(b"abcdefghijklmnop"))
    assert repr(frame).endswith("<hex:6162636465666768696a...>")
