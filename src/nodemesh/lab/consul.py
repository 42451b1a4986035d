"""A real Consul cluster in the lab: servers on their own hosts, a client agent on every other.

Every agent binds gossip and RPC to its host's 198.18 address and serves its HTTP API on
127.0.0.1:8500 *inside its namespace*, so each host's apps and nodemesh agent find "the local
Consul agent" exactly where they would on a VM.  The lab itself talks to that API with curl from
inside a namespace (the root namespace has no route to 198.18.0.0/24, on purpose).

Timers are the fastest Consul 1.8.7 accepts, so failure tests take seconds, not minutes:
raft_multiplier 1 (its production setting), LAN gossip probing every 500 ms (a killed agent is
"failed" in ~2 s instead of ~10 s), and check results pushed to the servers at once instead of
being coalesced.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodemesh.lab import netns
from nodemesh.lab.netns import Host, LabError, Process, curl, spawn, tail

HTTP = "http://127.0.0.1:8500"
DATACENTER = "dc1"
START_TIMEOUT = 30.0  # seconds; a 3-server cluster here elects and joins in ~2 s
REJOIN_EVERY = 2.0  # seconds an agent may lag behind the membership before it is told to join


def find_binary(repo: Path) -> Path:
    """The Consul binary ``scripts/fetch-consul`` names (it downloads one when there is none)."""
    script = repo / "scripts" / "fetch-consul"
    try:
        p = subprocess.run([str(script)], capture_output=True, text=True, timeout=300, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{script}: could not run it ({e}); run scripts/bootstrap") from None
    path = Path(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else None
    if p.returncode != 0 or path is None or not path.exists():
        raise LabError(f"{script} found no Consul ({p.stderr.strip()}); run scripts/bootstrap")
    return path


def agent_config(
    host: Host,
    servers: Sequence[Host],
    data_dir: Path,
    server: bool,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON config of one lab Consul agent (pure: unit-testable).

    ``overrides`` (``LabSpec.consul_config``) is merged over it key by key, nested objects
    too: ``{"connect": {"enabled": True}}`` adds Connect, ``{"ports": {"http": 18500}}`` moves
    one port and keeps the lab's ``grpc = -1``.
    """
    cfg: dict[str, Any] = {
        "node_name": host.name,
        "datacenter": DATACENTER,
        "data_dir": str(data_dir),
        "bind_addr": host.ip,
        "advertise_addr": host.ip,
        "client_addr": "127.0.0.1",
        "server": server,
        "retry_join": [s.ip for s in servers],
        "retry_interval": "1s",
        # Every agent on this machine would derive the same host-based node ID.
        "disable_host_node_id": True,
        "disable_update_check": True,
        "enable_script_checks": False,
        "check_update_interval": "0s",
        "performance": {"raft_multiplier": 1},
        "gossip_lan": {
            "gossip_interval": "100ms",
            "probe_interval": "500ms",
            "probe_timeout": "250ms",
            "suspicion_mult": 3,
        },
        "log_level": "info",
        "ports": {"grpc": -1},
    }
    if server:
        cfg["bootstrap_expect"] = len(servers)
        cfg["ui"] = False
    return merge_config(cfg, overrides or {})


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; objects present in both are merged recursively,
    anything else (a list, a string, an object replacing a scalar) replaces (pure)."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge_config(old, value)
        else:
            out[key] = value
    return out


@dataclass
class ConsulAgent:
    host: Host
    server: bool
    config_file: Path
    process: Process | None = None

    def __repr__(self) -> str:
        role = "server" if self.server else "client"
        return f"<ConsulAgent {role}@{self.host.name} {self.process!r}>"


