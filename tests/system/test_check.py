"""``nodemesh check`` on a real agent host: healthy first, then each broken condition we can
induce, with the × (or ‼) and the hint it must show.

One lab (Consul server, controller, h1 with shop, h2 with web); ``nodemesh check`` runs inside
h1 as root, as an operator would run it.  Every case restores what it broke before the next
one, so each starts from a healthy host; iptables is only ever changed inside h1's namespace.

NODEMESH_CHECK_SAMPLES=DIR writes each case's output there (docs/check.md quotes them).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nodemesh.agent import iptables
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from nodemesh.lab import configs
from nodemesh.lab.mesh import NODEMESH_USER, AppSpec, Lab, LabSpec

pytestmark = pytest.mark.system

HOST = "h1"
POLL_LIMIT = 15.0  # seconds for Consul to notice a stopped app's failing check


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    return LabSpec(
        servers=1,
        hosts=2,
        apps=(AppSpec("h2", "web", 8080), AppSpec("h1", "shop", 8090, ("web",))),
    )


class Run:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def line(self, fragment: str) -> str:
        """The result line holding ``fragment``, and the hint under it when there is one."""
        lines = self.out.splitlines()
        for i, ln in enumerate(lines):
            if fragment in ln and ln[:1] in ("√", "×", "‼"):
                hint = lines[i + 1] if i + 1 < len(lines) and lines[i + 1][:4] == "    " else ""
                return f"{ln}\n{hint}".rstrip()
        raise AssertionError(f"no result line with {fragment!r} in:\n{self.out}")


def _check(lab: Lab, *args: str, config: Path | None = None, sample: str = "") -> Run:
    cfg = config or lab.dir / HOST / "agent.toml"
    argv = [str(lab.bin / "nodemesh"), "check", "--config", str(cfg), *args]
    p = lab.exec(HOST, argv, check=False, timeout=30.0)
    run = Run(p.returncode, p.stdout.decode(), p.stderr.decode())
    keep = os.environ.get("NODEMESH_CHECK_SAMPLES")
    if keep and sample:
        shown = run.out.replace(str(lab.dir), "/var/lib/lab")
        cmd = " ".join(["nodemesh check", *args])
        Path(keep, f"{sample}.txt").write_text(f"$ {cmd}\n{shown}(exit status {run.rc})\n")
    return run


def _failed(run: Run, fragment: str, hint: str) -> None:
    got = run.line(fragment)
    assert got.startswith("×"), got
    assert hint in got.splitlines()[1], got
    assert run.rc == 1, run.out
    assert run.out.rstrip().endswith("Status check results are ×"), run.out


def _ns(lab: Lab) -> str:
    return lab.host(HOST).netns


@contextmanager
def _nat_restored(lab: Lab) -> Iterator[None]:
    """Save h1's nat table and put it back exactly, whatever the case did to it."""
    saved = lab.exec(HOST, ["iptables-save", "-t", "nat"]).stdout
    try:
        yield
    finally:
        lab.exec(HOST, ["iptables-restore"], input=saved)


def _nat(lab: Lab, *args: str) -> None:
    lab.exec(HOST, ["iptables", "-w", "5", "-t", "nat", *args])


def _cert_path(lab: Lab, service: str) -> Path:
    return lab.dir / HOST / "agent-state" / "identity" / f"svc-{service}.pem"


@contextmanager
def _file_restored(path: Path) -> Iterator[None]:
    saved = path.read_bytes()
    try:
        yield
    finally:
        user = pwd.getpwnam(NODEMESH_USER)
        path.write_bytes(saved)
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o600)


def _signed_pair(lab: Lab, service: str, ttl: float) -> bytes:
    """A key and a certificate for ``service`` from the lab's own CA, valid for ``ttl`` s."""
    ca = CertificateAuthority.load_state(lab.ca_state)
    ident = spiffe.service_id(configs.TRUST_DOMAIN, configs.DATACENTER, service)
    key = keys.generate_key()
    return key + ca.sign_csr(keys.make_csr(key, ident), ident, ttl)


# --- healthy ----------------------------------------------------------------------------------


