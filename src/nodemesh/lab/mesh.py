"""A whole mesh on one machine: Consul, the controller, agents and sample apps on namespace hosts.

    with Lab(LabSpec(servers=1, hosts=3, apps=(AppSpec("h2", "web"),))) as lab:
        r = lab.curl("h1", lab.app_url("h2", "web"))

Hosts: ``c1..cN`` run Consul servers; ``ctl`` runs a Consul client and the nodemesh controller;
``h1..hN`` run a Consul client, a nodemesh agent (as the ``nodemesh`` user, with CAP_NET_ADMIN
only) and the sample apps (as root, which interception does not exclude).  ``ctl`` exists even
without a controller: it is the lab's vantage point for reading agents' admin endpoints.

Start order follows the dependencies (network, Consul, CA root and join token, controller,
agents, apps) and every wait is bounded.  ``close`` undoes it in reverse: load, apps, agents
(SIGTERM: they remove their iptables rules), controller, Consul, namespaces, work directory.
Each stage runs even when an earlier one failed, and Ctrl-C is ignored while it runs, so a lab
never leaves a process or a namespace behind.
"""

from __future__ import annotations

import atexit
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from nodemesh import log
from nodemesh.identity.ca import CERT_FILE
from nodemesh.lab import configs, netns
from nodemesh.lab.consul import ConsulCluster, api, find_binary
from nodemesh.lab.netns import Host, HttpResult, LabError, Network, Process
from nodemesh.lab.sampleapp import service_definition

REPO = Path(__file__).resolve().parents[3]
NODEMESH_USER = "nodemesh"
READY_TIMEOUT = 30.0  # seconds, for each of: Consul, controller, agents, apps
POLL = 0.2  # seconds between readiness probes

_log = log.get("nodemesh.lab")


@dataclass(frozen=True)
class AppSpec:
    host: str
    name: str
    port: int = 8080
    upstreams: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabSpec:
    servers: int = 1  # Consul servers c1..cN
    hosts: int = 2  # agent hosts h1..hN
    controller: bool = True
    agents: bool = True
    apps: tuple[AppSpec, ...] = ()
    agent_config: configs.Sections = field(default_factory=dict)  # merged over the lab's
    controller_config: configs.Sections = field(default_factory=dict)
    workdir: Path | None = None  # default: a fresh temporary directory
    keep_workdir: bool = False  # keep logs and configs after close (for debugging)
    consul_binary: Path | None = None  # default: what scripts/fetch-consul prints
    # Merged over every Consul agent's JSON config (consul.agent_config), nested objects too:
    # {"connect": {"enabled": True}} for Consul's own Connect proxies.
    consul_config: Mapping[str, Any] = field(default_factory=dict)
    python: Path = Path(sys.executable)  # the venv's python; its bin/ holds `nodemesh`
    ready_timeout: float = READY_TIMEOUT


