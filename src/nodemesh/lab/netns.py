"""Lab hosts as network namespaces on one bridge, and the processes that run in them.

Theory of operation.  A "switch" namespace holds a Linux bridge ``br0``.  Each host is its own
namespace, joined to the switch by a veth pair created directly between the two namespaces
(``ip -n SW link add h1 type veth peer name eth0 netns HOST``), so no interface ever exists in
the machine's own (root) namespace, even for a moment.  Hosts get 198.18.0.2, .3, ... on
``eth0`` (198.18.0.0/15 is the benchmarking range, RFC 2544) and no default route, so a lab
process can reach only loopback and the other lab hosts.  Every namespace name carries a
per-run suffix (``nm-1a2b3c-h1``): parallel and leftover runs never collide, and teardown
deletes exactly the names it created.

Processes are started with ``ip netns exec`` (which execs in place, so the pid we hold is the
program itself) in a new session, so Ctrl-C in the terminal reaches only the lab's driver,
which then stops them in order.  Stopping is by pid: SIGTERM, a bounded wait, then SIGKILL to
the process group the session created.  Every subprocess call has a timeout and every wait loop
is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nodemesh.errors import NodemeshError

SUBNET = ipaddress.ip_network("198.18.0.0/24")
FIRST_HOST = 2  # .1 is left free, as a gateway would have it
BRIDGE = "br0"
CMD_TIMEOUT = 10.0  # seconds; any single `ip`/`curl` call that takes longer is wedged
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,14}$")  # also the veth name in the switch: <= 15


class LabError(NodemeshError):
    """The lab could not be built, a lab command failed, or a lab wait timed out."""


@dataclass(frozen=True)
class Host:
    name: str  # the lab's name for it, also its Consul node name: "h1"
    netns: str  # the namespace: "nm-1a2b3c-h1"
    ip: str  # its address on the lab bridge: "198.18.0.3"


def new_suffix() -> str:
    return secrets.token_hex(3)


def _ip(argv: Sequence[str], timeout: float = CMD_TIMEOUT) -> str:
    """Run an ``ip`` command in the root namespace's view; it never changes the root's links."""
    return _check(["ip", *argv], timeout)


def _check(argv: Sequence[str], timeout: float) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        msg = f"`{' '.join(argv)}` took longer than {timeout:g}s; is the machine overloaded?"
        raise LabError(msg) from None
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: not installed; run scripts/bootstrap as root") from None
    if p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


class Network:
    """A switch namespace with a bridge, and host namespaces plugged into it.

    ``add_host`` may be called at any time; ``teardown`` deletes every namespace this object
    created (which also deletes their veths) and is safe to call twice.
    """

    def __init__(self, suffix: str | None = None, prefix: str = "nm") -> None:
        self.suffix = suffix or new_suffix()
        self.prefix = f"{prefix}-{self.suffix}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._created: list[str] = []
        self._next = FIRST_HOST

    def __repr__(self) -> str:
        return f"<Network {self.prefix} hosts={list(self.hosts)}>"

    @property
    def namespaces(self) -> list[str]:
        return list(self._created)

    def _add_netns(self, name: str) -> None:
        if name in list_netns():
            raise LabError(f"namespace {name} already exists; pick another suffix")
        _ip(["netns", "add", name])
        self._created.append(name)
        _ip(["-n", name, "link", "set", "lo", "up"])

    def create(self) -> None:
        self._add_netns(self.switch)
        _ip(["-n", self.switch, "link", "add", BRIDGE, "type", "bridge"])
        _ip(["-n", self.switch, "link", "set", BRIDGE, "up"])

    def add_host(self, name: str) -> Host:
        if not _HOST_NAME.match(name):
            raise LabError(f"host name {name!r} must be 1-15 lower-case letters and digits")
        if name in self.hosts:
            raise LabError(f"host {name} already exists in {self.prefix}")
        if self._next >= SUBNET.num_addresses - 1:
            raise LabError(f"no address left in {SUBNET} for host {name}")
        ns = f"{self.prefix}-{name}"
        ip = str(SUBNET.network_address + self._next)
        self._next += 1
        self._add_netns(ns)
        _ip(
            [
                "-n",
                self.switch,
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            ]
        )
        _ip(["-n", self.switch, "link", "set", name, "master", BRIDGE])
        _ip(["-n", self.switch, "link", "set", name, "up"])
        _ip(["-n", ns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", "eth0"])
        _ip(["-n", ns, "link", "set", "eth0", "up"])
        host = Host(name, ns, ip)
        self.hosts[name] = host
        return host

    def teardown(self) -> list[str]:
        """Delete our namespaces, first killing anything still running in them.

        Returns the namespaces that could not be deleted (empty on success).
        """
        left: list[str] = []
        for ns in reversed(self._created):
            # Anything still inside a namespace we made is ours (a child that outlived its
            # parent); deleting the name alone would leave it running, detached.
            for pid in netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                _ip(["netns", "del", ns])
            except LabError:
                if ns in list_netns():
                    left.append(ns)
        self._created = [ns for ns in self._created if ns in left]
        return left


def list_netns() -> set[str]:
    out = _ip(["-j", "netns", "list"])
    return {entry["name"] for entry in json.loads(out or "[]")}


def netns_pids(ns: str) -> list[int]:
    try:
        return [int(p) for p in _ip(["netns", "pids", ns]).split()]
    except LabError:
        return []


def _user_prefix(user: str | None, net_admin: bool) -> list[str]:
    if user is None:
        return []
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise LabError(f"user {user!r} does not exist; run scripts/bootstrap as root") from None
    argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    if net_admin:
        # Ambient so the capability survives exec of the venv's python; inheritable is required
        # for ambient.  The agent needs it for iptables and SO_ORIGINAL_DST.
        argv += ["--inh-caps=+net_admin", "--ambient-caps=+net_admin"]
    return argv


def netns_argv(
    host: Host, argv: Sequence[str], user: str | None = None, net_admin: bool = False
) -> list[str]:
    return ["ip", "netns", "exec", host.netns, *_user_prefix(user, net_admin), *argv]


def run(
    host: Host,
    argv: Sequence[str],
    *,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
    user: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion inside ``host``; raise LabError on failure when ``check``."""
    full = netns_argv(host, argv, user)
    # Without input, stdin is /dev/null: a lab command must never read the driver's terminal.
    stdin = subprocess.DEVNULL if input is None else None
    try:
        p = subprocess.run(
            full, input=input, stdin=stdin, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{host.name}: `{' '.join(argv)}` took longer than {timeout:g}s") from None
    if check and p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()
        raise LabError(f"{host.name}: `{' '.join(argv)}` exited {p.returncode}: {err}")
    return p


@dataclass
class Process:
    """A long-running process in a lab host, tracked by pid."""

    name: str
    host: Host
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited({self.popen.returncode})"
        return f"<Process {self.name}@{self.host.name} pid={self.pid} {state}>"

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait_or_kill(self, deadline: float) -> int:
        """Wait until ``deadline`` (monotonic) for exit, then SIGKILL; reap; return the status.

        The leader is observed with WNOWAIT so it stays a zombie while we kill its group: its
        pid, which is also the group id, cannot be reused by an unrelated process meanwhile.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        while time.monotonic() < deadline and not self._exited_nowait():
            time.sleep(0.02)
        if not self._exited_nowait():
            self.signal(signal.SIGKILL)
        # Anything the program forked into its session goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            raise LabError(f"{self!r} survived SIGKILL for {STOP_GRACE:g}s") from None

    def _exited_nowait(self) -> bool:
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return res is not None

    def stop(self, grace: float = STOP_GRACE) -> int:
        self.terminate()
        return self.wait_or_kill(time.monotonic() + grace)


def spawn(
    host: Host,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    *,
    name: str | None = None,
    net_admin: bool = False,
) -> Process:
    """Start ``argv`` in ``host`` in its own session, stdout and stderr appended to ``log_path``."""
    full = netns_argv(host, argv, user, net_admin)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **env} if env is not None else None
    log: IO[bytes]
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    return Process(name or Path(argv[0]).name, host, list(argv), log_path, popen)


def stop_all(procs: Iterable[Process], grace: float = STOP_GRACE) -> dict[str, int]:
    """SIGTERM all at once, then wait for each against one shared deadline."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace
    out: dict[str, int] = {}
    for p in procs:
        out[f"{p.name}@{p.host.name}"] = p.wait_or_kill(deadline)
    return out


@dataclass(frozen=True)
class HttpResult:
    """What curl saw: ``status`` 0 means no HTTP response (refused, reset, timed out)."""

    status: int
    body: bytes
    error: str = ""

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


_STATUS_MARK = b"\n--nodemesh-lab-status:"


def curl(
    host: Host,
    url: str,
    *,
    method: str = "GET",
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    extra: Sequence[str] = (),
) -> HttpResult:
    """One HTTP request from inside ``host`` with curl, the unmodified client of the tests."""
    argv = [
        "curl",
        "-sS",
        "-X",
        method,
        "--max-time",
        f"{timeout:g}",
        "-w",
        _STATUS_MARK.decode() + "%{http_code}",
    ]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    if data is not None:
        argv += ["--data-binary", "@-"]
    argv += [*extra, url]
    p = run(host, argv, timeout=timeout + CMD_TIMEOUT, check=False, input=data)
    body, _, code = p.stdout.rpartition(_STATUS_MARK)
    status = int(code) if code.strip().isdigit() else 0
    return HttpResult(status, body, p.stderr.decode(errors="replace").strip())


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, joined on one line, for error messages."""
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
