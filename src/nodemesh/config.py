"""Agent and controller configuration: read once, at the edge, into frozen dataclasses.

Every key is declared exactly once, in ``AGENT_KEYS`` / ``CONTROLLER_KEYS``, with its parser and
default.  A bad value raises ``ConfigError`` naming the file, the key and the value:

    agent.toml: outbound.connect_timeout = "5x" is not a duration (like "300ms", "1s", "2m")

Nothing else in nodemesh reads files or the environment for settings.  Tests build configs with
``agent_config_from_mapping`` / ``controller_config_from_mapping`` without touching disk.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nodemesh.errors import ConfigError

# Ports whose servers speak first or whose protocol is never HTTP: never peeked, always opaque.
# Linkerd's defaults (SMTP, submission, MySQL, Galera, PostgreSQL, Redis, Elasticsearch, memcached).
DEFAULT_OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
# Consul's own ports are never intercepted: server RPC, LAN/WAN gossip, HTTP(S), gRPC, DNS.
DEFAULT_CONSUL_PORTS = (8300, 8301, 8302, 8500, 8501, 8502, 8600)


class _Bad(Exception):
    """Raised by a value parser; the loader turns it into a ConfigError naming file and key."""


# --- value parsers ---------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(v: Any) -> float:
    """``"300ms"`` → 0.3; bare numbers are seconds."""
    if isinstance(v, bool):
        raise _Bad('is not a duration (like "300ms", "1s", "2m")')
    if isinstance(v, int | float) and v >= 0:
        return float(v)
    m = _DURATION.match(v) if isinstance(v, str) else None
    if not m:
        raise _Bad('is not a duration (like "300ms", "1s", "2m")')
    return float(m.group(1)) * _UNIT[m.group(2)]


def _duration_within(v: Any, low: float, high: float, what: str) -> float:
    """A duration from ``low`` to ``high`` seconds; anything else (not a duration, or out of
    range) is refused with ``what``, which names the range."""
    try:
        seconds = parse_duration(v)
    except _Bad:
        seconds = -1.0
    if not low <= seconds <= high:
        raise _Bad(what)
    return seconds


def parse_leaf_ttl(v: Any) -> float:
    """A leaf certificate's lifetime: a duration from 1 s (tests) to 720 h (30 days).  Longer
    leaves outlive the point of short-lived identities; zero would fail every signing."""
    return _duration_within(
        v, 1.0, 720 * 3600.0, 'is not a lifetime from "1s" to "720h" (agents renew at 70 % of it)'
    )


def parse_interval(v: Any) -> float:
    """A reporting interval: a duration from 1 s to 5 m (the controller keeps 10 s slots)."""
    return _duration_within(v, 1.0, 300.0, 'is not an interval from "1s" to "5m"')


def parse_addr(v: Any) -> tuple[str, int]:
    """``"127.0.0.1:4140"`` → ("127.0.0.1", 4140)."""
    if not isinstance(v, str) or ":" not in v:
        raise _Bad('is not an address (like "127.0.0.1:4140")')
    host, _, port = v.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise _Bad("is not an address: the host part must be an IP address") from None
    return host, _port(port)


def _port(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise _Bad("is not a port number (1-65535)")
    try:
        p = int(v)
    except (TypeError, ValueError):
        raise _Bad("is not a port number") from None
    if isinstance(v, bool) or not 0 < p < 65536:
        raise _Bad("is not a port number (1-65535)")
    return p


def parse_ports(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise _Bad("is not a list of port numbers")
    return tuple(_port(p) for p in v)


def parse_cidrs(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise _Bad('is not a list of CIDRs (like ["10.0.0.0/8"])')
    try:
        return tuple(str(ipaddress.ip_network(c, strict=False)) for c in v)
    except (TypeError, ValueError):
        raise _Bad('is not a list of CIDRs (like ["10.0.0.0/8"])') from None


def parse_str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad("is not a string")
    return v


def parse_name(v: Any) -> str:
    """A DNS-label-like name: Consul node, service, datacenter."""
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,126})", v):
        raise _Bad("is not a valid name (letters, digits, '-', '_', '.')")
    return v


def parse_trust_domain(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,250})", v):
        raise _Bad("is not a valid trust domain (lower-case letters, digits, '.', '-')")
    return v


def parse_path(v: Any) -> Path:
    return Path(parse_str(v))


def parse_optional_path(v: Any) -> Path | None:
    return Path(parse_str(v)) if v else None


def parse_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("is not true or false")
    return v


def parse_uid(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**32:
        raise _Bad("is not a uid")
    return v


def parse_level(v: Any) -> str:
    if v not in ("debug", "info", "warning", "error"):
        raise _Bad("is not a log level (debug, info, warning, error)")
    return str(v)


def parse_log_format(v: Any) -> str:
    if v not in ("console", "json"):
        raise _Bad("is not a log format (console, json)")
    return str(v)


def parse_installer(v: Any) -> str:
    if v not in ("agent", "external"):
        raise _Bad(
            'is not "agent" (the agent installs the rules) or "external" (a privileged '
            "step does, e.g. nodemesh-iptables.service)"
        )
    return str(v)


def parse_positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _Bad("is not a positive integer")
    return v


# --- the schema --------------------------------------------------------------------------------

Parser = Callable[[Any], Any]
# key -> (parser, default as it would be written in the file; None = computed or optional)
Schema = Mapping[str, tuple[Parser, Any]]

AGENT_KEYS: Schema = {
    "agent.node": (parse_name, None),  # default: this host's name, as Consul's agent uses it
    "agent.datacenter": (parse_name, "dc1"),
    "agent.trust_domain": (parse_trust_domain, "nodemesh.local"),
    "agent.state_dir": (parse_path, "/var/lib/nodemesh"),
    "agent.proxy_uid": (parse_uid, None),  # default: the agent's own effective uid
    "listen.outbound": (parse_addr, "127.0.0.1:4140"),
    "listen.inbound": (parse_addr, "0.0.0.0:4143"),
    "listen.admin": (parse_addr, "127.0.0.1:4191"),
    "listen.advertise": (parse_str, ""),  # address peers dial; default: this node's Consul address
    "outbound.connect_timeout": (parse_duration, "1s"),
    "outbound.detect_timeout": (parse_duration, "10s"),
    "outbound.idle_timeout": (parse_duration, "60s"),
    "outbound.opaque_ports": (parse_ports, list(DEFAULT_OPAQUE_PORTS)),
    "outbound.max_idle_per_peer": (parse_positive_int, 64),
    "inbound.connect_timeout": (parse_duration, "300ms"),
    "inbound.idle_timeout": (parse_duration, "90s"),
    "interception.enabled": (parse_bool, True),
    "interception.install": (parse_installer, "agent"),
    "interception.exclude_ports": (parse_ports, []),
    "interception.exclude_cidrs": (parse_cidrs, []),
    "interception.consul_ports": (parse_ports, list(DEFAULT_CONSUL_PORTS)),
    "consul.address": (parse_addr, "127.0.0.1:8500"),
    "consul.token": (parse_str, ""),
    "controller.address": (parse_str, ""),  # host:port; default: found in Consul
    "controller.ca_file": (parse_path, "/etc/nodemesh/ca.pem"),
    "controller.join_token_file": (parse_path, "/etc/nodemesh/join-token"),
    "shutdown.grace": (parse_duration, "120s"),
    "telemetry.interval": (parse_interval, "10s"),
    "log.level": (parse_level, "info"),
    "log.format": (parse_log_format, "console"),
}

CONTROLLER_KEYS: Schema = {
    "controller.node": (parse_name, None),
    "controller.datacenter": (parse_name, "dc1"),
    "controller.trust_domain": (parse_trust_domain, "nodemesh.local"),
    "controller.state_dir": (parse_path, "/var/lib/nodemesh-controller"),
    "controller.listen": (parse_addr, "0.0.0.0:4190"),
    "controller.advertise": (parse_str, ""),  # address registered in Consul; default: node's
    "controller.join_token_file": (parse_path, "/etc/nodemesh/join-token"),
    "controller.leaf_ttl": (parse_leaf_ttl, "24h"),
    "ca.cert_file": (parse_optional_path, ""),  # operator-supplied root/intermediate (PEM)
    "ca.key_file": (parse_optional_path, ""),
    "ca.chain_file": (parse_optional_path, ""),  # chain up to the root, when cert is intermediate
    "consul.address": (parse_addr, "127.0.0.1:8500"),
    "consul.token": (parse_str, ""),
    "log.level": (parse_level, "info"),
    "log.format": (parse_log_format, "console"),
}


@dataclass(frozen=True)
class AgentConfig:
    node: str
    datacenter: str
    trust_domain: str
    state_dir: Path
    proxy_uid: int | None
    outbound_addr: tuple[str, int]
    inbound_addr: tuple[str, int]
    admin_addr: tuple[str, int]
    advertise: str
    outbound_connect_timeout: float
    detect_timeout: float
    outbound_idle_timeout: float
    opaque_ports: frozenset[int]
    max_idle_per_peer: int
    inbound_connect_timeout: float
    inbound_idle_timeout: float
    interception: bool
    interception_install: str  # "agent": installed and removed by the agent; "external"
    exclude_ports: tuple[int, ...]
    exclude_cidrs: tuple[str, ...]
    consul_ports: tuple[int, ...]
    consul_addr: tuple[str, int]
    consul_token: str
    controller_address: str
    ca_file: Path
    join_token_file: Path
    shutdown_grace: float
    log_level: str
    log_format: str
    telemetry_interval: float


@dataclass(frozen=True)
class ControllerConfig:
    node: str
    datacenter: str
    trust_domain: str
    state_dir: Path
    listen: tuple[str, int]
    advertise: str
    join_token_file: Path
    leaf_ttl: float
    ca_cert_file: Path | None
    ca_key_file: Path | None
    ca_chain_file: Path | None
    consul_addr: tuple[str, int]
    consul_token: str
    log_level: str
    log_format: str


def _flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in raw.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: {section} must be a [{section}] table")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _resolve(raw: Mapping[str, Any], schema: Schema, source: str) -> dict[str, Any]:
    flat = _flatten(raw, source)
    unknown = sorted(set(flat) - set(schema))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]} (known keys are in docs/config.md)")
    out: dict[str, Any] = {}
    for key, (parser, default) in schema.items():
        value = flat.get(key, default)
        if value is None:
            out[key] = None
            continue
        try:
            out[key] = parser(value)
        except _Bad as e:
            raise ConfigError(f"{source}: {key} = {_show(value)} {e}") from None
    return out


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass --config with an existing file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; make it readable by nodemesh") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; pass --config with a TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def agent_config_from_mapping(raw: Mapping[str, Any], source: str = "agent.toml") -> AgentConfig:
    v = _resolve(raw, AGENT_KEYS, source)
    return AgentConfig(
        node=v["agent.node"] or socket.gethostname(),
        datacenter=v["agent.datacenter"],
        trust_domain=v["agent.trust_domain"],
        state_dir=v["agent.state_dir"],
        proxy_uid=v["agent.proxy_uid"],
        outbound_addr=v["listen.outbound"],
        inbound_addr=v["listen.inbound"],
        admin_addr=v["listen.admin"],
        advertise=v["listen.advertise"],
        outbound_connect_timeout=v["outbound.connect_timeout"],
        detect_timeout=v["outbound.detect_timeout"],
        outbound_idle_timeout=v["outbound.idle_timeout"],
        opaque_ports=frozenset(v["outbound.opaque_ports"]),
        max_idle_per_peer=v["outbound.max_idle_per_peer"],
        inbound_connect_timeout=v["inbound.connect_timeout"],
        inbound_idle_timeout=v["inbound.idle_timeout"],
        interception=v["interception.enabled"],
        interception_install=v["interception.install"],
        exclude_ports=v["interception.exclude_ports"],
        exclude_cidrs=v["interception.exclude_cidrs"],
        consul_ports=v["interception.consul_ports"],
        consul_addr=v["consul.address"],
        consul_token=v["consul.token"],
        controller_address=v["controller.address"],
        ca_file=v["controller.ca_file"],
        join_token_file=v["controller.join_token_file"],
        shutdown_grace=v["shutdown.grace"],
        log_level=v["log.level"],
        log_format=v["log.format"],
        telemetry_interval=v["telemetry.interval"],
    )


# AgentConfig fields the running agent reads at each use, so a reload (SIGHUP) applies them
# to new connections and requests at once.  Every other field is bound at start (listeners,
# identities, pools, Consul and controller clients, interception) and needs a restart.
RELOADABLE = frozenset(
    {
        "outbound_connect_timeout",
        "detect_timeout",
        "opaque_ports",
        "inbound_connect_timeout",
        "inbound_idle_timeout",
        "shutdown_grace",
        "log_level",
        "log_format",
    }
)


CONTROLLER_RELOADABLE = frozenset({"log_level", "log_format"})
_Config = TypeVar("_Config", "AgentConfig", "ControllerConfig")


def reload_plan(
    old: _Config, new: _Config, reloadable: frozenset[str] = RELOADABLE
) -> tuple[_Config, list[str], list[str]]:
    """(the config to run with, fields applied, fields that changed but need a restart).

    The result is ``new`` for every reloadable field and ``old`` for the rest, so a reload never
    half-applies a change the running daemon cannot honour."""
    applied: list[str] = []
    pending: list[str] = []
    keep: dict[str, Any] = {}
    for f in dataclasses.fields(old):
        if getattr(old, f.name) == getattr(new, f.name):
            continue
        if f.name in reloadable:
            applied.append(f.name)
        else:
            pending.append(f.name)
            keep[f.name] = getattr(old, f.name)
    return dataclasses.replace(new, **keep), applied, pending


def controller_config_from_mapping(
    raw: Mapping[str, Any], source: str = "controller.toml"
) -> ControllerConfig:
    v = _resolve(raw, CONTROLLER_KEYS, source)
    cert, key = v["ca.cert_file"], v["ca.key_file"]
    if (cert is None) != (key is None):
        raise ConfigError(f"{source}: ca.cert_file and ca.key_file must be set together")
    return ControllerConfig(
        node=v["controller.node"] or socket.gethostname(),
        datacenter=v["controller.datacenter"],
        trust_domain=v["controller.trust_domain"],
        state_dir=v["controller.state_dir"],
        listen=v["controller.listen"],
        advertise=v["controller.advertise"],
        join_token_file=v["controller.join_token_file"],
        leaf_ttl=v["controller.leaf_ttl"],
        ca_cert_file=cert,
        ca_key_file=key,
        ca_chain_file=v["ca.chain_file"],
        consul_addr=v["consul.address"],
        consul_token=v["consul.token"],
        log_level=v["log.level"],
        log_format=v["log.format"],
    )


def load_agent_config(path: Path) -> AgentConfig:
    return agent_config_from_mapping(_read(path), str(path))


def load_controller_config(path: Path) -> ControllerConfig:
    return controller_config_from_mapping(_read(path), str(path))


SECRET_MIN, SECRET_MAX = 16, 4096  # characters of a join token


def read_secret(path: Path, what: str) -> str:
    """Read a one-line secret file (the join token); errors say which file and how to fix it.

    The file must not be readable by every local user nor writable by anyone but its owner
    (a world-readable token lets any local user ask for the node's identity), and the token
    must be 16 to 4,096 printable characters: a short one can be guessed, and the file is read
    whole into memory."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(SECRET_MAX + 2)  # a token, its newline, and one byte to tell "longer"
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; write the cluster's {what} there") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; make the {what} readable") from None
    if mode & 0o026:  # world-readable, or writable by group or others
        who = "every local user can read it" if mode & 0o004 else "others can change it"
        raise ConfigError(
            f"{path}: mode {mode & 0o777:04o}: {who}; chmod 0640 (owner root, group of the "
            "daemon's user) or 0600"
        )
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        value = "\x00"  # refused below as not printable
    if not value:
        raise ConfigError(f"{path}: is empty; write the cluster's {what} there")
    if len(raw) > SECRET_MAX + 1 or len(value) > SECRET_MAX:
        raise ConfigError(f"{path}: the {what} is longer than {SECRET_MAX} characters")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise ConfigError(f"{path}: the {what} must be one line of printable ASCII, no spaces")
    if len(value) < SECRET_MIN:
        raise ConfigError(
            f"{path}: the {what} has {len(value)} characters, fewer than {SECRET_MIN}; "
            "write a long random one (openssl rand -base64 32)"
        )
    return value
