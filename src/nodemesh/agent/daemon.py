"""The agent daemon: one root nursery, three listeners, watches, identities, interception.

Start order (each step reports before the next begins):
1. bind the listeners (a taken port fails fast, before anything is changed on the host);
2. watch Consul until the first catalog snapshot;
3. obtain the node identity, then one per local service (persisted certificates serve at once);
4. install interception (iptables), only now that something listens on the outbound port;
5. register as ``nodemesh`` in Consul, with a check on ``/ready``; print one line per listener.

Under systemd (``systemd/nodemesh.service``) the listeners are the sockets ``nodemesh.socket``
passes, interception is ``nodemesh-iptables.service``'s (``interception.install = "external"``),
readiness, stopping and a watchdog ping from this loop go to systemd (``sdnotify``), and SIGHUP
re-reads the config: what the running agent reads at each use applies at once, the rest is
logged as needing a restart (``config.reload_plan``).

Stop (SIGTERM/SIGINT): mark not ready, deregister, stop accepting, end idle keep-alive
connections, let in-flight requests finish within ``shutdown.grace``, then remove interception
and hand the last metrics interval and any unsent reports to the controller or the state dir.
Consul or the controller going away later changes nothing: the last snapshot and certificates
keep serving.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from nodemesh import __version__, log, sdnotify
from nodemesh.agent import heap, iptables
from nodemesh.agent.admin import Admin
from nodemesh.agent.state import AgentState
from nodemesh.config import RELOADABLE, AgentConfig, load_agent_config
from nodemesh.discovery.consul import ConsulClient, ConsulUnavailable, http_check
from nodemesh.discovery.snapshot import AGENT_SERVICE
from nodemesh.discovery.watch import CatalogWatch, RoutesWatch
from nodemesh.errors import NodemeshError
from nodemesh.identity.client import ControllerClient, ControllerUnavailable
from nodemesh.identity.store import IdentityStore, serve_identities
from nodemesh.inbound.server import Inbound
from nodemesh.outbound.server import Outbound
from nodemesh.proxy.http1 import IdleSet
from nodemesh.telemetry.metrics import Recorder
from nodemesh.telemetry.reporter import ReporterStop, serve_reporter
from nodemesh.transport.listen import open_listener, serve_listener

_log = log.get("nodemesh.agent")
REGISTER_RETRY = 2.0  # seconds between attempts to register while Consul is away


def _controller_address(cfg: AgentConfig, agent: AgentState) -> Callable[[], str]:
    def address() -> str:
        if cfg.controller_address:
            return cfg.controller_address
        ctrls = agent.snapshot.controllers
        if not ctrls:  # an identity error: rotation retries with backoff, the agent waits
            raise ControllerUnavailable(
                "no healthy nodemesh-controller in Consul; start one or set controller.address"
            )
        # A stable pick (str hash is salted per process): the same controller across
        # restarts while the set stays the same, so its reports land in one place.
        host, port = ctrls[zlib.crc32(cfg.node.encode()) % len(ctrls)]
        return f"{host}:{port}"

    return address


async def _register(consul: ConsulClient, cfg: AgentConfig, advertise: str) -> None:
    admin_host, admin_port = cfg.admin_addr
    check_host = "127.0.0.1" if admin_host in ("0.0.0.0", "::") else admin_host
    await consul.register(
        AGENT_SERVICE,
        f"{AGENT_SERVICE}-{cfg.node}",
        advertise,
        cfg.inbound_addr[1],
        meta={"version": __version__, "admin": f"{admin_host}:{admin_port}"},
        # Registered only once ready, so the check starts passing: otherwise this node's
        # services would be unroutable until Consul's first probe, up to one interval later.
        check={
            **http_check(f"http://{check_host}:{admin_port}/ready", "2s", timeout="1s"),
            "Status": "passing",
        },
    )


async def _advertise_address(consul: ConsulClient, cfg: AgentConfig) -> str:
    if cfg.advertise:
        return cfg.advertise
    if cfg.inbound_addr[0] not in ("0.0.0.0", "::"):
        return cfg.inbound_addr[0]
    node = await consul.node(cfg.node)
    addr = (node or {}).get("Node", {}).get("Address")
    if not isinstance(addr, str) or not addr:
        raise NodemeshError(
            f"Consul does not know node {cfg.node}; set agent.node to this host's Consul "
            "node name, or set listen.advertise"
        )
    return addr


async def _retry(what: str, fn: Callable[[], Awaitable[None]]) -> None:
    while True:
        try:
            await fn()
            return
        except ConsulUnavailable as e:
            _log.warning("consul_call_failed", what=what, error=str(e), retry_in=REGISTER_RETRY)
            await trio.sleep(REGISTER_RETRY)


async def serve_agent(
    cfg: AgentConfig,
    *,
    config_path: Path | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    store = IdentityStore(
        cfg.trust_domain, cfg.datacenter, cfg.node, cfg.state_dir, alpn=("h2", "http/1.1")
    )
    agent = AgentState(cfg, store, Recorder())
    consul = ConsulClient(cfg.consul_addr, cfg.consul_token)
    controller = ControllerClient.from_files(
        _controller_address(cfg, agent), cfg.ca_file, cfg.join_token_file, keep_reports=True
    )
    outbound, inbound, admin = Outbound(agent), Inbound(agent), Admin(agent)
    inherited = sdnotify.listen_fds()
    listeners = {
        "outbound": await open_listener(cfg.outbound_addr, "outbound", inherited),
        "inbound": await open_listener(cfg.inbound_addr, "inbound", inherited),
        "admin": await open_listener(cfg.admin_addr, "admin", inherited),
    }
    for name, sock in inherited.items():
        _log.warning("systemd_socket_unused", name=name, address=str(sock.getsockname()))
        sock.close()
    handlers = {"outbound": outbound.handle, "inbound": inbound.handle}
    idle = IdleSet()
    outbound.idle = inbound.idle = idle
    idle.on_drain.append(inbound.drain)
    stop = trio.Event()
    plan = iptables.InterceptionPlan(
        proxy_uid=cfg.proxy_uid if cfg.proxy_uid is not None else os.geteuid(),
        outbound_port=cfg.outbound_addr[1],
        consul_ports=cfg.consul_ports,
        exclude_ports=cfg.exclude_ports,
        exclude_cidrs=cfg.exclude_cidrs,
    )
    intercepting = False
    reporter = ReporterStop()

    async def watch_signals(root: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    agent.cfg = sdnotify.reload_config(
                        agent.cfg, config_path, load_agent_config, RELOADABLE, _log
                    )
                    continue
                _log.info("agent_stopping", signal=signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1", "STATUS=draining")
                if not agent.listeners_ready.is_set():
                    root.cancel_scope.cancel()  # still starting: nothing to drain
                stop.set()

    async with trio.open_nursery() as root:
        root.start_soon(watch_signals, root)
        await root.start(sdnotify.serve_watchdog)
        # Admin first, so /live answers (and /ready says why not) during start-up.
        await root.start(serve_listener, listeners.pop("admin"), admin.handle, "admin")
        watch = CatalogWatch(consul, cfg.node, agent.publish)
        _log.info("consul_watch_starting", consul=f"{cfg.consul_addr[0]}:{cfg.consul_addr[1]}")
        await root.start(watch.serve)
        await root.start(RoutesWatch(consul, agent.publish_routes).serve)
        agent.on_snapshot.append(lambda _snap: store.poke())
        _log.info("identity_starting", node=str(agent.node_identity))
        await root.start(serve_identities, store, controller, lambda: set(agent.snapshot.local))

        def node_pair() -> tuple[bytes, bytes] | None:
            held = store.held(agent.node_identity)
            return None if held is None else (held.chain_pem, held.key_pem)

        await root.start(
            partial(serve_reporter, stopper=reporter),
            agent.recorder,
            controller,
            agent.node_identity.uri,
            node_pair,
            cfg.state_dir,
            cfg.telemetry_interval,
        )
        await root.start(outbound.mux.serve)
        await root.start(inbound.h2apps.serve)
        root.start_soon(outbound.pool.serve_reaper)
        root.start_soon(inbound.pool.serve_reaper)
        await root.start(idle.serve)
        await root.start(heap.serve)
        try:
            with trio.CancelScope() as drain_scope:
                async with trio.open_nursery() as conns:
                    async with trio.open_nursery() as accept:
                        for name, lst in listeners.items():
                            addr = await accept.start(
                                partial(serve_listener, handler_nursery=conns),
                                lst,
                                handlers[name],
                                name,
                            )
                            print(
                                f"nodemesh agent {name} listening on {addr[0]}:{addr[1]}",
                                flush=True,
                            )
                        if cfg.interception and cfg.interception_install == "agent":
                            # Set first: a partial install (chain without jump) is removed too.
                            intercepting = True
                            await trio.to_thread.run_sync(iptables.install, plan)
                            _log.info("interception_installed", proxy_uid=plan.proxy_uid)
                        elif cfg.interception:
                            _log.info("interception_external", by="nodemesh iptables install")
                        advertise = await _advertise_address(consul, cfg)
                        await _retry("register", lambda: _register(consul, cfg, advertise))
                        agent.listeners_ready.set()
                        # What start-up made lives as long as the agent: out of the collector's
                        # sight, a full collection pauses the data path for tens of microseconds
                        # instead of ~10 ms (47k objects after imports; docs/benchmarks.md).
                        gc.freeze()
                        _log.info("agent_ready", node=cfg.node, advertise=advertise)
                        sdnotify.notify("READY=1", f"STATUS=serving as {cfg.node}")
                        task_status.started()
                        await stop.wait()
                        agent.draining = True
                        accept.cancel_scope.cancel()
                    with trio.move_on_after(5):
                        await _retry(
                            "deregister", lambda: consul.deregister(f"{AGENT_SERVICE}-{cfg.node}")
                        )
                    idle.drain()
                    drain_scope.deadline = trio.current_time() + agent.cfg.shutdown_grace
            if drain_scope.cancelled_caught:
                _log.warning("drain_grace_expired", grace=agent.cfg.shutdown_grace)
        finally:
            if intercepting:
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(iptables.remove)
                        _log.info("interception_removed")
                    except NodemeshError as e:
                        _log.error("interception_remove_failed", error=str(e))
            # Drained, so every request is recorded: the last partial interval and the unsent
            # backlog go to the controller (bounded) or to the state dir for the next start.
            await reporter.stop()
            root.cancel_scope.cancel()
    _log.info("agent_stopped")


def run(cfg: AgentConfig, config_path: Path | None = None) -> int:
    """Run the agent until stopped; 0 on a clean stop, 1 with one line on stderr otherwise."""
    log.configure(cfg.log_level, cfg.log_format)
    failed = False
    try:
        trio.run(partial(serve_agent, cfg, config_path=config_path))
    except* NodemeshError as eg:
        for e in eg.exceptions:
            print(f"nodemesh agent: {e}", file=sys.stderr)
        failed = True
    return 1 if failed else 0
