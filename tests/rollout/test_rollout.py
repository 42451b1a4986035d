"""The real rollout: ansible over ssh into systemd containers, with a real Consul cluster.

    ctl ── ansible-playbook ── ssh ──> vm1  consul client, nodemesh-controller, agent
                                       vm2  consul client, agent; the load generator calls web
                                       vm3  consul client, agent, web
                                       vm4  consul client, agent, web
    c1 c2 c3: Consul servers (as the lab runs them)

The tests run in order and build on each other, as an operator's day does: install
(site.yml), run it again (nothing changes), send traffic across hosts through the mesh, roll a
new build out under steady load (upgrade.yml), and remove everything (uninstall.yml).  A later
test skips when an earlier one left nothing to build on.

The sample apps and the load generator are the lab's (``nodemesh.lab.sampleapp``, ``.load``),
run from the test's virtualenv inside the VMs' network namespaces: to the network and to the
VMs' iptables they are processes on those hosts, and they stay out of the trees the playbooks
install and remove.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodemesh.lab import netns
from nodemesh.lab.mesh import Load
from nodemesh.lab.netns import LabError, Process
from tests.rollout.vms import UPGRADE_LABEL, VM, AnsibleRun, Fleet, FleetSpec, RolloutInputs

pytestmark = pytest.mark.rollout

CONTROLLER = "vm1"
CLIENT = "vm2"
WEB = ("vm3", "vm4")
VMS = (CONTROLLER, CLIENT, *WEB)
WEB_PORT = 8080
TRUST = "spiffe://nodemesh.local/dc/dc1"
ADMIN = "http://127.0.0.1:4191"
CONSUL = "http://127.0.0.1:8500"
BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
WAIT = 30.0  # seconds for any convergence: an app in the catalog, a route through the mesh
LOAD_RATE = 40.0  # requests per second during the upgrade: steady, well below capacity

# Gossip timers as the lab's servers use them, so the clients join and converge in seconds.
CONSUL_CLIENT_CONFIG = {
    "disable_host_node_id": True,
    "retry_interval": "1s",
    "check_update_interval": "0s",
    "gossip_lan": {
        "gossip_interval": "100ms",
        "probe_interval": "500ms",
        "probe_timeout": "250ms",
        "suspicion_mult": 3,
    },
    "ports": {"grpc": -1},
}
# A short drain keeps the test quick; production keeps 120 s.
AGENT_CONFIG = {"shutdown": {"grace": "5s"}, "telemetry": {"interval": "2s"}}


@dataclass
class Rollout:
    """The fleet, its inventory, and what the tests started on it."""

    fleet: Fleet
    inputs: RolloutInputs
    inventory: Path
    apps: dict[str, Process] = field(default_factory=dict)
    loads: list[Load] = field(default_factory=list)
    baseline_rules: dict[str, list[str]] = field(default_factory=dict)  # before any install
    baseline_files: dict[str, list[str]] = field(default_factory=dict)
    installed: bool = False
    removed: bool = False

    def vm(self, name: str) -> VM:
        return self.fleet.vm(name)

    def play(self, playbook: str, **extra: Any) -> AnsibleRun:
        run = self.fleet.ansible(playbook, self.inventory, extra)
        assert run.returncode == 0, run.summary()
        bad = {h: r for h, r in run.recap.items() if r["failed"] or r["unreachable"]}
        assert not bad, f"{playbook}: hosts failed: {bad}\n{run.summary()}"
        return run

    def require_installed(self) -> None:
        if not self.installed or self.removed:
            pytest.skip("needs the fleet installed by test_site_installs_and_starts_everything")

    def curl(self, vm: str, url: str, timeout: float = 5.0) -> netns.HttpResult:
        return netns.curl(self.vm(vm).host, url, timeout=timeout)

    def consul(self, vm: str, path: str) -> Any:
        r = self.curl(vm, CONSUL + path)
        if r.status != 200:
            raise LabError(f"consul on {vm}: GET {path} -> {r.status or r.error} {r.text[:200]}")
        return r.json()

    def web_url(self, vm: str, path: str = "/") -> str:
        return f"http://{self.vm(vm).ip}:{WEB_PORT}{path}"

    def rules(self, vm: str) -> list[str]:
        """The VM's rules and chains in every table: what iptables-save shows, less counters,
        comments, and built-in chains still at their ACCEPT policy (an empty table left behind
        holds no rule)."""
        out = netns.run(self.vm(vm).host, ["iptables-save"]).stdout.decode()
        kept = []
        for line in out.splitlines():
            line = line.split(" [")[0]
            if (
                line.startswith(("-A", "-I"))
                or (line.startswith(":") and line.split()[0][1:] not in BUILTIN_CHAINS)
                or (line.startswith(":") and line.split()[1] != "ACCEPT")
            ):
                kept.append(line)
        return kept

    def named_files(self, vm: str) -> list[str]:
        """Every path on the VM's disk or in /run whose name mentions nodemesh or consul."""
        argv = [
            "find",
            "/",
            "/run",
            "-xdev",
            "(",
            "-iname",
            "*nodemesh*",
            "-o",
            "-iname",
            "*consul*",
            ")",
        ]
        return sorted(self.vm(vm).exec(argv, check=False, timeout=30.0).stdout.split())

    def stop_apps(self) -> None:
        netns.stop_all([ld.process for ld in self.loads if ld.process.running])
        netns.stop_all(self.apps.values())
        self.apps.clear()


