"""The controller daemon: CA, its own HTTPS certificate, the API, and its Consul registration.

``serve_controller`` is the whole service and never returns; ``run_controller`` adds what only
a process needs (signals, systemd readiness).  A clean stop deregisters from Consul, so agents
stop dialing a controller that is gone.
"""

from __future__ import annotations

import ipaddress
import random
import signal
import ssl
import sys
import time
from pathlib import Path

import trio

from nodemesh import log, sdnotify
from nodemesh.config import (
    CONTROLLER_RELOADABLE,
    ControllerConfig,
    load_controller_config,
    read_secret,
)
from nodemesh.controller.api import ControllerApi, serve_api
from nodemesh.controller.audit import IssuanceLog
from nodemesh.controller.catalog import CONTROLLER_SERVICE, Catalog, ConsulUnavailable
from nodemesh.controller.journal import JOURNAL_DIR, MetricsJournal
from nodemesh.controller.metrics import FleetMetrics
from nodemesh.errors import ConfigError, IdentityError, NodemeshError
from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.identity.keys import LeafInfo

_log = log.get("nodemesh.controller")
REGISTER_BACKOFF_CAP = 30.0  # seconds between attempts to register while Consul is away
DEREGISTER_TIMEOUT = 5.0  # seconds a clean stop may spend telling Consul
# Histogram merges per compaction step: ~2 ms, then the API's turn.  A report takes a few
# dozen scheduler rounds (handshake, reads, journal, answer), each waiting out one step, so
# 500 (~10 ms) measured acceptance p50 at 0.3 s with 1,000 agents.
COMPACT_WORK = 100
# Queries compute in a worker thread (metrics.QueryPlan); each time the event loop wants the
# GIL back it waits up to this long (the default 5 ms would add as much to every round).
SWITCH_INTERVAL_S = 0.001
COMPACT_IDLE = 1.0  # seconds between looks when no slot is due


class OwnCertificate:
    """The controller's server certificate, re-issued by its own CA at 70 % of its life.

    Agents verify it by the DNS name ``nodemesh-controller`` (whatever address they dialed);
    the advertise IP is in it too for tools that dial by address.
    """

    def __init__(self, ca: CertificateAuthority, identity: spiffe.SpiffeId, ip: str, ttl: float):
        self._ca, self._identity, self._ip, self._ttl = ca, identity, ip, ttl
        self.info: LeafInfo
        self.renew_at: float
        self._ctx: ssl.SSLContext
        self.issue()

    def issue(self) -> None:
        key = keys.generate_key()
        chain = self._ca.sign_csr(
            keys.make_csr(key, self._identity),
            self._identity,
            self._ttl,
            dns_names=(CONTROLLER_SERVICE,),
            ips=(self._ip,),
        )
        # Client certs are optional at the TLS layer: /v1/sign/node has none yet.
        ctx = tls.server_context(
            chain, key, self._ca.roots_pem, require_client_cert=False, alpn=("http/1.1",)
        )
        self.info, self._ctx = keys.leaf_info(chain), ctx
        # Renew at 70 % of the life counted from now (not_before is back-dated for skew).
        self.renew_at = time.time() + 0.7 * (self.info.not_after - time.time())

    def context(self) -> ssl.SSLContext:
        return self._ctx

    async def serve_renewal(self) -> None:
        while True:
            await trio.sleep(max(1.0, self.renew_at - time.time()))
            try:
                self.issue()
            except IdentityError as e:  # keep serving the current one; try again soon
                _log.error("controller_cert_renew_failed", error=str(e))
                self.renew_at = time.time() + 60.0
            else:
                _log.info("controller_cert_renewed", not_after=self.info.not_after)