@dataclass
class Load:
    """A load generator running in a lab host; ``stats()`` reads its latest numbers."""

    process: Process
    stats_file: Path
    url: str

    def stats(self) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = json.loads(self.stats_file.read_text())
        except (OSError, ValueError):
            return None
        return out

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait (bounded) for the run to end; its final statistics."""
        try:
            self.process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            host = self.process.host.name
            raise LabError(f"load on {host} still running after {timeout:g}s") from None
        final = self.stats()
        if final is None or not final.get("done"):
            raise LabError(f"load on {self.process.host.name} ended without final statistics")
        return final


def _quiet(msg: str) -> None:
    pass


# Labs not closed yet.  A driver interrupted where no `finally` runs (a test runner stopped by
# Ctrl-C between fixtures) still exits through atexit, which closes them.
_open_labs: set[Lab] = set()


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        lab.close(quiet=True)


class Lab:
    """A started lab (use it as a context manager); hosts are named "c1", "ctl", "h1", ...

    Build: ``start``/``close`` (or ``with``).  Look: ``host``, ``host_ip``, ``exec``, ``curl``,
    ``wait_http``, ``consul_api``, ``logs``, ``log_path``, ``admin_url``, ``app_url``.
    Change: ``start_app``/``stop_app``, ``start_agent``/``stop_agent``,
    ``start_controller``/``stop_controller``, ``start_load``, and ``consul`` (a
    ``ConsulCluster``: ``stop_agent``, ``kill_agent``, ``start_agent``, ``leader``, ``members``).
    """

    def __init__(self, spec: LabSpec | None = None, progress: Callable[[str], None] = _quiet):
        self.spec = spec or LabSpec()
        self.progress = progress
        self.net = Network()
        self.dir = self.spec.workdir or Path(
            tempfile.mkdtemp(prefix=f"nodemesh-lab-{self.net.suffix}-")
        )
        self.consul: ConsulCluster | None = None
        self.controller: Process | None = None
        self.agents: dict[str, Process] = {}
        self.apps: dict[tuple[str, str], Process] = {}
        self.loads: list[Load] = []
        self.bin = self.spec.python.parent
        self.join_token_file = self.dir / "join-token"
        self.ca_state = self.dir / "ctl" / "controller-state"
        self._closed = False
        self._keep = self.spec.keep_workdir
        _open_labs.add(self)

    def __repr__(self) -> str:
        return f"<Lab {self.net.prefix} hosts={list(self.net.hosts)} dir={self.dir}>"

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            # The logs are what explains a failed start: keep them (the error names the path).
            self._keep = True
            self.close(quiet=True)
            raise
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # While an exception propagates, a teardown problem is logged, not raised over it.
        self.close(quiet=exc is not None)

    @property
    def server_names(self) -> list[str]:
        return [f"c{i}" for i in range(1, self.spec.servers + 1)]

    @property
    def agent_hosts(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.spec.hosts + 1)]

    def start(self) -> None:
        s = self.spec
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # agents run as nodemesh and read their config below it
        names = [*self.server_names, "ctl", *self.agent_hosts]
        self.progress(f"creating {len(names)} hosts ({self.net.prefix}-*) on 198.18.0.0/24")
        self.net.create()
        for name in names:
            self.net.add_host(name)
            (self.dir / name).mkdir(mode=0o755, exist_ok=True)
        binary = s.consul_binary or find_binary(REPO)
        servers = [self.host(n) for n in self.server_names]
        clients = [self.host(n) for n in ["ctl", *self.agent_hosts]]
        self.consul = ConsulCluster(binary, self.dir, servers, clients, s.consul_config)
        self.progress(f"starting consul servers ({len(servers)})")
        for h in servers:
            self.consul.start_agent(h.name)
        self.progress(f"starting consul clients ({len(clients)})")
        for h in clients:
            self.consul.start_agent(h.name)
        self.progress("waiting for a consul leader and every member")
        self.consul.wait_ready(s.ready_timeout)
        if s.controller or s.agents:
            self.progress("creating the join token and the mesh root CA")
            self._init_ca()
        if s.controller:
            self.progress("starting nodemesh controller on ctl")
            self.start_controller()
        if s.agents:
            self.progress(f"starting nodemesh agents on {' '.join(self.agent_hosts)}")
            for name in self.agent_hosts:
                self.start_agent(name, wait=False)
            self.progress("waiting for every agent to be ready")
            self.wait_agents_ready()
        for app in s.apps:
            ip = self.host_ip(app.host)
            up = f" -> {', '.join(app.upstreams)}" if app.upstreams else ""
            self.progress(f"starting {app.name} on {app.host} ({ip}:{app.port}){up}")
            self.start_app(app.host, app.name, app.port, app.upstreams, wait=False)
        self.wait_apps_passing()

    def close(self, quiet: bool = False) -> None:
        """Stop everything in reverse order; every stage runs even if one before it failed."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        # A second Ctrl-C (or a SIGTERM turned into one) must not cut teardown short.
        in_main = threading.current_thread() is threading.main_thread()
        held = (signal.SIGINT, signal.SIGTERM) if in_main else ()
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in held}
        problems: list[str] = []
        running = [ld for ld in self.loads if ld.process.running]
        stages: list[tuple[str, bool, Callable[[], None]]] = [
            ("stopping load generators", bool(running), self._stop_loads),
            (f"stopping sample apps ({len(self.apps)})", bool(self.apps), self._stop_apps),
            (
                f"stopping nodemesh agents ({len(self.agents)})",
                bool(self.agents),
                self._stop_agents,
            ),
            ("stopping nodemesh controller", self.controller is not None, self.stop_controller),
            ("stopping consul agents", self.consul is not None, self._stop_consul),
            (f"deleting namespaces {self.net.prefix}-*", True, self._delete_namespaces),
            ("removing the work directory", True, self._remove_workdir),
        ]
        try:
            for what, active, stage in stages:
                if active:
                    self.progress(what)
                try:
                    stage()
                except Exception as e:
                    problems.append(f"{what}: {e}")
                    _log.warning("lab_teardown_failed", stage=what, error=str(e))
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if problems and not quiet:
            raise LabError("lab teardown incomplete: " + "; ".join(problems))

    def _stop_loads(self) -> None:
        netns.stop_all([ld.process for ld in self.loads])

    def _stop_apps(self) -> None:
        netns.stop_all(self.apps.values())
        self.apps.clear()

    def _stop_agents(self) -> None:
        # The agent's own shutdown grace, plus a margin to remove its rules.
        netns.stop_all(self.agents.values(), grace=10.0)
        self.agents.clear()

    def _stop_consul(self) -> None:
        if self.consul is not None:
            self.consul.stop()

    def _delete_namespaces(self) -> None:
        left = self.net.teardown()
        if left:
            raise LabError(f"namespaces still present: {left}")

    def _remove_workdir(self) -> None:
        if self._keep:
            self.progress(f"logs and configs kept in {self.dir}")
        elif self.spec.workdir is None:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- hosts ----------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.net.hosts[name]
        except KeyError:
            raise LabError(f"no lab host {name!r}; hosts are {sorted(self.net.hosts)}") from None

    def host_ip(self, name: str) -> str:
        return self.host(name).ip

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        timeout: float = netns.CMD_TIMEOUT,
        check: bool = True,
        input: bytes | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return netns.run(
            self.host(host), argv, timeout=timeout, check=check, input=input, user=user
        )

    def curl(
        self,
        host: str,
        url: str,
        *,
        method: str = "GET",
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        extra: Sequence[str] = (),
    ) -> HttpResult:
        return netns.curl(
            self.host(host),
            url,
            method=method,
            data=data,
            headers=headers,
            timeout=timeout,
            extra=extra,
        )

    def wait_http(
        self, host: str, url: str, status: int = 200, timeout: float = 10.0
    ) -> HttpResult:
        """Bounded: poll ``url`` from ``host`` until it answers ``status``; the last answer.

        For the moments after a change (an app started, an agent restarted) when each side
        learns of it a little later than Consul does.
        """
        deadline = time.monotonic() + timeout
        while True:
            r = self.curl(host, url, timeout=min(5.0, timeout))
            if r.status == status or time.monotonic() >= deadline:
                break
            time.sleep(POLL)
        if r.status != status:
            raise LabError(
                f"{url} from {host} answered {r.status or r.error} after {timeout:g}s, "
                f"not {status}: {r.text[:200]}"
            )
        return r

    def consul_api(self, host: str, path: str, *, method: str = "GET", body: Any = None) -> Any:
        """Consul's HTTP API as ``host``'s local agent answers it."""
        return api(self.host(host), path, method=method, body=body)

    def log_path(self, host: str, name: str) -> Path:
        """The log of ``name`` ("consul", "agent", "controller", an app, "load-N") on ``host``."""
        return self.dir / host / f"{name}.log"

    def logs(self, host: str, name: str) -> str:
        try:
            return self.log_path(host, name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _spawn(
        self,
        host: str,
        name: str,
        argv: Sequence[str],
        *,
        user: str | None = None,
        net_admin: bool = False,
    ) -> Process:
        return netns.spawn(
            self.host(host),
            argv,
            self.log_path(host, name),
            user=user,
            name=name,
            net_admin=net_admin,
        )

    # --- CA, controller and agents ----------------------------------------------------------------

    def _init_ca(self) -> None:
        token = self.join_token_file
        token.write_text(secrets.token_urlsafe(32) + "\n")
        os.chown(token, 0, grp.getgrnam(NODEMESH_USER).gr_gid)
        token.chmod(0o640)
        self.ca_state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.exec(
            "ctl",
            [
                str(self.bin / "nodemesh"),
                "ca",
                "init",
                "--state-dir",
                str(self.ca_state),
                "--trust-domain",
                configs.TRUST_DOMAIN,
            ],
            timeout=30.0,
        )
        root = self.ca_state / CERT_FILE
        if not root.exists():
            raise LabError(f"`nodemesh ca init` left no root certificate at {root}")
        for name in self.agent_hosts:
            shutil.copyfile(root, self.dir / name / "ca.pem")
            (self.dir / name / "ca.pem").chmod(0o644)

    def start_controller(self, wait: bool = True) -> Process:
        if self.controller is not None and self.controller.running:
            raise LabError(f"the controller is already running: {self.controller!r}")
        ctl = self.host("ctl")
        path = self.dir / "ctl" / "controller.toml"
        path.write_text(
            configs.to_toml(
                configs.controller_sections(
                    node="ctl",
                    ip=ctl.ip,
                    state_dir=self.ca_state,
                    join_token_file=self.join_token_file,
                    overrides=self.spec.controller_config,
                )
            )
        )
        self.controller = self._spawn(
            "ctl", "controller", [str(self.bin / "nodemesh"), "controller", "--config", str(path)]
        )
        if wait:
            self.wait_controller_healthy()
        return self.controller

    def stop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop()

    def wait_controller_healthy(self) -> None:
        """Bounded: the controller runs and Consul has ``nodemesh-controller`` passing (agents
        look for a healthy one)."""
        deadline = time.monotonic() + self.spec.ready_timeout
        while time.monotonic() < deadline:
            self._check_running("ctl", "controller", self.controller)
            try:
                if self.consul_api("ctl", "/v1/health/service/nodemesh-controller?passing"):
                    return
            except LabError:
                pass
            time.sleep(POLL)
        raise LabError(
            f"the controller was not healthy in Consul within {self.spec.ready_timeout:g}s; "
            f"see {self.log_path('ctl', 'controller')}"
        )

    def start_agent(self, host: str, wait: bool = True) -> Process:
        running = self.agents.get(host)
        if running is not None and running.running:
            raise LabError(f"the agent on {host} is already running: {running!r}")
        h = self.host(host)
        user = pwd.getpwnam(NODEMESH_USER)
        state = self.dir / host / "agent-state"
        state.mkdir(mode=0o700, exist_ok=True)
        os.chown(state, user.pw_uid, user.pw_gid)
        path = self.dir / host / "agent.toml"
        path.write_text(
            configs.to_toml(
                configs.agent_sections(
                    node=host,
                    ip=h.ip,
                    state_dir=state,
                    proxy_uid=user.pw_uid,
                    ca_file=self.dir / host / "ca.pem",
                    join_token_file=self.join_token_file,
                    overrides=self.spec.agent_config,
                )
            )
        )
        self.agents[host] = self._spawn(
            host,
            "agent",
            [str(self.bin / "nodemesh"), "agent", "--config", str(path)],
            user=NODEMESH_USER,
            net_admin=True,
        )
        if wait:
            self.wait_agents_ready([host])
        return self.agents[host]

    def stop_agent(self, host: str, grace: float = 10.0) -> int | None:
        """SIGTERM (the agent drains and removes its rules), bounded; its exit status."""
        proc = self.agents.pop(host, None)
        return proc.stop(grace) if proc is not None else None

    def admin_url(self, host: str, path: str = "/ready") -> str:
        return f"http://{self.host_ip(host)}:{configs.ADMIN_PORT}{path}"

    def agent_ready(self, host: str) -> bool:
        return self.curl("ctl", self.admin_url(host, "/ready"), timeout=2.0).status == 200

    def wait_agents_ready(self, hosts: Sequence[str] | None = None) -> None:
        """Bounded: every agent in ``hosts`` answers 200 on /ready (read from ``ctl``)."""
        waiting = list(hosts if hosts is not None else self.agents)
        deadline = time.monotonic() + self.spec.ready_timeout
        while waiting and time.monotonic() < deadline:
            for host in list(waiting):
                self._check_running(host, "agent", self.agents.get(host))
                if self.agent_ready(host):
                    waiting.remove(host)
            if waiting:
                time.sleep(POLL)
        if waiting:
            raise LabError(
                f"agents on {waiting} not ready within {self.spec.ready_timeout:g}s; "
                f"see {self.log_path(waiting[0], 'agent')}"
            )

    def _check_running(self, host: str, name: str, proc: Process | None) -> None:
        if proc is None:
            raise LabError(f"{name} on {host} was never started")
        if not proc.running:
            raise LabError(
                f"{name} on {host} exited with status {proc.popen.returncode}: "
                f"{netns.tail(proc.log_path)}"
            )

    # --- sample apps ----------------------------------------------------------------------------

    def app_url(self, host: str, name: str, path: str = "/") -> str:
        proc = self.apps.get((host, name))
        port = _arg(proc.argv, "--listen").rpartition(":")[2] if proc else "8080"
        return f"http://{self.host_ip(host)}:{port}{path}"

    def start_app(
        self,
        host: str,
        name: str,
        port: int = 8080,
        upstreams: Sequence[str] = (),
        wait: bool = True,
    ) -> Process:
        """Start the sample app ``name`` on ``host`` (as root); with ``wait``, until it is
        registered and its Consul check passes."""
        if (host, name) in self.apps and self.apps[host, name].running:
            raise LabError(f"{name} is already running on {host}")
        ip = self.host_ip(host)
        argv = [
            str(self.spec.python),
            "-m",
            "nodemesh.lab.sampleapp",
            "--name",
            name,
            "--listen",
            f"{ip}:{port}",
            "--host",
            host,
        ]
        for u in upstreams:
            argv += ["--upstream", u]
        self.apps[host, name] = self._spawn(host, name, argv)
        if wait:
            self.wait_apps_passing([(host, name)])
        return self.apps[host, name]

    def stop_app(self, host: str, name: str, grace: float = 5.0) -> None:
        """SIGTERM: the app deregisters from Consul and exits."""
        proc = self.apps.pop((host, name), None)
        if proc is None:
            raise LabError(f"no app {name} running on {host}")
        proc.stop(grace)

    def wait_apps_passing(self, which: Sequence[tuple[str, str]] | None = None) -> None:
        """Bounded: each app's instance is in the catalog with every check passing."""
        waiting = list(which if which is not None else self.apps)
        deadline = time.monotonic() + self.spec.ready_timeout
        while waiting and time.monotonic() < deadline:
            for host, name in list(waiting):
                proc = self.apps.get((host, name))
                self._check_running(host, name, proc)
                assert proc is not None
                port = int(_arg(proc.argv, "--listen").rpartition(":")[2])
                sid = service_definition(name, host, (self.host_ip(host), port))["ID"]
                if sid in self._passing(host, name):
                    waiting.remove((host, name))
            if waiting:
                time.sleep(POLL)
        if waiting:
            raise LabError(
                f"apps {waiting} not passing in Consul within {self.spec.ready_timeout:g}s; "
                f"see {self.log_path(*waiting[0])}"
            )

    def _passing(self, host: str, service: str) -> set[str]:
        """IDs of ``service``'s passing instances as the servers' catalog has them (what any
        client sees), not merely the local agent's view, which is synced to it asynchronously."""
        try:
            entries = self.consul_api(host, f"/v1/health/service/{service}?passing")
        except LabError:
            return set()
        return {e["Service"]["ID"] for e in entries or []}

    # --- load -----------------------------------------------------------------------------------

    def start_load(
        self,
        host: str,
        url: str,
        *,
        count: int | None = None,
        duration: float | None = None,
        rate: float = 0.0,
        concurrency: int = 1,
        timeout: float = 5.0,
    ) -> Load:
        if not count and not duration:
            raise LabError("start_load needs count and/or duration: load must be bounded")
        n = len(self.loads) + 1
        stats = self.dir / host / f"load-{n}.json"
        argv = [
            str(self.spec.python),
            "-m",
            "nodemesh.lab.load",
            url,
            "--rate",
            str(rate),
            "--concurrency",
            str(concurrency),
            "--timeout",
            str(timeout),
            "--stats-file",
            str(stats),
        ]
        if count:
            argv += ["--count", str(count)]
        if duration:
            argv += ["--duration", str(duration)]
        load = Load(self._spawn(host, f"load-{n}", argv), stats, url)
        self.loads.append(load)
        return load


def _arg(argv: Sequence[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]
