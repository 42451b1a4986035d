"""The programs the benchmark compares nodemesh with, and the upstream they all reach.

- nginx on h2: the fast upstream, a fixed small body, one worker.  Two response headers tell
  which path a request took: ``x-bench-peer`` (the address nginx saw the connection come from)
  and ``x-bench-client-id`` (the ``x-nodemesh-client-id`` the inbound agent adds).
- Consul's built-in Connect proxy (Go, L4 mTLS): a sidecar for ``bench`` on h2 and an upstream
  listener on h1.
- haproxy on h1: one L7 hop, no TLS, a reference point for what a proxy in C costs.
- The other upstreams on h2 (``UPSTREAMS``), each its own Consul service with a Connect sidecar:
  nginx again on an h2c (prior knowledge) port, and ``apps.py``'s gRPC echo, bulk TCP sink and
  stock ``http.server`` that writes its body in a second write.

Config texts are pure functions; starting and stopping is the lab's ``netns.spawn`` by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measure import BenchError

import nodemesh.lab.consul as lab_consul
from nodemesh.lab.mesh import NODEMESH_USER, Lab
from nodemesh.lab.netns import Process, spawn

SERVICE = "bench"
PORT = 8080  # nginx on h2
SIDECAR_PORT = 21000  # Consul's sidecar range starts here
CONNECT_UPSTREAM_PORT = 9191  # the Connect proxy's listener on h1's loopback
HAPROXY_PORT = 8088  # haproxy's listener on h1's loopback
FLOOR_UPSTREAMS = ("nginx", "sink")  # the upstreams the trio floor relays (floor.py) reach
FLOOR_PORT_BASE = 9290  # floor relay on h1's loopback: base + the upstream's port % 10
FLOOR_TLS_PORT_BASE = 22080  # floor relay on h2's address (mTLS): base + port % 10
FLOOR_HOPS = {"l4": FLOOR_UPSTREAMS, "h1": ("nginx",)}  # floor.py --hop: the upstreams it reaches
FLOOR_HOP_OFFSET = {"l4": 0, "h1": 10}  # the h1 pair's ports are the l4 pair's + 10


@dataclass(frozen=True)
class Upstream:
    """One service on h2 as Consul knows it, and where Consul's proxy on h1 listens for it."""

    service: str
    port: int  # on h2's address
    protocol: str  # Meta.protocol for nodemesh ("": detected); DECLARED_PROTOCOLS
    check: str  # "http" or "tcp" (an h2c-only port or a raw sink cannot answer HTTP/1.1)
    sidecar_port: int
    connect_port: int  # Consul's upstream listener on h1's 127.0.0.1

    @property
    def service_id(self) -> str:
        return f"{self.service}-h2-{self.port}"


UPSTREAMS = {
    "nginx": Upstream(SERVICE, PORT, "", "http", SIDECAR_PORT, CONNECT_UPSTREAM_PORT),
    "h2c": Upstream("bench-h2c", 8081, "http2", "tcp", 21001, 9192),
    "grpc": Upstream("bench-grpc", 8082, "grpc", "tcp", 21002, 9193),
    "sink": Upstream("bench-sink", 8083, "tcp", "tcp", 21003, 9194),
    "pieces": Upstream("bench-pieces", 8084, "", "http", 21004, 9195),
}
# 100 bytes: small enough that the proxies, not the payload, are what is measured.
BODY = (
    "nodemesh benchmark: a fixed body of one hundred bytes from nginx, "
    + "the same for every path .........\n"
)
# binary -> Debian package
PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client"}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def ensure_packages(say: Callable[[str], None]) -> None:
    """apt-get install what is missing of nginx, haproxy, wrk and h2load.

    Debian starts a freshly installed daemon at once (nginx would listen on the machine's own
    port 80); a policy-rc.d that answers 101 forbids that for the length of the install, and is
    removed again if it was not there before.
    """
    missing = [pkg for b, pkg in PACKAGES.items() if shutil.which(b, path=SBIN_PATH) is None]
    if not missing:
        return
    say(f"installing {' '.join(missing)} with apt-get")
    added = not POLICY_RC_D.exists()
    if added:
        POLICY_RC_D.write_text("#!/bin/sh\n# the nodemesh benchmark: no service starts\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
            if p.returncode != 0:
                raise BenchError(
                    f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip()[-400:]}; "
                    "install the packages by hand and run again"
                )
    finally:
        if added:
            POLICY_RC_D.unlink(missing_ok=True)


