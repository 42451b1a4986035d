"""systemd's service protocol: readiness and watchdog notifications, and inherited sockets.

Theory of operation
-------------------
Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket path; ``@`` means the
abstract namespace) and the daemon sends ``READY=1`` once it serves, ``RELOADING=1`` /
``READY=1`` around a reload, ``STOPPING=1`` when it starts draining, ``STATUS=...`` for
``systemctl status``, and ``WATCHDOG=1`` at half of ``WATCHDOG_USEC``.  The watchdog task runs in
the daemon's own trio loop, so a wedged loop stops the pings and systemd restarts the service:
the ping proves the loop turns, not merely that the process exists.

Under socket activation (``nodemesh.socket``) systemd passes the listening sockets as fds 3, 4,
... with ``LISTEN_FDS``, ``LISTEN_PID`` and ``LISTEN_FDNAMES`` (``FileDescriptorName=``).  The
sockets belong to systemd, not to one agent process: across ``systemctl restart`` they stay
open, so a connection that arrives while one process drains and the next starts waits in the
kernel's accept queue instead of being refused.

Outside systemd every function is a cheap no-op.  The protocol is a few lines of socket code;
the ``systemd`` Python bindings would need libsystemd at build time on every target for it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import trio

from nodemesh import log
from nodemesh.config import AgentConfig, ControllerConfig, reload_plan
from nodemesh.errors import ConfigError

SD_LISTEN_FDS_START = 3
_log = log.get("nodemesh.systemd")


def notify(*states: str, env: MutableMapping[str, str] = os.environ) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False when not under it."""
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    msg = "\n".join(states).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, addr)
    except OSError as e:
        _log.warning("systemd_notify_failed", socket=path, error=e.strerror or str(e))
        return False
    return True


def watchdog_interval(env: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between pings (half the watchdog timeout), or None without a watchdog for us."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def serve_watchdog(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ping systemd's watchdog from this trio loop for as long as it turns; returns at once
    when there is no watchdog."""
    interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


def listen_fds(env: MutableMapping[str, str] = os.environ) -> dict[str, socket.socket]:
    """Sockets systemd passed to this process, by ``FileDescriptorName``, taken once.

    The variables are removed, so a child process never believes the sockets are its own.
    """
    count, pid = env.pop("LISTEN_FDS", ""), env.pop("LISTEN_PID", "")
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    if not count.isdigit() or not pid.isdigit() or int(pid) != os.getpid():
        return {}
    out: dict[str, socket.socket] = {}
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        name = names[i] if i < len(names) and names[i] else f"fd{fd}"
        if name in out:  # one socket unit names all its fds alike
            name = f"{name}#{fd}"
        out[name] = socket.socket(fileno=fd)
    return out


def reload_config(
    current: Any,
    path: Path | None,
    load: Callable[[Path], Any],
    reloadable: frozenset[str],
    logger: Any,
) -> Any:
    """SIGHUP for either daemon: re-read ``path``, apply what ``reloadable`` allows, tell
    systemd and the log; the running config (``current``) on any problem."""
    assert isinstance(current, AgentConfig | ControllerConfig)
    if path is None:
        logger.warning("config_reload_skipped", why="not started from a config file")
        return current
    notify("RELOADING=1", "STATUS=reloading the config")
    try:
        new = load(path)
    except ConfigError as e:
        logger.error("config_reload_failed", error=str(e), kept="the running config")
        notify("READY=1", f"STATUS=serving; reload failed: {e}")
        return current
    merged, applied, pending = reload_plan(current, new, reloadable)
    log.configure(merged.log_level, merged.log_format)
    logger.info("config_reloaded", applied=applied, needs_restart=pending)
    notify("READY=1", f"STATUS=serving; reloaded ({len(applied)} changes applied)")
    return merged