def _inventory(fleet: Fleet, inputs: RolloutInputs) -> dict[str, Any]:
    return {
        "all": {
            "hosts": fleet.host_vars(),
            "vars": {
                "ansible_user": "root",
                "ansible_python_interpreter": "/usr/bin/python3",
                "nodemesh_wheelhouse": str(inputs.wheelhouse),
                "consul_client_binary_src": str(inputs.consul_binary),
                "consul_client_retry_join": fleet.consul_server_ips,
                "consul_client_config": CONSUL_CLIENT_CONFIG,
                "nodemesh_agent_config": AGENT_CONFIG,
                "nodemesh_agent_drain_wait": 1,
            },
            "children": {
                "nodemesh_controllers": {"hosts": {CONTROLLER: {}}},
                "nodemesh_agents": {"hosts": {name: {} for name in VMS}},
                "consul_clients": {"children": {"nodemesh_controllers": {}, "nodemesh_agents": {}}},
            },
        }
    }


@pytest.fixture(scope="module")
def rollout(rollout_inputs: RolloutInputs, request: pytest.FixtureRequest) -> Iterator[Rollout]:
    failed_before = request.session.testsfailed
    workdir = Path(tempfile.mkdtemp(prefix="nodemesh-rollout-"))
    workdir.chmod(0o755)
    spec = FleetSpec(rollout_inputs.rootfs, rollout_inputs.consul_binary, vms=VMS)
    fleet = Fleet(spec, workdir)
    state = Rollout(fleet, rollout_inputs, workdir / "inventory.yml")
    try:
        fleet.start()
        fleet.write_inventory(_inventory(fleet, rollout_inputs))
        state.baseline_rules = {name: state.rules(name) for name in VMS}
        state.baseline_files = {name: state.named_files(name) for name in VMS}
        yield state
    finally:
        state.stop_apps()
        problems = fleet.close()
        keep = os.environ.get("NODEMESH_LAB_KEEP", "") not in ("", "0")
        if keep or problems or request.session.testsfailed > failed_before:
            print(f"\n==> rollout logs (ansible, consoles, apps) kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if problems:
            pytest.fail("rollout teardown incomplete: " + "; ".join(problems))


def _active(vm: VM, unit: str) -> str:
    return vm.exec(["systemctl", "is-active", unit], check=False).stdout.strip()


def _main_pid_uid(vm: VM, unit: str) -> int:
    pid = vm.exec(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    status = vm.exec(["cat", f"/proc/{pid}/status"]).stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(uid_line.split()[1])


# --- install ------------------------------------------------------------------------------------


def test_site_installs_and_starts_everything(rollout: Rollout) -> None:
    started = time.monotonic()
    run = rollout.play("site.yml")
    took = time.monotonic() - started
    assert set(run.recap) == set(VMS), run.summary()
    for name in VMS:
        vm = rollout.vm(name)
        # What an operator types first: the agent is active, and so is its interception.
        status = vm.exec(["systemctl", "status", "--no-pager", "nodemesh"], check=False)
        assert status.returncode == 0, f"{name}: systemctl status nodemesh:\n{status.stdout}"
        for unit in ("nodemesh.socket", "nodemesh-iptables.service", "consul.service"):
            assert _active(vm, unit) == "active", f"{name}: {unit} is {_active(vm, unit)}"
        nodemesh_uid = int(vm.exec(["id", "-u", "nodemesh"]).stdout)
        assert _main_pid_uid(vm, "nodemesh.service") == nodemesh_uid
        assert rollout.curl(name, ADMIN + "/ready").status == 200
        rules = netns.run(vm.host, ["iptables-save", "-t", "nat"]).stdout.decode()
        assert "-A OUTPUT -p tcp" in rules and "-j NODEMESH_OUTPUT" in rules, rules
    ctl = rollout.vm(CONTROLLER)
    assert _active(ctl, "nodemesh-controller.service") == "active"
    assert _main_pid_uid(ctl, "nodemesh-controller.service") == int(
        ctl.exec(["id", "-u", "nodemesh-controller"]).stdout
    )
    # Every agent registered itself in Consul, healthy, as the build that was installed.
    agents = rollout.consul(CLIENT, "/v1/health/service/nodemesh?passing")
    assert sorted(e["Node"]["Node"] for e in agents) == sorted(VMS)
    rollout.installed = True
    print(f"\n==> site.yml: {took:.1f}s")


def test_second_run_changes_nothing(rollout: Rollout) -> None:
    rollout.require_installed()
    run = rollout.play("site.yml")
    changed = {h: r["changed"] for h, r in run.recap.items() if r["changed"]}
    assert not changed, f"a second site.yml run changed {changed}: {run.changed_tasks}"


# --- traffic ------------------------------------------------------------------------------------


def _start_web(rollout: Rollout) -> None:
    for name in WEB:
        if name in rollout.apps and rollout.apps[name].running:
            continue
        vm = rollout.vm(name)
        argv = [
            sys.executable,
            "-m",
            "nodemesh.lab.sampleapp",
            "--name",
            "web",
            "--listen",
            f"{vm.ip}:{WEB_PORT}",
            "--host",
            name,
        ]
        log = rollout.fleet.dir / name / "web.log"
        rollout.apps[name] = netns.spawn(vm.host, argv, log, name="web")
    deadline = time.monotonic() + WAIT
    nodes: list[str] = []
    while time.monotonic() < deadline:
        for name, proc in rollout.apps.items():
            if not proc.running:
                raise LabError(f"web on {name} exited: {netns.tail(proc.log_path)}")
        nodes = sorted(
            e["Node"]["Node"] for e in rollout.consul(CLIENT, "/v1/health/service/web?passing")
        )
        if nodes == sorted(WEB):
            return
        time.sleep(0.2)
    raise LabError(f"web passing in Consul only on {nodes} after {WAIT:g}s, not on {list(WEB)}")


def _wait_meshed(rollout: Rollout, url: str) -> dict[str, Any]:
    """Bounded: a call from the client host comes back through the mesh (the server side's
    agent vouches for the caller's identity); the app's view of that call."""
    deadline = time.monotonic() + WAIT
    last = ""
    while time.monotonic() < deadline:
        r = rollout.curl(CLIENT, url)
        if r.status == 200:
            seen: dict[str, Any] = r.json()
            if "x-nodemesh-client-id" in seen.get("headers", {}):
                return seen
            last = f"200 without the mesh: {seen.get('headers')}"
        else:
            last = f"{r.status or r.error}: {r.text[:200]}"
        time.sleep(0.2)
    raise LabError(f"{url} from {CLIENT} not through the mesh within {WAIT:g}s: {last}")


def test_traffic_crosses_hosts_through_the_mesh_with_mtls(rollout: Rollout) -> None:
    rollout.require_installed()
    _start_web(rollout)
    served_by: set[str] = set()
    for _ in range(20):
        seen = _wait_meshed(rollout, rollout.web_url(WEB[0]))
        # The server-side agent verified the caller's certificate (mTLS) and names it: the
        # client host runs no service, so its node identity.
        assert seen["headers"]["x-nodemesh-client-id"] == f"{TRUST}/node/{CLIENT}"
        # The app was called by its own host's agent, never by the client host directly, and
        # the client's agent balanced over both instances although the app named one.
        client_ip = seen["client"].rsplit(":", 1)[0]
        assert client_ip in {rollout.vm(w).ip for w in WEB}
        served_by.add(seen["host"])
        if served_by == set(WEB):
            break
    assert served_by == set(WEB)
    # The mesh hop is TLS on the inbound port: the client host holds connections to 4143.
    ss = netns.run(
        rollout.vm(CLIENT).host, ["ss", "-Htn", "state", "established", "( dport = :4143 )"]
    )
    assert ss.stdout.strip(), "no connection from the client host to any agent's inbound port"


# --- upgrade ------------------------------------------------------------------------------------


def _versions(rollout: Rollout) -> dict[str, str]:
    """The version each running agent registered in Consul (from its own process)."""
    entries = rollout.consul(CLIENT, "/v1/catalog/service/nodemesh")
    return {e["Node"]: e["ServiceMeta"].get("version", "") for e in entries}


def test_rolling_upgrade_under_steady_load_fails_no_request(rollout: Rollout) -> None:
    rollout.require_installed()
    _start_web(rollout)
    url = rollout.web_url(WEB[0])
    _wait_meshed(rollout, url)
    before = _versions(rollout)
    assert all(UPGRADE_LABEL not in v for v in before.values()), before

    client = rollout.vm(CLIENT)
    stats = rollout.fleet.dir / CLIENT / "load.json"
    argv = [
        sys.executable, "-m", "nodemesh.lab.load", url,
        "--rate", str(LOAD_RATE), "--concurrency", "4", "--timeout", "5",
        "--duration", "600", "--stats-file", str(stats),
    ]  # fmt: skip
    load = Load(netns.spawn(client.host, argv, rollout.fleet.dir / CLIENT / "load.log"), stats, url)
    rollout.loads.append(load)
    deadline = time.monotonic() + WAIT
    while (load.stats() or {}).get("ok", 0) < LOAD_RATE and time.monotonic() < deadline:
        time.sleep(0.2)
    warm = load.stats() or {}
    assert warm.get("ok", 0) >= LOAD_RATE, f"the load never got going: {warm}"

    started = time.monotonic()
    run = rollout.play("upgrade.yml", nodemesh_wheelhouse=str(rollout.inputs.wheelhouse_next))
    took = time.monotonic() - started
    time.sleep(2.0)  # the load keeps going a moment on the upgraded fleet
    load.process.terminate()
    final = load.wait(timeout=15.0)

    print(f"\n==> upgrade.yml: {took:.1f}s under load: {json.dumps(final)}")
    # One host at a time: a batch (a play header) per agent host, in inventory order.
    batches = run.output.count("PLAY [Upgrade nodemesh agents, one host at a time]")
    assert batches == len(VMS), run.summary()
    after = _versions(rollout)
    assert sorted(after) == sorted(VMS), after
    assert all(v.endswith(f"+{UPGRADE_LABEL}") for v in after.values()), after
    for name in VMS:
        assert _active(rollout.vm(name), "nodemesh.service") == "active"
    expected = LOAD_RATE * took * 0.8
    assert final["sent"] >= expected, f"the load stalled during the upgrade: {final}"
    # Zero: the hosts called were drained through Consul first, and the caller's agent hands
    # its sockets to the next process (the load client retries as RFC 9112 9.3.1 allows).
    assert final["failed"] == 0, f"requests failed during the rolling upgrade: {final['statuses']}"


# --- uninstall ----------------------------------------------------------------------------------

LEFTOVER_PATHS = (
    "/etc/nodemesh",
    "/var/lib/nodemesh",
    "/var/lib/nodemesh-controller",
    "/opt/nodemesh",
    "/usr/local/bin/nodemesh",
    "/etc/systemd/system/nodemesh.service",
    "/etc/systemd/system/nodemesh.socket",
    "/etc/systemd/system/nodemesh-iptables.service",
    "/etc/systemd/system/nodemesh-controller.service",
    "/etc/consul.d",
    "/var/lib/consul",
    "/usr/local/bin/consul",
    "/etc/systemd/system/consul.service",
)


def test_uninstall_leaves_nothing_behind(rollout: Rollout) -> None:
    rollout.require_installed()
    rollout.stop_apps()
    rollout.removed = True
    rollout.play("uninstall.yml", nodemesh_uninstall_confirm="yes", consul_client_uninstall=True)
    for name in VMS:
        vm = rollout.vm(name)
        rules = rollout.rules(name)
        assert "NODEMESH" not in "\n".join(rules).upper(), f"{name} still has rules: {rules}"
        assert rules == rollout.baseline_rules[name], f"{name}: the ruleset is not as before"
        for user in ("nodemesh", "nodemesh-controller", "consul"):
            for db in ("passwd", "group"):
                got = vm.exec(["getent", db, user], check=False)
                assert got.returncode == 2, f"{name}: {db} still has {got.stdout.strip()}"
        present = [
            p for p in LEFTOVER_PATHS if vm.exec(["test", "-e", p], check=False).returncode == 0
        ]
        assert not present, f"{name} still has {present}"
        # Nothing else by those names anywhere on the VM's disk or in /run (the image's own
        # test files aside: the baseline was taken before the first install).
        assert rollout.named_files(name) == rollout.baseline_files[name], name
        units = vm.exec(
            ["systemctl", "list-units", "--all", "--plain", "--no-legend", "nodemesh*", "consul*"]
        ).stdout.strip()
        assert not units, f"{name}: systemd still knows {units}"
        procs = vm.exec(["ps", "-eo", "user:20,args"]).stdout
        assert "nodemesh" not in procs and "consul" not in procs, f"{name}:\n{procs}"
