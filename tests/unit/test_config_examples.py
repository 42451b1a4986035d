"""configs/ and docs/config.md cover every key the code knows, and the examples load."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from nodemesh.config import (
    AGENT_KEYS,
    CONTROLLER_KEYS,
    agent_config_from_mapping,
    controller_config_from_mapping,
)

ROOT = Path(__file__).parents[2]


def _mentioned(toml_text: str) -> set[str]:
    """Every ``section.key`` in a TOML file, commented-out keys included."""
    found, section = set(), ""
    for line in toml_text.splitlines():
        m = re.match(r"^\s*\[(\w+)\]", line)
        if m:
            section = m[1]
            continue
        m = re.match(r"^\s*#?\s*(\w+)\s*=", line)
        if m and section:
            found.add(f"{section}.{m[1]}")
    return found


@pytest.mark.parametrize(
    ("name", "keys", "load"),
    [
        ("agent.toml", AGENT_KEYS, agent_config_from_mapping),
        ("controller.toml", CONTROLLER_KEYS, controller_config_from_mapping),
    ],
)
def test_example_loads_and_shows_every_key(name: str, keys: dict, load) -> None:  # type: ignore[type-arg, no-untyped-def]
    text = (ROOT / "configs" / name).read_text()
    load(tomllib.loads(text), name)
    assert set(keys) - _mentioned(text) == set()


def test_docs_name_every_key() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in [*AGENT_KEYS, *CONTROLLER_KEYS] if f"`{k}`" not in doc]
    assert missing == []