def test_healthy_host_passes_every_check(lab: Lab) -> None:
    run = _check(lab, sample="healthy")
    assert run.rc == 0, run.out
    marks = [ln[0] for ln in run.out.splitlines() if ln[:1] in ("√", "×", "‼")]
    assert marks and set(marks) == {"√"}, run.out
    assert run.out.rstrip().endswith("Status check results are √")
    for fragment in (
        "consul is reachable at 127.0.0.1:8500",
        "node h1 is in Consul's catalog",
        "clock agrees with Consul's",
        "clock agrees with the controller's",
        "outbound listener is up on 127.0.0.1:4140",
        "agent is registered in Consul as nodemesh-h1",
        f"the agent's uid {pwd.getpwnam(NODEMESH_USER).pw_uid} is excluded before the REDIRECT",
        "certificate for service shop is valid",
        "services registered on node h1: shop (shop-h1-8090)",
        "controller is reachable over mTLS",
    ):
        run.line(fragment)


def test_json_lists_the_same_results(lab: Lab) -> None:
    text = _check(lab)
    run = _check(lab, "-o", "json")
    doc: list[dict[str, Any]] = json.loads(run.out)
    assert run.rc == 0
    assert {tuple(sorted(d)) for d in doc} == {
        ("hint", "level", "message", "name", "ok", "section")
    }
    assert all(d["ok"] for d in doc)
    shown = [ln[2:] for ln in text.out.splitlines() if ln[:1] == "√"]
    assert [d["message"] for d in doc] == shown


# --- config -------------------------------------------------------------------------------------


def test_bad_config_key_and_value(lab: Lab) -> None:
    base = tomllib.loads((lab.dir / HOST / "agent.toml").read_text())
    bad = lab.dir / HOST / "bad.toml"
    bad.write_text(configs.to_toml(configs.merge(base, {"listen": {"outbund": "127.0.0.1:1"}})))
    run = _check(lab, config=bad, sample="bad-config")
    _failed(run, "unknown key listen.outbund", "fix what is named above in")
    bad.write_text(configs.to_toml(configs.merge(base, {"outbound": {"connect_timeout": "5x"}})))
    run = _check(lab, config=bad)
    _failed(run, 'outbound.connect_timeout = "5x" is not a duration', "docs/config.md")


# --- identity -----------------------------------------------------------------------------------


def test_deleted_service_certificate(lab: Lab) -> None:
    path = _cert_path(lab, "shop")
    with _file_restored(path):
        path.unlink()
        run = _check(lab, sample="cert-deleted")
        _failed(run, "certificate for service shop: no file", "the agent requests it once")
    assert _check(lab).rc == 0


def test_expired_and_expiring_service_certificate(lab: Lab) -> None:
    path = _cert_path(lab, "shop")
    with _file_restored(path):
        pair = _signed_pair(lab, "shop", ttl=1.0)
        time.sleep(1.2)
        path.write_bytes(pair)
        run = _check(lab, sample="cert-expired")
        _failed(run, "certificate for service shop expired", "the agent renews at 70 %")
        # Back-dated 60 s with 10 s to go: past 80 % of its lifetime, valid, renewal overdue.
        path.write_bytes(_signed_pair(lab, "shop", ttl=10.0))
        run = _check(lab)
        got = run.line("certificate for service shop expires in")
        assert got.startswith("‼") and "renewal is overdue" in got, got
        assert run.rc == 0, run.out
        assert _check(lab, "--strict").rc == 1
    assert _check(lab).rc == 0


# --- interception -------------------------------------------------------------------------------


def test_flushed_and_removed_chain(lab: Lab) -> None:
    with _nat_restored(lab):
        _nat(lab, "-F", "NODEMESH_OUTPUT")
        run = _check(lab, sample="chain-flushed")
        _failed(
            run, "chain NODEMESH_OUTPUT is empty", "restart the agent (systemctl restart nodemesh)"
        )
        _nat(lab, "-D", "OUTPUT", *iptables.JUMP_RULE)
        _nat(lab, "-X", "NODEMESH_OUTPUT")
        run = _check(lab)
        _failed(run, "chain NODEMESH_OUTPUT is missing", "restart the agent")
    assert _check(lab).rc == 0


def test_duplicated_jump(lab: Lab) -> None:
    with _nat_restored(lab):
        _nat(lab, "-A", "OUTPUT", "-p", "tcp", "-j", "NODEMESH_OUTPUT")
        run = _check(lab, sample="jump-duplicated")
        _failed(run, "OUTPUT jumps to NODEMESH_OUTPUT 2 times", "exactly one")
    assert _check(lab).rc == 0


