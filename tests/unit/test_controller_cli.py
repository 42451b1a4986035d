"""``nodemesh controller`` and ``nodemesh ca``: exit codes and what operators read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodemesh.controller.cli import ca, controller
from nodemesh.controller.daemon import parse_advertise
from nodemesh.errors import ConfigError


def test_ca_init_creates_then_keeps_and_show_prints_it(tmp_path: Path) -> None:
    runner = CliRunner()
    state = tmp_path / "state"
    first = runner.invoke(ca, ["init", "--state-dir", str(state), "--trust-domain", "mesh.test"])
    assert first.exit_code == 0, first.output
    assert f"created root CA in {state}" in first.output
    assert "CN=nodemesh root mesh.test" in first.output
    second = runner.invoke(ca, ["init", "--state-dir", str(state), "--trust-domain", "mesh.test"])
    assert "kept existing root CA" in second.output

    shown = runner.invoke(ca, ["show", "--state-dir", str(state), "-o", "json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["trust_domain"] == "mesh.test"
    assert doc["cert_file"] == str(state / "ca.pem")
    assert len(doc["sha256_fingerprint"]) == 64
    assert doc["sha256_fingerprint"] in first.output


def test_ca_init_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    result = CliRunner().invoke(ca, ["init", "--state-dir", str(tmp_path), "--trust-domain", "A B"])
    assert result.exit_code == 64
    assert "--trust-domain 'A B' is not a valid trust domain" in result.output


def test_ca_show_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(ca, ["show", "--state-dir", str(tmp_path)])
    assert result.exit_code == 64
    assert "run nodemesh ca init --state-dir" in result.output


def test_controller_exits_64_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "controller.toml"
    bad.write_text('[controller]\nleaf_ttl = "soon"\n')
    result = CliRunner().invoke(controller, ["--config", str(bad)])
    assert result.exit_code == 64
    assert 'controller.leaf_ttl = "soon" is not a lifetime from "1s" to "720h"' in result.output


def test_controller_exits_64_when_the_join_token_is_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "controller.toml"
    cfg.write_text(
        "[controller]\n"
        f'state_dir = "{tmp_path / "state"}"\n'
        f'join_token_file = "{tmp_path / "no-token"}"\n'
        'listen = "127.0.0.1:4190"\n'
    )
    result = CliRunner().invoke(controller, ["--config", str(cfg)])
    assert result.exit_code == 64
    assert "no-token: no such file; write the cluster's join token there" in result.output


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("198.18.0.5", ("198.18.0.5", None)),
        ("198.18.0.5:4190", ("198.18.0.5", 4190)),
        ("fd00::1", ("fd00::1", None)),
        ("[fd00::1]:4190", ("fd00::1", 4190)),
    ],
)
def test_parse_advertise(value: str, expected: tuple[str, int | None]) -> None:
    assert parse_advertise(value) == expected


@pytest.mark.parametrize("value", ["controller.example:4190", "198.18.0.5:0", "198.18.0.5:x"])
def test_parse_advertise_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="is not an IP address or IP:port"):
        parse_advertise(value)
