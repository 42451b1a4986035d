"""The certificates on disk: the mesh CA file, the node's and each service's.  Pure.

A certificate past 80 % of its lifetime warns: the agent renews at 70 % (``identity/store``),
so it is late, though the data path still works until it expires.
"""

from __future__ import annotations

from pathlib import Path

from nodemesh.check.facts import CertFacts, RootsFacts
from nodemesh.check.results import CLOCK_HINT, IDENTITY, Result, fail, ok, span, warn, when

NEAR_EXPIRY = 0.20  # of a certificate's lifetime left: renewal was due at 70 %, so it is late
ROOT_WARN_DAYS = 30  # a mesh CA that expires within this many days warns


def roots(r: RootsFacts, now: float) -> list[Result]:
    if r.error:
        return [
            fail(
                IDENTITY,
                "ca-file",
                f"cannot use the mesh CA {r.path}: {r.error}",
                f"copy the controller's ca.pem to {r.path} (`nodemesh ca show` on the "
                "controller prints where it is)",
            )
        ]
    if r.not_after <= now:
        return [
            fail(
                IDENTITY,
                "ca-file",
                f"the mesh CA in {r.path} expired at {when(r.not_after)}",
                "rotate the mesh CA on the controller and install its new ca.pem on every host",
            )
        ]
    left = r.not_after - now
    if left < ROOT_WARN_DAYS * 86400:
        return [
            warn(
                IDENTITY,
                "ca-file",
                f"the mesh CA in {r.path} expires in {span(left)} ({when(r.not_after)})",
                "rotate the mesh CA on the controller soon and install its new ca.pem on every "
                "host",
            )
        ]
    return [
        ok(
            IDENTITY,
            "ca-file",
            f"mesh CA {r.path} holds {r.count} root(s), valid until {when(r.not_after)}",
        )
    ]


def certificate(c: CertFacts, ca_file: Path, now: float) -> Result:
    name = f"cert-{c.what.replace(' ', '-')}"
    renew = (
        "the agent renews at 70 % of the lifetime from the controller: make the controller "
        "reachable (see below) and read the agent's log for identity_request_failed"
    )
    if c.error:
        if c.what.startswith("node"):
            hint = (
                "the agent obtains it from the controller at start: make the controller "
                "reachable and the join token valid, then read the agent's log"
            )
        else:
            hint = (
                "the agent requests it once Consul lists the service on this node: make "
                "the controller reachable and read the agent's log"
            )
        return fail(IDENTITY, name, f"certificate for {c.what}: {c.error}", hint)
    replace = "delete the file and restart the agent: it requests a proper one"
    if c.identity != c.expected:
        return fail(IDENTITY, name, f"{c.path} names {c.identity}, not {c.expected}", replace)
    if not c.key_matches:
        return fail(
            IDENTITY, name, f"the key in {c.path} does not belong to its certificate", replace
        )
    if c.chain_error:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} does not chain to the mesh CA {ca_file}: {c.chain_error}",
            f"install the controller's current ca.pem at {ca_file}, or delete {c.path} and "
            "restart the agent to get one from this mesh's CA",
        )
    if c.not_after <= now:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} expired {span(now - c.not_after)} ago ({when(c.not_after)})",
            renew,
        )
    if c.not_before > now:
        return fail(
            IDENTITY,
            name,
            f"certificate for {c.what} is not valid before "
            f"{when(c.not_before)}, {span(c.not_before - now)} from now",
            CLOCK_HINT,
        )
    lifetime = c.not_after - c.not_before
    left = c.not_after - now
    if lifetime > 0 and left < NEAR_EXPIRY * lifetime:
        return warn(
            IDENTITY,
            name,
            f"certificate for {c.what} expires in {span(left)}, past "
            f"{100 - NEAR_EXPIRY * 100:.0f} % of its {span(lifetime)} lifetime: renewal is overdue",
            renew,
        )
    return ok(
        IDENTITY,
        name,
        f"certificate for {c.what} is valid for {span(left)} more and chains to the mesh CA",
    )
