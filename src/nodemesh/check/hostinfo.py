"""What the host's kernel and files say, read only: the nat table (through ``agent/iptables``,
which runs ``iptables -t nat -S``), the listening sockets and their processes under ``/proc``,
the netfilter extensions, capabilities, users and the state dir.

Listeners are found in ``/proc/net/tcp`` rather than by connecting: a test connection would
make the agent log a refused direct connection on every run, and the socket table also leads
to the process behind the outbound port, whose uid iptables must exclude.
"""

from __future__ import annotations

import os
import platform
import pwd
import re
from collections.abc import Iterable
from pathlib import Path

from nodemesh.agent import iptables
from nodemesh.check.facts import (
    IptablesFacts,
    Owner,
    Socket,
    StateDirFacts,
    listener_at,
    parse_capabilities,
    parse_effective_uid,
    parse_names,
    parse_proc_net_tcp,
    port_holders,
)
from nodemesh.config import AgentConfig
from nodemesh.errors import NodemeshError

PROC = Path("/proc")
CAP_NET_ADMIN = 12  # bit in the capability masks (linux/capability.h)


def read_iptables() -> IptablesFacts:
    """The nat table, read only (``iptables -t nat -S``, twice: status and nodemesh's lines)."""
    try:
        st = iptables.status()
        lines = tuple(iptables.show().splitlines())
    except NodemeshError as e:
        return IptablesFacts(error=str(e))
    return IptablesFacts(status=st, lines=lines)


def read_sockets(proc: Path = PROC) -> tuple[Socket, ...] | None:
    out: list[Socket] = []
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            text = (proc / "net" / name).read_text()
        except OSError:
            continue
        readable = True
        out += parse_proc_net_tcp(text)
    return tuple(out) if readable else None


def find_owners(inodes: set[int], proc: Path = PROC) -> dict[int, tuple[Owner, ...]]:
    """Which processes hold each socket inode (among those this user may look into)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: dict[int, list[Owner]] = {}
    if not wanted:
        return {}
    try:
        pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
    except OSError:
        return {}
    for pid in pids:
        fd_dir = proc / str(pid) / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        held: set[int] = set()  # a process may hold one socket in several fds
        for fd in fds:
            try:
                inode = wanted.get(os.readlink(fd_dir / fd))
            except OSError:
                continue
            if inode is not None and inode not in held:
                held.add(inode)
                found.setdefault(inode, []).append(_owner(proc, pid))
    return {i: tuple(o) for i, o in found.items()}


def _owner(proc: Path, pid: int) -> Owner:
    try:
        uid = parse_effective_uid((proc / str(pid) / "status").read_text())
    except OSError:
        uid = None
    return Owner(pid, _command(proc, pid), uid)


def _command(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _interesting(sockets: tuple[Socket, ...] | None, cfg: AgentConfig) -> set[int]:
    if sockets is None:
        return set()
    out = set()
    for where in (cfg.outbound_addr, cfg.inbound_addr, cfg.admin_addr):
        s = listener_at(sockets, where)
        out |= {s.inode} if s is not None else {h.inode for h in port_holders(sockets, where)}
    return out


def read_listeners(
    cfg: AgentConfig,
) -> tuple[tuple[Socket, ...] | None, dict[int, tuple[Owner, ...]]]:
    sockets = read_sockets()
    return sockets, find_owners(_interesting(sockets, cfg))


def state_dir(path: Path) -> StateDirFacts:
    if path.exists():
        return StateDirFacts(path, True, os.access(path, os.W_OK | os.X_OK), path.parent)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return StateDirFacts(path, False, os.access(parent, os.W_OK | os.X_OK), parent)


def extension_names(name: str) -> frozenset[str] | None:
    try:
        return parse_names((PROC / "net" / name).read_text())
    except OSError:
        return None


def kernel_modules(wanted: Iterable[str]) -> frozenset[str]:
    """Which of ``wanted`` the running kernel has as loadable or built-in modules."""
    base = Path("/lib/modules") / platform.release()
    text = ""
    for listing in ("modules.dep", "modules.builtin"):
        try:
            text += (base / listing).read_text()
        except OSError:
            continue
    return frozenset(m for m in wanted if re.search(rf"/{re.escape(m)}\.ko", text))


def user_uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def has_net_admin() -> bool:
    try:
        mask = parse_capabilities((PROC / "self" / "status").read_text())
    except OSError:
        return False
    return bool(mask >> CAP_NET_ADMIN & 1)
