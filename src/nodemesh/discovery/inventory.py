"""One-shot catalog reads for the CLI: where the agents' admin endpoints are, what is meshed."""

from __future__ import annotations

from collections import Counter

from nodemesh.config import parse_addr
from nodemesh.discovery.consul import ConsulClient
from nodemesh.discovery.snapshot import AGENT_SERVICE, build


async def agents_and_services(consul_addr: tuple[str, int]) -> tuple[list[str], dict[str, int]]:
    """(admin addresses of every registered agent, service -> healthy meshed instances)."""
    client = ConsulClient(consul_addr)
    _, names = await client.services()
    raw = {}
    for name in names:
        _, raw[name] = await client.health(name)
    snap = build(raw, local_node="")
    admins = []
    for entry in raw.get(AGENT_SERVICE, []) or []:
        meta = (entry.get("Service") or {}).get("Meta") or {} if isinstance(entry, dict) else {}
        admin = meta.get("admin") if isinstance(meta, dict) else None
        try:  # Consul data is hostile: only ever fetch from a plain ip:port
            host, port = parse_addr(admin)
        except Exception:  # noqa: S112  (skipped on purpose; stat shows the count)
            continue
        admins.append(f"{host}:{port}")
    meshed = Counter({s: len(eps) for s, eps in snap.endpoints.items()})
    return admins, dict(meshed)
