"""A real Consul for integration tests: ``consul agent -dev`` on loopback with moved ports.

The dev agent's node is ``NODE`` at 127.0.0.1.  ``start_dev_consul`` waits (bounded) for a leader
and the node, and always stops the process by pid.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import consul

REPO = Path(__file__).resolve().parents[2]
NODE = "nm-ctl-test"
START_TIMEOUT = 20.0  # seconds


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class DevConsul:
    http_port: int
    proc: subprocess.Popen[bytes]

    def client(self) -> consul.Consul:
        return consul.Consul(host="127.0.0.1", port=self.http_port)


def consul_binary() -> str:
    found = subprocess.run(
        [str(REPO / "scripts" / "fetch-consul")], capture_output=True, text=True, timeout=300
    )
    binary = found.stdout.strip().splitlines()[-1] if found.stdout.strip() else ""
    if found.returncode != 0 or not binary:
        raise RuntimeError(f"no Consul binary: {found.stderr.strip()}")
    return binary


@contextlib.contextmanager
def start_dev_consul(d: Path) -> Iterator[DevConsul]:
    http, dns, lan, wan, server = free_ports(5)
    (d / "agent.json").write_text(
        json.dumps(
            {
                "node_name": NODE,
                "bind_addr": "127.0.0.1",
                "advertise_addr": "127.0.0.1",
                "client_addr": "127.0.0.1",
                "disable_update_check": True,
                "ports": {
                    "http": http,
                    "dns": dns,
                    "serf_lan": lan,
                    "serf_wan": wan,
                    "server": server,
                    "grpc": -1,
                },
            }
        )
    )
    with (d / "consul.log").open("wb") as log:
        proc = subprocess.Popen(
            [consul_binary(), "agent", "-dev", "-config-file", str(d / "agent.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            c = consul.Consul(host="127.0.0.1", port=http)
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    if c.status.leader() and c.catalog.node(NODE)[1]:
                        break
                except Exception:  # not up yet
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"consul did not start: {(d / 'consul.log').read_text()[-2000:]}"
                    )
                time.sleep(0.1)
            yield DevConsul(http, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
