"""The trio floor in the lab: the least a mesh hop written in Python under trio can do.

    python bench/floor.py certs DIR
    python bench/floor.py relay --role out|in [--hop l4|h1] --certs DIR --route LISTEN=TARGET [...]

A pair of these relays is the benchmark's ``trio-l4`` path, beside nodemesh's agents and
Consul's proxies in the same run:

    h1 -> relay "out" on h1's loopback -> mTLS -> relay "in" on h2 -> app

It is what Consul's built-in proxy is (L4: bytes copied both ways, TLS 1.3 with client
certificates between the hops, one TLS connection per app connection), built from the
cheapest pieces the agents themselves use: ``SocketIO`` and ``TLSIO`` (stdlib sockets and
``ssl`` under trio, docs/benchmarks.md "Lean streams") and the opaque ``splice``.  It parses no
HTTP and has no routing, pool, balancer, metrics, policy, timeouts or logging.  So what it costs
is what trio, the socket calls and TLS cost per request on this machine, the floor under any
agent in this stack; nodemesh's agents do everything an L7 mesh hop does on top of it.

``--hop h1`` is the benchmark's ``trio-h1`` path: the same pair, but each relay also parses
every HTTP/1.1 request and response with the agents' own codec (``protocol/h1codec.py``, llhttp)
and writes each on from its parsed pieces, the least an L7 hop must do (GETs only).  What
nodemesh's agents cost above it is their routing, pool, balancer, metrics, policy and timeouts.

``certs`` makes a throwaway CA and one leaf per side with the project's own CA code (keys
readable by the relays' user: a benchmark's, never a deployment's).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

TRUST_DOMAIN = "floor.bench"


def make_certs(out: Path) -> None:
    from nodemesh.identity import keys, spiffe
    from nodemesh.identity.ca import CertificateAuthority

    out.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create(TRUST_DOMAIN)
    (out / "roots.pem").write_bytes(ca.roots_pem)
    for side in ("out", "in"):
        ident = spiffe.service_id(TRUST_DOMAIN, "bench", f"floor-{side}")
        key = keys.generate_key()
        (out / f"{side}.pem").write_bytes(ca.sign_csr(keys.make_csr(key, ident), ident, 86400))
        (out / f"{side}.key").write_bytes(key)
    for f in out.iterdir():
        f.chmod(0o644)


async def h1_relay(down: Any, up: Any) -> None:
    """Requests from ``down`` to ``up`` and their responses back, through the agents' HTTP/1.1
    codec: per request, parse the head, write it on from its parsed pieces (the calls the
    agents' forwarder makes), parse the response and write it back in one write.  GETs only
    (a request with a body ends the connection); no routing, pool, balancer, metrics, header
    policy, timeouts or error answers."""
    from nodemesh.protocol.h1codec import (
        NEED_DATA,
        ClientConn,
        Data,
        EndOfMessage,
        Request,
        Response,
        ServerConn,
    )
    from nodemesh.transport.edges import IO_ERRORS

    ds, us = ServerConn(), ClientConn()
    try:
        while True:
            while (req := ds.next_event()) is NEED_DATA:
                ds.receive_data(await down.receive_some(65536))
            if type(req) is not Request or not ds.request_done:
                return
            head = us.send_request(req.method, req.target, req.headers, req.framing)
            await up.send_all(head + us.send_end())
            out = []
            while True:
                ev = us.next_event()
                t = type(ev)
                if ev is NEED_DATA:
                    us.receive_data(await up.receive_some(65536))
                elif t is Response:
                    out.append(ds.send_response(ev, ev.headers))
                elif t is Data:
                    out.append(ds.send_data(ev.data))
                elif t is EndOfMessage:
                    out.append(ds.send_end())
                    break
                else:
                    return
            await down.send_all(b"".join(out))
            ds.start_next_cycle()
    except IO_ERRORS:
        return


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(role: str, hop: str, certs: Path, routes: list[tuple[str, str]]) -> None:
    import trio

    from nodemesh.identity import tls
    from nodemesh.proxy.splice import splice
    from nodemesh.transport.edges import IO_ERRORS, accept_tls, open_tcp, open_tls
    from nodemesh.transport.streams import SocketIO

    roots = (certs / "roots.pem").read_bytes()
    chain, key = (certs / f"{role}.pem").read_bytes(), (certs / f"{role}.key").read_bytes()
    carry = h1_relay if hop == "h1" else splice
    if role == "out":
        ctx = tls.client_context(chain, key, roots)
    else:
        ctx = tls.server_context(chain, key, roots)

    async def handle(target: tuple[str, int], stream: trio.SocketStream) -> None:
        try:
            if role == "out":
                down = SocketIO.adopt(stream)
                up = await open_tls(await open_tcp(*target, 5.0), ctx, "floor", 5.0)
            else:
                down = await accept_tls(SocketIO.adopt(stream), ctx, 5.0)
                up = await open_tcp(*target, 5.0)
        except (*IO_ERRORS, OSError, trio.TooSlowError) as e:
            print(f"floor relay: {e}", file=sys.stderr, flush=True)
            await stream.aclose()
            return
        try:
            await carry(down, up)
        finally:
            await down.aclose()
            await up.aclose()

    async with trio.open_nursery() as nursery:
        for listen, target in routes:
            host, port = _addr(listen)
            listeners = await trio.open_tcp_listeners(port, host=host)
            nursery.start_soon(trio.serve_listeners, partial(handle, _addr(target)), listeners)
        listening = ", ".join(r[0] for r in routes)
        print(f"floor relay {role} ({hop}): listening on {listening}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs")
    c.add_argument("dir", type=Path)
    r = sub.add_parser("relay")
    r.add_argument("--role", choices=("out", "in"), required=True)
    r.add_argument("--hop", choices=("l4", "h1"), default="l4", help="bytes, or HTTP/1.1 GETs")
    r.add_argument("--certs", type=Path, required=True)
    r.add_argument("--route", action="append", required=True, help="LISTEN=TARGET, ip:port each")
    args = ap.parse_args()
    if args.cmd == "certs":
        make_certs(args.dir)
        return 0
    import trio

    routes = [tuple(x.split("=", 1)) for x in args.route]
    if any(len(x) != 2 for x in routes):
        ap.error("--route takes LISTEN=TARGET")
    trio.run(serve, args.role, args.hop, args.certs, routes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
