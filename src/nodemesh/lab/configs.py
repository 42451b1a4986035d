"""The agent.toml and controller.toml the lab writes for each host (pure: no I/O but the caller's).

Each file is checked with nodemesh's own config loader before it is written, so a bad override
in a test fails at once with the loader's message instead of as an agent that never gets ready.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nodemesh.config import agent_config_from_mapping, controller_config_from_mapping

ADMIN_PORT = 4191
CONTROLLER_PORT = 4190
TRUST_DOMAIN = "nodemesh.local"
DATACENTER = "dc1"
# Lab teardown waits for agents to drain; production's 120 s would make every test slow.
SHUTDOWN_GRACE = "5s"

Sections = Mapping[str, Mapping[str, Any]]


def to_toml(sections: Sections) -> str:
    """TOML for one level of ``[section]`` tables holding strings, numbers, booleans, lists."""
    out: list[str] = []
    for name, body in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_value(v, f'{name}.{key}')}" for key, v in body.items())
        out.append("")
    return "\n".join(out)


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    raise TypeError(f"{where} = {v!r}: the lab's TOML writer takes str, number, bool or list")


def merge(base: Sections, overrides: Sections) -> dict[str, dict[str, Any]]:
    out = {name: dict(body) for name, body in base.items()}
    for name, body in overrides.items():
        out.setdefault(name, {}).update(body)
    return out


def agent_sections(
    *,
    node: str,
    ip: str,
    state_dir: Path,
    proxy_uid: int,
    ca_file: Path,
    join_token_file: Path,
    overrides: Sections | None = None,
) -> dict[str, dict[str, Any]]:
    base: Sections = {
        "agent": {
            "node": node,
            "datacenter": DATACENTER,
            "trust_domain": TRUST_DOMAIN,
            "state_dir": str(state_dir),
            "proxy_uid": proxy_uid,
        },
        # On the host's address, so the lab (and a test) can read it from another host.
        "listen": {"admin": f"{ip}:{ADMIN_PORT}"},
        # controller.address stays empty: agents find the controller in Consul.
        "controller": {"ca_file": str(ca_file), "join_token_file": str(join_token_file)},
        "shutdown": {"grace": SHUTDOWN_GRACE},
        "log": {"level": "info", "format": "console"},
    }
    sections = merge(base, overrides or {})
    agent_config_from_mapping(sections, f"{node}/agent.toml")
    return sections


def controller_sections(
    *,
    node: str,
    ip: str,
    state_dir: Path,
    join_token_file: Path,
    overrides: Sections | None = None,
) -> dict[str, dict[str, Any]]:
    base: Sections = {
        "controller": {
            "node": node,
            "datacenter": DATACENTER,
            "trust_domain": TRUST_DOMAIN,
            "state_dir": str(state_dir),
            "listen": f"0.0.0.0:{CONTROLLER_PORT}",
            "advertise": f"{ip}:{CONTROLLER_PORT}",
            "join_token_file": str(join_token_file),
        },
        "log": {"level": "info", "format": "console"},
    }
    sections = merge(base, overrides or {})
    controller_config_from_mapping(sections, f"{node}/controller.toml")
    return sections