def test_redirect_loop(lab: Lab) -> None:
    uid = str(pwd.getpwnam(NODEMESH_USER).pw_uid)
    with _nat_restored(lab):
        # Keep the lab itself out of a real loop while the uid rule is gone: the agent's (and
        # this check's) connections to the controller return before the REDIRECT anyway.
        _nat(
            lab,
            "-I",
            "NODEMESH_OUTPUT",
            "1",
            "-p",
            "tcp",
            "--dport",
            str(configs.CONTROLLER_PORT),
            "-j",
            "RETURN",
        )
        _nat(lab, "-D", "NODEMESH_OUTPUT", "2")  # the uid exclusion, now second
        run = _check(lab, sample="uid-rule-removed")
        _failed(
            run,
            f"no rule excludes the agent's uid {uid}",
            "reinstalls the chain and exactly one jump",
        )
        _nat(
            lab, "-I", "NODEMESH_OUTPUT", "2", "-m", "owner", "--uid-owner", "4242", "-j", "RETURN"
        )
        run = _check(lab)
        _failed(
            run,
            f"the rules exclude uid 4242 but the agent runs as uid {uid}",
            f"set agent.proxy_uid = {uid}",
        )
    assert _check(lab).rc == 0


# --- services, controller, agent, consul --------------------------------------------------------


def test_local_service_check_failing(lab: Lab) -> None:
    app = lab.apps[HOST, "shop"]
    app.signal(signal.SIGSTOP)  # its HTTP check times out: Consul marks it critical
    try:
        deadline = time.monotonic() + POLL_LIMIT
        while True:
            run = _check(lab, sample="service-check-failing")
            if run.rc == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        _failed(
            run,
            "shop instance shop-h1-8090: check 'shop HTTP' is critical",
            "fix shop on this host or deregister it",
        )
    finally:
        app.signal(signal.SIGCONT)
    lab.wait_apps_passing([(HOST, "shop")])
    assert _check(lab).rc == 0


def test_controller_stopped_is_a_warning(lab: Lab) -> None:
    lab.stop_controller()
    try:
        run = _check(lab, sample="controller-stopped")
        assert run.rc == 0, run.out
        doc = json.loads(_check(lab, "-o", "json").out)
        (ctl,) = [d for d in doc if d["name"] == "controller-reachable"]
        assert ctl["level"] == "warning" and "the mesh keeps serving" in ctl["hint"], ctl
        assert [d for d in doc if d["level"] != "ok"] == [ctl]
        assert f"‼ {ctl['message']}" in run.out
        assert run.out.rstrip().endswith("Status check results are √")
        assert _check(lab, "--strict").rc == 1
    finally:
        lab.start_controller()
    assert _check(lab).rc == 0


def test_agent_stopped(lab: Lab) -> None:
    lab.stop_agent(HOST)
    try:
        run = _check(lab, sample="agent-stopped")
        _failed(
            run,
            "outbound listener is down: nothing listens on 127.0.0.1:4140",
            "start the agent (systemctl start nodemesh)",
        )
        _failed(run, "admin listener is down", "start the agent")
        _failed(
            run,
            "the agent is not registered in Consul on node h1",
            "registers itself once it is ready",
        )
        # A clean stop removes the rules: nothing is redirected to the closed port.
        _failed(
            run,
            "chain NODEMESH_OUTPUT is missing",
            "start the agent (systemctl start nodemesh): it installs",
        )
        assert "agent answers /live" not in run.out
    finally:
        lab.start_agent(HOST)
    assert _check(lab).rc == 0


def test_consul_agent_stopped(lab: Lab) -> None:
    assert lab.consul is not None
    lab.consul.stop_agent(HOST)
    try:
        run = _check(lab, sample="consul-stopped")
        _failed(
            run,
            "consul is not reachable at 127.0.0.1:8500: connection refused",
            "start the local Consul agent",
        )
        assert "consul has a leader" not in run.out
    finally:
        lab.consul.start_agent(HOST)
        lab.consul.wait_ready()


def _nat_rules(lab: Lab) -> str:
    # -S: the rules without packet counters, which move with every connection
    return lab.exec(HOST, ["iptables", "-w", "5", "-t", "nat", "-S"]).stdout.decode()


def test_pre_reads_only(lab: Lab) -> None:
    before = _nat_rules(lab)
    run = _check(lab, "--pre", sample="pre-agent-running")
    # The agent holds its ports: --pre on a host that already runs it says so.
    _failed(run, "listen.outbound 127.0.0.1:4140 is taken", "stop that program")
    run.line("the kernel has the owner match")
    run.line("user nodemesh exists")
    assert _nat_rules(lab) == before
