"""The agent's telemetry.interval key."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.config import agent_config_from_mapping
from nodemesh.errors import ConfigError


def test_interval_defaults_to_ten_seconds() -> None:
    assert agent_config_from_mapping({"agent": {"node": "n1"}}).telemetry_interval == 10.0


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("30s", 30.0), ("5m", 300.0)])
def test_interval(text: str, seconds: float) -> None:
    cfg = agent_config_from_mapping({"agent": {"node": "n1"}, "telemetry": {"interval": text}})
    assert cfg.telemetry_interval == seconds


@pytest.mark.parametrize("value", ["0s", "500ms", "6m", "soon", 0, True])
def test_bad_interval_names_key_and_value(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=r"agent.toml: telemetry.interval = .* is not an interval"
    ):
        agent_config_from_mapping({"telemetry": {"interval": value}})
