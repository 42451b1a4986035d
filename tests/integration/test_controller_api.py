"""The controller against a real Consul (``consul agent -dev`` on loopback, moved ports).

The dev agent's node is ``nm-ctl-test`` at 127.0.0.1, so requests from 127.0.0.1 come "from the
node" and requests bound to 127.0.0.2 do not.  Each test runs the real daemon
(``serve_controller``) and speaks real HTTPS to it, either through ``ControllerClient`` or
byte by byte when the point is bad input.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from nodemesh.config import controller_config_from_mapping
from nodemesh.controller.catalog import CONTROLLER_SERVICE
from nodemesh.controller.daemon import serve_controller
from nodemesh.identity import keys, spiffe, tls
from nodemesh.identity.client import ControllerClient, ControllerRefused, ControllerUnavailable
from nodemesh.identity.store import IdentityStore, serve_identities
from tests.integration.devconsul import NODE, DevConsul, free_ports

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TD = "mesh.test"
DC = "dc1"
TOKEN = "s3cret-join-token"


# --- a real controller -----------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    port: int
    roots: bytes
    state_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str = TOKEN) -> ControllerClient:
        return ControllerClient(lambda: self.address, self.roots, token)


def _config(tmp: Path, consul_port: int, leaf_ttl: str = "1h") -> object:
    (tmp / "join-token").write_text(TOKEN + "\n")
    (tmp / "join-token").chmod(0o600)
    cfg = controller_config_from_mapping(
        {
            "controller": {
                "node": NODE,
                "datacenter": DC,
                "trust_domain": TD,
                "state_dir": str(tmp / "controller"),
                "join_token_file": str(tmp / "join-token"),
                "leaf_ttl": leaf_ttl,
            },
            "consul": {"address": f"127.0.0.1:{consul_port}"},
        }
    )
    return replace(cfg, listen=("127.0.0.1", 0))


async def _start(nursery: trio.Nursery, cfg: object) -> Running:
    _, port = await nursery.start(serve_controller, cfg)
    state = cfg.state_dir  # type: ignore[attr-defined]
    return Running(port, (state / "ca.pem").read_bytes(), state)


@pytest.fixture
async def ctl(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[Running]:
    yield await _start(nursery, _config(tmp_path, dev_consul.http_port))


def _node_csr(node: str = NODE) -> tuple[bytes, bytes]:
    key = keys.generate_key()
    return key, keys.make_csr(key, spiffe.node_id(TD, DC, node))


def _svc_csr(name: str) -> tuple[bytes, bytes]:
    key = keys.generate_key()
    return key, keys.make_csr(key, spiffe.service_id(TD, DC, name))


# --- signing -------------------------------------------------------------------------------------


async def test_prints_the_listening_line(ctl: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"nodemesh controller listening on 127.0.0.1:{ctl.port}\n" in capsys.readouterr().out


async def test_node_cert_for_a_known_node_from_its_own_address(ctl: Running) -> None:
    key, csr = _node_csr()
    signed = await ctl.client().sign_node(csr)
    info = keys.leaf_info(signed.certificate)
    assert info.identity == spiffe.node_id(TD, DC, NODE)
    assert signed.roots == ctl.roots
    assert signed.not_after == info.not_after
    assert 3500 < info.not_after - time.time() <= 3600
    assert keys.public_keys_match(signed.certificate, key)
    # The pair is usable at once: a context builds from it (key matches, chain parses).
    tls.client_context(signed.certificate, key, signed.roots)


async def test_wrong_join_token_is_401(ctl: Running) -> None:
    with pytest.raises(ControllerRefused) as e:
        await ctl.client(token="guess").sign_node(_node_csr()[1])
    assert e.value.status == 401
    assert "join token does not match" in e.value.message


async def test_unknown_node_is_403(ctl: Running) -> None:
    with pytest.raises(ControllerRefused) as e:
        await ctl.client().sign_node(_node_csr("ghost")[1])
    assert e.value.status == 403
    assert "'ghost' is not in Consul's catalog" in e.value.message


async def test_a_case_variant_of_the_node_name_is_403(ctl: Running) -> None:
    """Consul's catalog finds the node under any case of its name; the identity is not."""
    with pytest.raises(ControllerRefused) as e:
        await ctl.client().sign_node(_node_csr(NODE.upper())[1])
    assert e.value.status == 403
    assert f"Consul names this node {NODE!r}, not {NODE.upper()!r}" in e.value.message


