"""The CLI's side of the controller metrics API: ``GET /v1/metrics`` over mTLS.

The controller answers any client certificate from its CA (docs/observability.md); on an
agent host the CLI presents that host's node certificate, which the agent keeps under
``<state_dir>/identity/node-<node>.pem`` next to ``roots.pem``.  Where the controller is:
``--controller``, else the agent config's ``controller.address``, else Consul.

Everything here that can fail says so with ``ControllerUnavailable`` (retry later: ``top``
shows it and reconnects, ``stat`` falls back to reading agents) or ``ConfigError`` (the
operator must fix a path or a flag).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.config import AgentConfig, parse_addr
from nodemesh.errors import ConfigError
from nodemesh.identity.client import ControllerClient, ControllerRefused, ControllerUnavailable

BY = ("service", "route", "edge", "edge_route", "host")
_WINDOW = re.compile(r"^\d+(s|m|h)$")
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.S)


@dataclass(frozen=True)
class Credentials:
    roots_pem: bytes
    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never print key material
        return f"<Credentials chain={len(self.chain_pem)}B>"


def load_credentials(ca_file: Path, pair_file: Path) -> Credentials:
    """The trust roots and a key+certificate PEM file (the agent's own layout)."""
    try:
        roots = ca_file.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{ca_file}: cannot read the mesh CA ({e.strerror}); pass --ca-file with the "
            "controller's ca.pem"
        ) from None
    try:
        data = pair_file.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{pair_file}: cannot read a client certificate ({e.strerror}); run on an agent "
            "host as root, or pass --cert with a key and certificate PEM from the mesh CA"
        ) from None
    blocks = [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    key = b"".join(b for kind, b in blocks if kind.endswith(b"PRIVATE KEY"))
    chain = b"".join(b for kind, b in blocks if kind == b"CERTIFICATE")
    if not key or not chain:
        raise ConfigError(f"{pair_file}: holds no private key and certificate; pass --cert")
    return Credentials(roots, chain, key)


def agent_paths(cfg: AgentConfig) -> tuple[Path, Path]:
    """(roots, node key+cert) as the agent on this host keeps them."""
    ident = cfg.state_dir / "identity"
    roots = ident / "roots.pem"
    return (roots if roots.exists() else cfg.ca_file), ident / f"node-{cfg.node}.pem"


def check_window(window: str) -> str:
    if not _WINDOW.match(window):
        raise ConfigError(f'--window {window!r} is not a duration like "10s", "1m", "10m" or "1h"')
    return window


def check_address(addr: str) -> str:
    try:
        host, port = parse_addr(addr)
    except Exception:  # config's parser raises its private error type
        raise ConfigError(
            f'--controller {addr!r} is not an address like "198.18.0.5:4190"'
        ) from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def fetch_answer(
    controller_addr: str, window: str, by: str, creds: Credentials, direction: str = "inbound"
) -> dict[str, Any]:
    """The controller's whole answer (rows plus window and overflow figures).  The timeout
    belongs to the caller."""
    if by not in BY:
        raise ValueError(f"by={by!r}: must be one of {', '.join(BY)}")
    client = ControllerClient(lambda: controller_addr, creds.roots_pem, join_token="")
    try:
        answer = await client.metrics(window, by, creds.chain_pem, creds.key_pem, direction)
    except ControllerRefused as e:
        if e.status == 400:  # names our own bad window/by: the operator must fix the flag
            raise ConfigError(f"controller refused the query: {e.message}") from None
        raise ControllerUnavailable(str(e)) from None
    if not isinstance(answer.get("rows"), list):
        raise ControllerUnavailable(f"controller at {controller_addr} answered without rows")
    return answer


async def fetch_rows(
    controller_addr: str, window: str, by: str, creds: Credentials, direction: str = "inbound"
) -> list[dict[str, Any]]:
    """The answer's rows, as the controller sent them (``views`` and ``top`` check each)."""
    answer = await fetch_answer(controller_addr, window, by, creds, direction)
    return [r for r in answer["rows"] if isinstance(r, dict)]


async def find_controller(consul_addr: tuple[str, int]) -> str | None:
    """A passing ``nodemesh-controller`` instance from Consul, or None."""
    from nodemesh.discovery.consul import ConsulClient
    from nodemesh.discovery.snapshot import CONTROLLER_SERVICE, build

    _, entries = await ConsulClient(consul_addr).health(CONTROLLER_SERVICE)
    found = build({CONTROLLER_SERVICE: entries or []}, local_node="").controllers
    if not found:
        return None
    host, port = found[0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