def binary(name: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise BenchError(f"{name} is not installed; apt-get install {PACKAGES.get(name, name)}")
    return path


def version(argv: list[str]) -> str:
    """The first line a program prints about its version (some print it on stderr)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (p.stdout + p.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# --- Consul with Connect -----------------------------------------------------------------------


CONSUL_CONNECT = {"connect": {"enabled": True}}  # LabSpec.consul_config


def enable_connect_in_lab_consul() -> None:
    """For revisions whose ``LabSpec`` has no ``consul_config``: make every lab Consul agent
    start with ``connect { enabled = true }`` by wrapping the lab's pure config function
    before the lab starts (this process only)."""
    original = lab_consul.agent_config
    if getattr(original, "_bench_connect", False):
        return

    def with_connect(*args: Any, **kwargs: Any) -> dict[str, Any]:
        cfg = original(*args, **kwargs)
        cfg["connect"] = {"enabled": True}
        return cfg

    with_connect._bench_connect = True  # type: ignore[attr-defined]
    lab_consul.agent_config = with_connect


def service_definition(ip: str, up: Upstream, *, sidecar: bool) -> dict[str, Any]:
    """``up`` on h2 as Consul's agent API takes it; with ``sidecar``, a Connect sidecar whose
    built-in proxy delivers to the service on h2's address (its default is 127.0.0.1)."""
    where = f"{ip}:{up.port}"
    check = {"HTTP": f"http://{where}/"} if up.check == "http" else {"TCP": where}
    svc: dict[str, Any] = {
        "ID": up.service_id,
        "Name": up.service,
        "Address": ip,
        "Port": up.port,
        "Check": {"Name": up.service, "Interval": "1s", **check},
    }
    if up.protocol:
        svc["Meta"] = {"protocol": up.protocol}
    if sidecar:
        svc["Connect"] = {
            "SidecarService": {
                "Port": up.sidecar_port,
                "Proxy": {"LocalServiceAddress": ip, "LocalServicePort": up.port},
            }
        }
    return svc


def register(lab: Lab, host: str, up: Upstream, *, sidecar: bool) -> str:
    svc = service_definition(lab.host_ip(host), up, sidecar=sidecar)
    lab.consul_api(host, "/v1/agent/service/register", method="PUT", body=svc)
    return str(svc["ID"])


def passing(lab: Lab, host: str, service: str) -> bool:
    return bool(lab.consul_api(host, f"/v1/health/service/{service}?passing"))


def connect_proxy_argv(consul: Path, ups: Sequence[Upstream]) -> list[str]:
    """Consul's proxy on h1: one ``-upstream`` listener per service (pure)."""
    argv = [str(consul), "connect", "proxy", "-service", f"{SERVICE}-client"]
    for up in ups:
        argv += ["-upstream", f"{up.service}:{up.connect_port}"]
    return [*argv, "-http-addr", "127.0.0.1:8500", "-log-level", "warn"]


def start_connect_proxies(
    lab: Lab, consul: Path, ups: Sequence[Upstream]
) -> tuple[dict[str, Process], Process]:
    """A sidecar on h2 per upstream (by service) and one upstream proxy on h1 for them all,
    each as the agent's uid so nodemesh's interception leaves their connections alone
    (Consul's own redirect excludes its proxy the same way)."""
    http = ["-http-addr", "127.0.0.1:8500", "-log-level", "warn"]
    sidecars = {
        up.service: spawn(
            lab.host("h2"),
            [str(consul), "connect", "proxy", "-sidecar-for", up.service_id, *http],
            lab.log_path("h2", f"connect-proxy-{up.service}"),
            user=NODEMESH_USER,
            name=f"connect-proxy-{up.service}",
        )
        for up in ups
    }
    upstream = spawn(
        lab.host("h1"),
        connect_proxy_argv(consul, ups),
        lab.log_path("h1", "connect-proxy"),
        user=NODEMESH_USER,
        name="connect-proxy",
    )
    return sidecars, upstream


def start_app(lab: Lab, host: str, script: Path, cmd: str, port: int) -> Process:
    """One of ``apps.py``'s servers on ``host``'s address (as root, like the lab's apps)."""
    listen = f"{lab.host_ip(host)}:{port}"
    argv = [lab.spec.python.as_posix(), str(script), cmd, "--listen", listen]
    return spawn(lab.host(host), argv, lab.log_path(host, cmd), name=cmd)


# --- the trio floor -----------------------------------------------------------------------------


def floor_port(key: str, hop: str = "l4") -> int:
    return FLOOR_PORT_BASE + FLOOR_HOP_OFFSET[hop] + UPSTREAMS[key].port % 10


def start_floor(lab: Lab, script: Path, hop: str = "l4") -> tuple[Process, Process]:
    """``floor.py``'s relay pair for one ``--hop``: "out" on h1's loopback, "in" on h2's
    address, a route per upstream in ``FLOOR_HOPS[hop]`` each, as the agent's uid (interception
    leaves their connections alone).  Certificates come from a throwaway CA in the lab's
    directory (made once, shared by both pairs)."""
    certs = lab.dir / "floor-certs"
    py = lab.spec.python.as_posix()
    if not (certs / "roots.pem").exists():
        subprocess.run([py, str(script), "certs", str(certs)], check=True, timeout=60)
    h2 = lab.host_ip("h2")

    def relay(host: str, role: str, routes: list[str]) -> Process:
        argv = [py, str(script), "relay", "--role", role, "--hop", hop, "--certs", str(certs)]
        for r in routes:
            argv += ["--route", r]
        return spawn(lab.host(host), argv, lab.log_path(host, f"floor-{hop}-{role}"),
                     user=NODEMESH_USER, name=f"floor-{hop}-{role}")  # fmt: skip

    base = FLOOR_TLS_PORT_BASE + FLOOR_HOP_OFFSET[hop]
    tls_port = {k: base + UPSTREAMS[k].port % 10 for k in FLOOR_HOPS[hop]}
    inn = relay("h2", "in", [f"{h2}:{tls_port[k]}={h2}:{UPSTREAMS[k].port}" for k in tls_port])
    loopback = {k: f"127.0.0.1:{floor_port(k, hop)}" for k in tls_port}
    out = relay("h1", "out", [f"{loopback[k]}={h2}:{p}" for k, p in tls_port.items()])
    return out, inn


# --- nginx and haproxy -------------------------------------------------------------------------


def nginx_conf(ip: str, port: int, workdir: Path, h2c_port: int | None = None) -> str:
    """One worker, no access log, keep-alive for the whole run, the fixed body (pure); with
    ``h2c_port``, the same answer over HTTP/2 with prior knowledge (no TLS) on that port."""
    tmp = workdir / "nginx-tmp"

    def server(listen: str) -> str:
        return f"""\
  server {{
    listen {listen};
    location / {{
      default_type text/plain;
      add_header x-bench-peer $remote_addr always;
      add_header x-bench-client-id $http_x_nodemesh_client_id always;
      return 200 {json.dumps(BODY)};
    }}
  }}"""

    temps = "\n".join(
        f"  {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
daemon off;
user nobody nogroup;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temps}
  keepalive_requests 10000000;
  keepalive_timeout 300s;
{server(f"{ip}:{port}")}
{server(f"{ip}:{h2c_port} http2") if h2c_port else ""}
}}
"""


def start_nginx(lab: Lab, host: str) -> Process:
    work = lab.dir / host
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(lab.host_ip(host), PORT, work, UPSTREAMS["h2c"].port))
    argv = [binary("nginx"), "-e", str(work / "nginx-error.log"), "-p", str(work), "-c", str(conf)]
    return spawn(lab.host(host), argv, lab.log_path(host, "nginx"), name="nginx")


def haproxy_conf(listen: str, upstream: str) -> str:
    """One thread, HTTP mode, upstream connections reused across client connections (pure)."""
    return f"""\
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend bench
  bind {listen}
  default_backend nginx
backend nginx
  server nginx {upstream}
"""


def start_haproxy(lab: Lab, host: str, upstream: str) -> Process:
    conf = lab.dir / host / "haproxy.cfg"
    conf.write_text(haproxy_conf(f"127.0.0.1:{HAPROXY_PORT}", upstream))
    # As the agent's uid: haproxy's own connections to nginx must not be intercepted.
    return spawn(
        lab.host(host),
        [binary("haproxy"), "-db", "-f", str(conf)],
        lab.log_path(host, "haproxy"),
        user=NODEMESH_USER,
        name="haproxy",
    )