async def serve_controller(
    cfg: ControllerConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the controller until cancelled; reports the bound (host, port) when serving."""
    ca = CertificateAuthority.load_or_create(
        cfg.state_dir, cfg.trust_domain, cfg.ca_cert_file, cfg.ca_key_file, cfg.ca_chain_file
    )
    token = read_secret(cfg.join_token_file, "join token")
    catalog = Catalog(cfg.consul_addr, cfg.consul_token)
    ip, adv_port = await _advertise(cfg, catalog)
    me = spiffe.service_id(cfg.trust_domain, cfg.datacenter, CONTROLLER_SERVICE)
    own = OwnCertificate(ca, me, ip, cfg.leaf_ttl)
    fleet = FleetMetrics()
    journal = MetricsJournal(cfg.state_dir / JOURNAL_DIR)
    audit = IssuanceLog(cfg.state_dir)
    api = ControllerApi(
        ca, catalog, token, cfg.datacenter, cfg.leaf_ttl, fleet, journal=journal, audit=audit
    )
    service_id = f"{CONTROLLER_SERVICE}-{cfg.node}"
    try:
        async with trio.open_nursery() as nursery:
            # The CA serves at once; the metrics endpoints answer 503 until the replay is done.
            nursery.start_soon(_serve_metrics_upkeep, fleet, journal)
            listeners = await nursery.start(serve_api, api, cfg.listen, own.context)
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(own.serve_renewal)
            nursery.start_soon(_keep_registered, catalog, service_id, ip, adv_port or port)
            bound = (cfg.listen[0], port)
            _log.info(
                "controller_started",
                listen=f"{bound[0]}:{port}",
                advertise=ip,
                root=ca.summary()["sha256_fingerprint"],
            )
            print(f"nodemesh controller listening on {bound[0]}:{port}", flush=True)
            task_status.started(bound)
    finally:
        journal.close()
        with trio.CancelScope(shield=True), trio.move_on_after(DEREGISTER_TIMEOUT):
            try:
                await catalog.deregister_controller(service_id)
                _log.info("controller_deregistered", service_id=service_id)
            except ConsulUnavailable as e:
                _log.warning("controller_deregister_failed", error=str(e))


async def _serve_metrics_upkeep(fleet: FleetMetrics, journal: MetricsJournal) -> None:
    """Replay the journal, then fold closed slots in small steps between the API's work
    (controller/metrics.py, "Stepping")."""
    await journal.load(fleet, time.time())
    while True:
        more = fleet.compact(time.time(), COMPACT_WORK)
        await trio.sleep(0 if more else COMPACT_IDLE)


async def run_controller(cfg: ControllerConfig, config_path: Path | None = None) -> None:
    """``serve_controller`` plus what only a process needs: SIGTERM/SIGINT → clean stop,
    SIGHUP → re-read the config (log settings apply; the rest is named as needing a restart),
    and systemd's readiness, stopping and watchdog notifications."""
    signals_wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    with trio.open_signal_receiver(*signals_wanted) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(sdnotify.serve_watchdog)
            await nursery.start(serve_controller, cfg)
            sdnotify.notify("READY=1", "STATUS=serving")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    cfg = sdnotify.reload_config(
                        cfg, config_path, load_controller_config, CONTROLLER_RELOADABLE, _log
                    )
                    continue
                _log.info("controller_stopping", signal=signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1", "STATUS=stopping")
                nursery.cancel_scope.cancel()
                break


async def _advertise(cfg: ControllerConfig, catalog: Catalog) -> tuple[str, int | None]:
    """The IP (and port, if given) agents should dial: config, else the listen IP, else the
    address Consul has for this node."""
    if cfg.advertise:
        return parse_advertise(cfg.advertise)
    if not ipaddress.ip_address(cfg.listen[0]).is_unspecified:
        return cfg.listen[0], None
    try:
        return await catalog.local_address(), None
    except ConsulUnavailable as e:
        raise NodemeshError(
            f"cannot learn this node's address for the controller certificate: {e}; "
            "or set controller.advertise"
        ) from None


def parse_advertise(value: str) -> tuple[str, int | None]:
    """``"198.18.0.5"`` or ``"198.18.0.5:4190"`` (IPv6 in brackets with a port)."""
    try:
        return str(ipaddress.ip_address(value.strip("[]"))), None
    except ValueError:
        pass
    host, _, port = value.rpartition(":")
    try:
        ip, number = ipaddress.ip_address(host.strip("[]")), int(port)
        if not 0 < number < 65536:
            raise ValueError(port)
    except ValueError:
        raise ConfigError(
            f'controller.advertise = "{value}" is not an IP address or IP:port'
        ) from None
    return str(ip), number


async def _keep_registered(catalog: Catalog, service_id: str, ip: str, port: int) -> None:
    """Register in Consul, retrying with capped backoff while Consul is away."""
    delay = 1.0
    while True:
        try:
            await catalog.register_controller(service_id, ip, port)
        except ConsulUnavailable as e:
            _log.warning("controller_register_failed", error=str(e), retry_in=delay)
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(REGISTER_BACKOFF_CAP, delay * 2)
        else:
            _log.info("controller_registered", service_id=service_id, address=f"{ip}:{port}")
            return