async def test_node_cert_from_another_address_is_403(ctl: Running) -> None:
    body = json.dumps({"csr": _node_csr()[1].decode()}).encode()
    status, doc = await _request(
        ctl,
        "POST",
        "/v1/sign/node",
        body,
        [("authorization", f"Bearer {TOKEN}")],
        local_address="127.0.0.2",
    )
    assert status == 403
    assert "comes from 127.0.0.2 but Consul has node 'nm-ctl-test' at 127.0.0.1" in doc["error"]


async def test_service_cert_only_for_a_service_registered_on_the_callers_node(
    ctl: Running,
) -> None:
    client = ctl.client()
    node_key, csr = _node_csr()
    node = await client.sign_node(csr)

    key, csr = _svc_csr("web")
    signed = await client.sign_service(csr, "web", node.certificate, node_key)
    assert keys.leaf_info(signed.certificate).identity == spiffe.service_id(TD, DC, "web")
    assert keys.public_keys_match(signed.certificate, key)

    with pytest.raises(ControllerRefused) as e:
        await client.sign_service(_svc_csr("db")[1], "db", node.certificate, node_key)
    assert e.value.status == 403
    assert "no service 'db' registered on node 'nm-ctl-test'" in e.value.message


async def test_service_csr_asking_for_another_name_still_gets_the_checked_one(
    ctl: Running,
) -> None:
    client = ctl.client()
    node_key, csr = _node_csr()
    node = await client.sign_node(csr)
    _, sneaky = _svc_csr("db")  # asks for db, requests web (which is registered)
    signed = await client.sign_service(sneaky, "web", node.certificate, node_key)
    assert keys.leaf_info(signed.certificate).identity == spiffe.service_id(TD, DC, "web")


async def test_service_endpoint_needs_a_node_client_cert(ctl: Running) -> None:
    body = json.dumps({"csr": _svc_csr("web")[1].decode(), "service": "web"}).encode()
    status, doc = await _request(ctl, "POST", "/v1/sign/service", body)
    assert status == 401
    assert "client cert" in doc["error"]


async def test_controller_registers_in_consul_and_deregisters_on_stop(
    dev_consul: DevConsul, tmp_path: Path
) -> None:
    c = dev_consul.client()

    async def instances() -> list[dict[str, object]]:
        return await trio.to_thread.run_sync(lambda: c.health.service(CONTROLLER_SERVICE)[1])

    async with trio.open_nursery() as nursery:
        ctl = await _start(nursery, _config(tmp_path, dev_consul.http_port))
        with trio.fail_after(10):
            while True:
                found = await instances()
                if found:
                    break
                await trio.sleep(0.1)
        svc = found[0]["Service"]
        assert isinstance(svc, dict)
        assert (svc["Address"], svc["Port"]) == ("127.0.0.1", ctl.port)
        checks = found[0]["Checks"]
        assert isinstance(checks, list)
        assert any(ch["Type"] == "tcp" for ch in checks)
        nursery.cancel_scope.cancel()
    assert await instances() == []


async def test_consul_down_is_503_and_names_consul(tmp_path: Path, nursery: trio.Nursery) -> None:
    (dead,) = free_ports(1)
    ctl = await _start(nursery, _config(tmp_path, dead))
    with pytest.raises(ControllerRefused) as e:
        await ctl.client().sign_node(_node_csr()[1])
    assert e.value.status == 503
    assert f"Consul at 127.0.0.1:{dead} is unreachable" in e.value.message


async def test_client_reports_an_unreachable_controller() -> None:
    (dead,) = free_ports(1)
    roots = keys.generate_key()  # not even a cert: construction must refuse it
    with pytest.raises(Exception, match="trust bundle"):
        ControllerClient(lambda: f"127.0.0.1:{dead}", roots, TOKEN)


async def test_client_reports_a_controller_that_is_not_listening(ctl: Running) -> None:
    (dead,) = free_ports(1)
    client = ControllerClient(lambda: f"127.0.0.1:{dead}", ctl.roots, TOKEN)
    with pytest.raises(ControllerUnavailable, match=f"127.0.0.1:{dead} unreachable"):
        await client.health()
    nowhere = ControllerClient(lambda: "", ctl.roots, TOKEN)
    with pytest.raises(ControllerUnavailable, match=r"controller\.address"):
        await nowhere.health()


