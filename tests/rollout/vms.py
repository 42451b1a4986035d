"""systemd "VMs" for the rollout tests: containers booted with systemd-nspawn on lab hosts.

    with Fleet(FleetSpec(rootfs, consul_binary, vms=("vm1", "vm2")), workdir) as fleet:
        run = fleet.ansible("site.yml", inventory)
        fleet.vm("vm1").exec(["systemctl", "is-active", "nodemesh"])

Theory of operation.  The network is the lab's (``nodemesh.lab.netns``): a switch namespace
with a bridge and one namespace per host on 198.18.0.0/24.  ``c1..cN`` run the Consul servers
exactly as the lab runs them (``nodemesh.lab.consul``); ``ctl`` is the control machine, where
``ansible-playbook`` itself runs (``ip netns exec``), because the test process stays in the
root namespace and must not touch its routes or links; each VM is a namespace host in which
``systemd-nspawn -b`` boots a real systemd.

All VMs share one read-only Debian tree (``scripts/rootfs``) through ``--volatile=overlay``:
each gets a tmpfs upper layer that vanishes when it stops, so every run starts from a freshly
installed machine.  sshd inside accepts a key generated for this run only, bound read-only
over ``/root/.ssh/authorized_keys``.  ``--register=no --keep-unit`` because the host has no
systemd or D-Bus; CAP_NET_ADMIN so the agent's iptables step works in the VM's namespace.

Machine names carry the network's per-run suffix (nspawn keeps per-machine state under /run by
that name) while the hostname inside is the short inventory name, which is also the Consul
node name.  Stopping is by pid: SIGTERM makes nspawn power the container off cleanly; after a
bounded wait, SIGKILL; then the namespaces go, which kills anything left inside them.  Every
command has a timeout and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from nodemesh.lab import netns
from nodemesh.lab.consul import ConsulCluster
from nodemesh.lab.netns import Host, LabError, Network, Process

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
BOOT_TIMEOUT = 60.0  # seconds; a container boots here in well under 2 s
STOP_GRACE = 15.0  # seconds for a clean poweroff (the agent drains within shutdown.grace)
ANSIBLE_TIMEOUT = 300.0  # seconds for one playbook run; a full rollout takes well under a minute
POLL = 0.2
_RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


NEEDED = ("ip", "systemd-nspawn", "nsenter", "ssh", "ssh-keygen", "curl", "debootstrap")
UPGRADE_LABEL = "rolloutnext"  # the local version of the build the upgrade test rolls out


@dataclass(frozen=True)
class RolloutInputs:
    rootfs: Path
    consul_binary: Path
    wheelhouse: Path  # the tree as it is
    wheelhouse_next: Path  # the same tree as version <version>+rolloutnext


def unmet() -> str:
    if os.geteuid() != 0:
        return "rollout tests need root (containers, network namespaces); run scripts/test as root"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return f"rollout tests need {', '.join(missing)}; run scripts/bootstrap as root"
    venv_bin = REPO / ".venv" / "bin"
    if not (venv_bin / "ansible-playbook").exists():
        return f"no ansible-playbook in {venv_bin}; run scripts/bootstrap (the test extra has it)"
    return ""


@dataclass(frozen=True)
class FleetSpec:
    rootfs: Path  # what scripts/rootfs printed
    consul_binary: Path  # what scripts/fetch-consul printed
    vms: tuple[str, ...] = ("vm1", "vm2", "vm3")
    consul_servers: int = 3
    python: Path = REPO / ".venv" / "bin" / "python"  # its bin/ holds ansible-playbook


@dataclass
class VM:
    """One booted container: ``host`` is its lab host (namespace and address)."""

    name: str
    host: Host
    process: Process  # systemd-nspawn

    def __repr__(self) -> str:
        state = "running" if self.process.running else "stopped"
        return f"<VM {self.name} {self.host.ip} nspawn={self.process.pid} {state}>"

    @property
    def ip(self) -> str:
        return self.host.ip

    def init_pid(self) -> int:
        """The container's PID 1 (systemd), as the host numbers it: nspawn's only child."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids = [int(p) for p in children.read_text().split()]
        except (OSError, ValueError):
            pids = []
        if not pids:
            raise LabError(f"{self.name}: systemd-nspawn has no child; see {self.process.log_path}")
        return pids[0]

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float = netns.CMD_TIMEOUT,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the VM (all its namespaces), as root, to completion."""
        full = ["nsenter", "-t", str(self.init_pid()), "-a", "--", *argv]
        try:
            p = subprocess.run(
                full,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LabError(
                f"{self.name}: `{' '.join(argv)}` took longer than {timeout:g}s"
            ) from None
        if check and p.returncode != 0:
            raise LabError(
                f"{self.name}: `{' '.join(argv)}` exited {p.returncode}: {p.stderr.strip()}"
            )
        return p

    def wait_booted(self, deadline: float) -> None:
        """Bounded: systemd inside has finished booting (running or degraded)."""
        state = "not started"
        while time.monotonic() < deadline:
            if not self.process.running:
                raise LabError(
                    f"{self.name}: systemd-nspawn exited: {netns.tail(self.process.log_path)}"
                )
            with contextlib.suppress(LabError):
                p = self.exec(["systemctl", "is-system-running"], check=False, timeout=5.0)
                state = p.stdout.strip() or p.stderr.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(POLL)
        raise LabError(f"{self.name}: not booted within the deadline (state: {state})")


@dataclass(frozen=True)
class AnsibleRun:
    playbook: str
    returncode: int
    output: str
    log_path: Path
    recap: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def changed_tasks(self) -> list[str]:
        """``TASK [name] host`` for every change the run reported (for error messages)."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed: ["):
                out.append(f"{task} {line.split('[', 1)[1].split(']', 1)[0]}")
        return out

    def summary(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return f"{self.playbook} exited {self.returncode} (log {self.log_path}):\n{tail}"


class Fleet:
    """The network, the Consul servers, the control host and the booted VMs."""

    def __init__(self, spec: FleetSpec, workdir: Path) -> None:
        self.spec = spec
        self.dir = workdir
        self.net = Network(prefix="nmr")
        self.consul: ConsulCluster | None = None
        self.vms: dict[str, VM] = {}
        self.key = self.dir / "id_ed25519"
        self._runs = 0

    def __repr__(self) -> str:
        return f"<Fleet {self.net.prefix} vms={list(self.vms)}>"

    def __enter__(self) -> Fleet:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- build and tear down -----------------------------------------------------------------

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._keygen()
        self.net.create()
        servers = [self.net.add_host(f"c{i}") for i in range(1, self.spec.consul_servers + 1)]
        self.net.add_host("ctl")
        self.consul = ConsulCluster(self.spec.consul_binary, self.dir, servers, [])
        for s in servers:
            self.consul.start_agent(s.name)
        for name in self.spec.vms:
            self.vms[name] = self._boot(self.net.add_host(name))
        deadline = time.monotonic() + BOOT_TIMEOUT
        self.consul.wait_ready()
        for vm in self.vms.values():
            vm.wait_booted(deadline)
        for vm in self.vms.values():
            self._wait_ssh(vm, deadline)

    def close(self) -> list[str]:
        """Stop the VMs and Consul, delete the namespaces; every step runs. Returns problems."""
        problems: list[str] = []
        procs = [vm.process for vm in self.vms.values()]
        try:
            netns.stop_all(procs, grace=STOP_GRACE)
        except LabError as e:
            problems.append(str(e))
        if self.consul is not None:
            try:
                self.consul.stop()
            except LabError as e:
                problems.append(str(e))
        left = self.net.teardown()
        if left:
            problems.append(f"namespaces still present: {left}")
        return problems

    def _keygen(self) -> None:
        if not self.key.exists():
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "nodemesh-rollout",
                    "-f",
                    str(self.key),
                ],
                check=True,
                timeout=30,
                capture_output=True,
            )

    def _boot(self, host: Host) -> VM:
        machine = f"{self.net.prefix}-{host.name}"
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.spec.rootfs}",
            "--boot",
            f"--machine={machine}",
            f"--hostname={host.name}",
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path=/run/netns/{host.netns}",
            "--capability=CAP_NET_ADMIN,CAP_NET_RAW",
            "--volatile=overlay",
            "--console=passive",
            f"--bind-ro={self.key}.pub:/root/.ssh/authorized_keys",
        ]
        log_path = self.dir / host.name / "console.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            # Not through `ip netns exec`: nspawn joins the namespace itself, and must see the
            # host's own mounts.  A session of its own, so the group can be killed by pid.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return VM(host.name, host, Process("nspawn", host, argv, log_path, popen))

    def _wait_ssh(self, vm: VM, deadline: float) -> None:
        """Bounded: the control host logs in to ``vm`` with the run's key."""
        last = ""
        while time.monotonic() < deadline:
            p = netns.run(
                self.control,
                ["ssh", *self.ssh_options(), f"root@{vm.ip}", "true"],
                check=False,
                timeout=10.0,
            )
            if p.returncode == 0:
                return
            last = p.stderr.decode(errors="replace").strip()
            time.sleep(POLL)
        raise LabError(f"{vm.name}: no ssh login from the control host before the deadline: {last}")

    # --- looking ---------------------------------------------------------------------------

    @property
    def control(self) -> Host:
        return self.net.hosts["ctl"]

    def vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            raise LabError(f"no VM {name!r}; VMs are {sorted(self.vms)}") from None

    @property
    def consul_server_ips(self) -> list[str]:
        assert self.consul is not None
        return [s.ip for s in self.consul.servers]

    def ssh_options(self) -> list[str]:
        return [
            "-i", str(self.key),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=5",
        ]  # fmt: skip

    # --- ansible ---------------------------------------------------------------------------

    def write_inventory(self, inventory: Mapping[str, Any]) -> Path:
        """Write ``inventory`` (JSON is YAML) with every VM's address and the run's ssh key."""
        path = self.dir / "inventory.yml"
        path.write_text(json.dumps(inventory, indent=2) + "\n")
        return path

    def host_vars(self) -> dict[str, dict[str, str]]:
        return {name: {"ansible_host": vm.ip} for name, vm in self.vms.items()}

    def ansible(
        self,
        playbook: str,
        inventory: Path,
        extra_vars: Mapping[str, Any] | None = None,
        *,
        timeout: float = ANSIBLE_TIMEOUT,
    ) -> AnsibleRun:
        """Run ``ansible/<playbook>`` from the control host, bounded; its output and recap."""
        self._runs += 1
        log_path = self.dir / f"ansible-{self._runs}-{Path(playbook).stem}.log"
        bin_dir = self.spec.python.parent
        argv = [
            str(bin_dir / "ansible-playbook"),
            "-i", str(inventory),
            str(ANSIBLE_DIR / playbook),
            "-e", f"ansible_ssh_private_key_file={self.key}",
        ]  # fmt: skip
        if extra_vars:
            argv += ["-e", json.dumps(dict(extra_vars))]
        home = self.dir / "ansible-home"
        env = {
            "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            # The same output with a timestamp per line: where a slow run spent its time.
            "ANSIBLE_LOG_PATH": str(log_path.with_suffix(".timed.log")),
            "ANSIBLE_FORCE_COLOR": "0",
            # A short-lived master connection per host: fast, and gone soon after the run.
            "ANSIBLE_SSH_ARGS": " ".join(
                [
                    "-o ControlMaster=auto",
                    "-o ControlPersist=120s",
                    "-o UserKnownHostsFile=/dev/null",
                    "-o StrictHostKeyChecking=no",
                    "-o LogLevel=ERROR",
                    # A stalled session fails the task in ~15 s instead of hanging the run.
                    "-o ServerAliveInterval=5",
                    "-o ServerAliveCountMax=3",
                ]
            ),
        }
        full = netns.netns_argv(self.control, argv)
        started = time.monotonic()
        try:
            p = subprocess.run(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=ANSIBLE_DIR,
                timeout=timeout,
                check=False,
            )
            output, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout
            output = (out.decode(errors="replace") if isinstance(out, bytes) else out or "") + (
                f"\n(killed after {timeout:g}s)"
            )
            rc = -1
        elapsed = time.monotonic() - started
        log_path.write_text(f"$ {' '.join(argv)}\n{output}\n(took {elapsed:.1f}s)\n")
        recap = {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in _RECAP.finditer(output)
        }
        return AnsibleRun(playbook, rc, output, log_path, recap)