def api(
    host: Host, path: str, *, method: str = "GET", body: Any = None, timeout: float = 5.0
) -> Any:
    """Call the Consul HTTP API of ``host``'s local agent; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    r = curl(host, HTTP + path, method=method, data=data, timeout=timeout)
    if r.status != 200:
        raise LabError(f"consul on {host.name}: {method} {path} -> {r.status or r.error} {r.text}")
    return r.json() if r.body.strip() else None


class ConsulCluster:
    """N servers and clients; ``start`` returns once there is a leader and every member is alive."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        servers: Sequence[Host],
        clients: Sequence[Host],
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        if not servers:
            raise LabError("a Consul cluster needs at least one server host")
        self.binary = binary
        self.workdir = workdir
        self.servers = list(servers)
        self.overrides = dict(overrides or {})  # merged over every agent's config
        self.agents: dict[str, ConsulAgent] = {}
        for h in [*servers, *clients]:
            self.agents[h.name] = ConsulAgent(h, h in servers, workdir / h.name / "consul.json")

    def __repr__(self) -> str:
        return f"<ConsulCluster servers={[s.name for s in self.servers]} agents={len(self.agents)}>"

    def log_path(self, host: str) -> Path:
        return self.workdir / host / "consul.log"

    def start_agent(self, name: str) -> Process:
        a = self.agents[name]
        if a.process is not None and a.process.running:
            raise LabError(f"consul on {name} is already running (pid {a.process.pid})")
        data_dir = self.workdir / name / "consul-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        a.config_file.write_text(
            json.dumps(
                agent_config(a.host, self.servers, data_dir, a.server, self.overrides), indent=2
            )
        )
        argv = [str(self.binary), "agent", f"-config-file={a.config_file}"]
        a.process = spawn(a.host, argv, self.log_path(name), name="consul")
        return a.process

    def stop_agent(self, name: str, grace: float = 5.0) -> None:
        a = self.agents[name]
        if a.process is not None:
            a.process.stop(grace)

    def kill_agent(self, name: str) -> None:
        """SIGKILL: the agent vanishes without leaving, as in a crash or a lost host."""
        a = self.agents[name]
        if a.process is not None:
            a.process.stop(grace=0)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        for name in self.agents:
            self.start_agent(name)
        self.wait_ready(timeout)

    def leader(self) -> str:
        """The leader's ``ip:port`` as a server reports it, or "" while there is none."""
        for s in self.servers:
            try:
                out = api(s, "/v1/status/leader", timeout=2.0)
            except LabError:
                continue
            if out:
                return str(out)
        return ""

    def members(self, via: str | None = None) -> dict[str, int]:
        """Serf LAN members as ``via`` (default: a live server) sees them: name -> status.

        Status 1 is alive, 3 left, 4 failed (serf's MemberStatus).
        """
        hosts = [self.agents[via].host] if via else self.servers
        last: LabError | None = None
        for h in hosts:
            try:
                return {
                    m["Name"]: int(m["Status"]) for m in api(h, "/v1/agent/members", timeout=2.0)
                }
            except LabError as e:
                last = e
        raise last or LabError("no Consul server answered")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Bounded: a leader, and *every* agent's API answering with every member alive.

        Gossip converges host by host, so one server's view is not enough: a test asking h3
        for members right after start would otherwise miss one now and then.
        """
        deadline = time.monotonic() + timeout
        want = set(self.agents)
        pending = sorted(want)
        next_rejoin = time.monotonic() + REJOIN_EVERY
        state = "no leader"
        while time.monotonic() < deadline:
            self._check_alive()
            if not self.leader():
                state = "no leader"
            else:
                pending = [n for n in pending if not self._sees_all(n, want)]
                if not pending:
                    return
                state = f"not every member alive yet as seen from {pending}"
                if time.monotonic() >= next_rejoin:
                    self._rejoin(pending)
                    next_rejoin = time.monotonic() + REJOIN_EVERY
            time.sleep(0.2)
        raise LabError(
            f"Consul not ready after {timeout:g}s ({state}); see {self.workdir}/*/consul.log"
        )

    def _rejoin(self, names: Sequence[str]) -> None:
        """Ask lagging agents to join a server again: a join is a full state exchange.

        When every agent starts at once, an agent can join just after the broadcast of
        another's arrival has died out, and then learns of it only at the next periodic
        push-pull, 30 s later.
        """
        for name in names:
            # An agent whose API is not up yet is asked again next round.
            with contextlib.suppress(LabError):
                api(self.agents[name].host, f"/v1/agent/join/{self.servers[0].ip}", method="PUT")

    def _sees_all(self, name: str, want: set[str]) -> bool:
        try:
            members = self.members(via=name)
        except LabError:
            return False  # its local API is not answering yet
        return want <= {n for n, status in members.items() if status == 1}

    def _check_alive(self) -> None:
        for name, a in self.agents.items():
            if a.process is not None and not a.process.running:
                last = tail(self.log_path(name))
                raise LabError(f"consul on {name} exited ({a.process.popen.returncode}): {last}")

    def stop(self, grace: float = 5.0, leave: bool = False) -> None:
        """Stop every agent: clients first, then servers.

        Without ``leave``, clients are killed rather than left gracefully: a client's leave waits
        seconds for its broadcast, and a throwaway lab has no one left to tell.
        """
        clients = [a.process for a in self.agents.values() if not a.server and a.process]
        servers = [a.process for a in self.agents.values() if a.server and a.process]
        try:
            netns.stop_all(clients, grace if leave else 0.0)
        finally:
            netns.stop_all(servers, grace)