# --- bad input never harms the server --------------------------------------------------------


async def _tls(
    ctl: Running, local_address: str | None = None, pair: tuple[bytes, bytes] | None = None
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", ctl.port, local_address=local_address)
    ctx = tls.client_context(*(pair or (None, None)), ctl.roots, alpn=("http/1.1",))
    ctx.check_hostname = True
    stream = trio.SSLStream(tcp, ctx, server_hostname="nodemesh-controller", https_compatible=True)
    await stream.do_handshake()
    return stream


async def _read_response(
    conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream]
) -> tuple[int, bytes, dict[bytes, bytes]]:
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body, headers
        else:
            raise AssertionError(f"unexpected {event!r}")


async def _request(
    ctl: Running,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    local_address: str | None = None,
) -> tuple[int, dict[str, str]]:
    with trio.fail_after(10):
        stream = await _tls(ctl, local_address)
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "x"), ("content-length", str(len(body))), *(headers or [])]
        await stream.send_all(
            conn.send(h11.Request(method=method, target=path, headers=head))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        status, raw, _ = await _read_response(conn, stream)
        await stream.aclose()
    return status, json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode()}


async def _healthy(ctl: Running) -> None:
    status, doc = await _request(ctl, "GET", "/v1/health")
    assert (status, doc) == (200, {"status": "ok"})


async def test_roots_health_unknown_path_and_wrong_method(ctl: Running) -> None:
    await _healthy(ctl)
    status, doc = await _request(ctl, "GET", "/v1/ca/roots")
    assert (status, doc["raw"].encode()) == (200, ctl.roots)
    status, doc = await _request(ctl, "GET", "/v1/nothing")
    assert status == 404
    status, doc = await _request(ctl, "GET", "/v1/sign/node")
    assert status == 405


async def test_keep_alive_serves_several_requests_on_one_connection(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):
            req = h11.Request(method="GET", target="/v1/health", headers=[("host", "x")])
            await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
            status, _, _ = await _read_response(conn, stream)
            assert status == 200
            conn.start_next_cycle()
        await stream.aclose()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", 'string field "csr"'),
        (b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n"}', "CSR is not a PEM"),
    ],
)
async def test_malformed_bodies_are_400_with_one_sentence(
    ctl: Running, body: bytes, expected: str
) -> None:
    status, doc = await _request(
        ctl, "POST", "/v1/sign/node", body, [("authorization", f"Bearer {TOKEN}")]
    )
    assert status == 400
    assert expected in doc["error"]
    await _healthy(ctl)


async def test_oversized_body_is_413_before_it_is_read(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        conn = h11.Connection(h11.CLIENT)
        auth = ("authorization", f"Bearer {TOKEN}")  # admitted: the size is what refuses it
        head = [("host", "x"), ("content-length", str(10 * 1024 * 1024)), auth]
        req = h11.Request(method="POST", target="/v1/sign/node", headers=head)
        await stream.send_all(conn.send(req) + conn.send(h11.Data(data=b"x" * 1000)))
        status, body, headers = await _read_response(conn, stream)
        assert status == 413
        assert headers[b"connection"] == b"close"
        assert b"over 65536 bytes" in body
        await trio.aclose_forcefully(stream)
    await _healthy(ctl)


async def test_chunked_body_over_the_limit_is_413(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "x"), ("transfer-encoding", "chunked")]
        head.append(("authorization", f"Bearer {TOKEN}"))  # admitted: the size refuses it
        await stream.send_all(
            conn.send(h11.Request(method="POST", target="/v1/sign/node", headers=head))
        )
        for _ in range(20):  # 160 KiB; the server answers 413 and drains the rest
            await stream.send_all(conn.send(h11.Data(data=b"y" * 8192)))
        status, _, _ = await _read_response(conn, stream)
        assert status == 413
        await trio.aclose_forcefully(stream)
    await _healthy(ctl)


async def test_oversized_headers_are_431(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        raw = b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(raw)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        status, _, _ = await _read_response(conn, stream)
        assert status == 431
        await trio.aclose_forcefully(stream)
    await _healthy(ctl)


async def test_garbage_instead_of_http_is_400(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        await stream.send_all(b"\x00\x01 hello there\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        status, _, _ = await _read_response(conn, stream)
        assert status == 400
        await trio.aclose_forcefully(stream)
    await _healthy(ctl)


async def test_garbage_bytes_instead_of_tls_are_dropped(ctl: Running) -> None:
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", ctl.port)
        await tcp.send_all(b"GET / HTTP/1.1\r\nhost: plain-text\r\n\r\n" + bytes(range(256)))
        data = b""
        while chunk := await tcp.receive_some(65536):
            data += chunk
        await tcp.aclose()
    assert b"HTTP/1.1 200" not in data  # at most a TLS alert, then close
    await _healthy(ctl)


async def test_client_that_resets_mid_request_harms_nobody(ctl: Running) -> None:
    with trio.fail_after(10):
        stream = await _tls(ctl)
        body = json.dumps({"csr": _node_csr()[1].decode()}).encode()
        head = (
            f"POST /v1/sign/node HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        await stream.send_all(head + body[: len(body) // 2])
        sock = stream.transport_stream.socket
        # SO_LINGER 0 makes close() send a RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    await _healthy(ctl)


async def test_a_slow_handshake_does_not_block_others(ctl: Running) -> None:
    with trio.fail_after(10):
        idle = await trio.open_tcp_stream("127.0.0.1", ctl.port)  # never says anything
        await _healthy(ctl)
        await idle.aclose()


async def _wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while True:
            if predicate():
                return
            await trio.sleep(0.05)


# --- end to end: the agent's rotation against this controller ---------------------------------


async def test_rotation_renews_and_keeps_open_connections(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery
) -> None:
    ctl = await _start(nursery, _config(tmp_path, dev_consul.http_port, leaf_ttl="4s"))
    agent_state = tmp_path / "agent"
    store = IdentityStore(TD, DC, NODE, agent_state, alpn=("http/1.1",))
    wanted = {"web"}
    with trio.fail_after(10):
        await nursery.start(serve_identities, store, ctl.client(), lambda: set(wanted))
    assert store.ready()
    web = spiffe.service_id(TD, DC, "web")
    await _wait_until(lambda: store.held(web) is not None)
    first = store.held(web)
    assert first is not None

    # A long-lived mTLS connection to "web", opened before rotation.
    async def echo(stream: trio.SocketStream) -> None:
        s = trio.SSLStream(stream, store.server_context(), server_side=True)
        try:
            await s.do_handshake()
            while data := await s.receive_some(1024):
                await s.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), echo, 0)
    port = listeners[0].socket.getsockname()[1]
    peer_ctx = tls.client_context(first.chain_pem, first.key_pem, ctl.roots, alpn=("http/1.1",))

    async def dial() -> trio.SSLStream[trio.SocketStream]:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        s = trio.SSLStream(tcp, peer_ctx, server_hostname=spiffe.server_name(web))
        await s.do_handshake()
        return s

    with trio.fail_after(10):
        old = await dial()
        served = keys.leaf_info(ssl.DER_cert_to_PEM_cert(old.getpeercert(True)).encode())
        assert served.serial == first.info.serial

    def renewed() -> bool:  # at 70 % of 4 s
        h = store.held(web)
        return h is not None and h.info.serial != first.info.serial

    await _wait_until(renewed)

    with trio.fail_after(10):
        await old.send_all(b"still here")
        assert await old.receive_some(1024) == b"still here"
        new = await dial()
        renewed = keys.leaf_info(ssl.DER_cert_to_PEM_cert(new.getpeercert(True)).encode())
        assert renewed.serial != first.info.serial
        await old.aclose()
        await new.aclose()

    # Dropping a service from "wanted" drops its identity; a poke makes it prompt.
    wanted.clear()
    store.poke()
    await _wait_until(lambda: store.held(web) is None)

    # Persisted 0600: a restarted agent serves at once, controller or not.
    files = sorted(p.name for p in (agent_state / "identity").iterdir())
    assert files == ["node-nm-ctl-test.pem", "roots.pem"]
    assert all(((agent_state / "identity" / f).stat().st_mode & 0o077) == 0 for f in files)
    restarted = IdentityStore(TD, DC, NODE, agent_state)
    assert restarted.ready()


async def test_rotation_survives_a_controller_outage(
    dev_consul: DevConsul, tmp_path: Path, nursery: trio.Nursery
) -> None:
    cfg = _config(tmp_path, dev_consul.http_port, leaf_ttl="3s")
    address = [""]
    async with trio.open_nursery() as first_life:
        ctl = await _start(first_life, cfg)
        address[0] = ctl.address
        client = ControllerClient(lambda: address[0], ctl.roots, TOKEN)
        store = IdentityStore(TD, DC, NODE, tmp_path / "agent", alpn=("http/1.1",))
        with trio.fail_after(10):
            await nursery.start(serve_identities, store, client, set)
        first_life.cancel_scope.cancel()  # the controller dies right after the first issue
    node_id = spiffe.node_id(TD, DC, NODE)
    first = store.held(node_id)
    assert first is not None

    await trio.sleep(max(0.0, first.info.not_before + 60 + 2.5 - time.time()))
    # Renewal (due at 2.1 s) failed; the last good certificate is still the one served.
    held = store.held(node_id)
    assert held is not None and held.info.serial == first.info.serial

    async with trio.open_nursery() as second_life:
        address[0] = (await _start(second_life, cfg)).address  # same state_dir: same CA
        await _wait_until(
            lambda: (h := store.held(node_id)) is not None and h.info.serial != first.info.serial
        )
        assert store.ready()
        second_life.cancel_scope.cancel()


def test_the_controller_process_stops_cleanly_on_sigterm(
    dev_consul: DevConsul, tmp_path: Path
) -> None:
    (tmp_path / "join-token").write_text(TOKEN + "\n")
    (tmp_path / "join-token").chmod(0o600)
    (listen,) = free_ports(1)
    config = tmp_path / "controller.toml"
    config.write_text(
        "[controller]\n"
        f'node = "{NODE}"\ntrust_domain = "{TD}"\nlisten = "127.0.0.1:{listen}"\n'
        f'state_dir = "{tmp_path / "state"}"\njoin_token_file = "{tmp_path / "join-token"}"\n'
        f'[consul]\naddress = "127.0.0.1:{dev_consul.http_port}"\n'
    )
    main = "from nodemesh.controller.cli import controller; controller()"
    proc = subprocess.Popen(
        [sys.executable, "-c", main, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    c = dev_consul.client()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the process prints it once it serves
        assert line == f"nodemesh controller listening on 127.0.0.1:{listen}\n"
        deadline = time.monotonic() + 10
        while not c.health.service(CONTROLLER_SERVICE)[1]:
            assert time.monotonic() < deadline, "controller never registered in Consul"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert c.health.service(CONTROLLER_SERVICE)[1] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# --- refused before the body ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "status", "says"),
    [
        ("/v1/metrics/report", [], 401, "needs a certificate of this mesh"),
        ("/v1/sign/service", [], 401, "node's certificate as TLS client cert"),
        ("/v1/sign/node", [("authorization", "Bearer guess")], 401, "join token does not match"),
    ],
)
async def test_a_caller_it_would_refuse_is_refused_on_the_head_before_any_body(
    ctl: Running, path: str, headers: list[tuple[str, str]], status: int, says: str
) -> None:
    """16 uploads that announced a 4 MiB report and then stalled, with no certificate, held
    121 MB of the controller's memory: the body was read before the caller was looked at.  Now
    the answer comes as soon as the head is in, and no body byte is ever sent here."""
    with trio.fail_after(5):  # before: no answer until REQUEST_TIMEOUT (30 s)
        stream = await _tls(ctl)
        conn = h11.Connection(h11.CLIENT)
        head = [("host", "x"), ("content-length", str(4 * 1024 * 1024 - 1)), *headers]
        await stream.send_all(conn.send(h11.Request(method="POST", target=path, headers=head)))
        got, raw, resp_headers = await _read_response(conn, stream)
    assert got == status and says in json.loads(raw)["error"]
    assert resp_headers[b"connection"] == b"close"
    await stream.aclose()


async def test_connections_over_the_cap_are_closed_at_once(
    ctl: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodemesh.controller import api

    held = [await _tls(ctl) for _ in range(3)]
    monkeypatch.setattr(api, "MAX_CONNECTIONS", 3)
    tcp = await trio.open_tcp_stream("127.0.0.1", ctl.port)
    ctx = tls.client_context(None, None, ctl.roots, alpn=("http/1.1",))
    fourth = trio.SSLStream(tcp, ctx, server_hostname="nodemesh-controller")
    try:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await fourth.do_handshake()  # closed before the handshake
    finally:
        await trio.aclose_forcefully(fourth)
    for s in held:
        await s.aclose()
    await trio.sleep(0.1)
    await _healthy(ctl)  # room again
