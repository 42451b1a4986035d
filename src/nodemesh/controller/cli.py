"""``nodemesh controller`` and ``nodemesh ca``: the tiny mains around the controller.

Bad config exits 64 (EX_USAGE) with the one-sentence message; any other nodemesh error
exits 1.  The top-level CLI adds these commands to its group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click
import trio

from nodemesh import log
from nodemesh.config import load_controller_config, parse_trust_domain
from nodemesh.errors import ConfigError, NodemeshError
from nodemesh.identity.ca import CERT_FILE, CertificateAuthority

DEFAULT_CONFIG = Path("/etc/nodemesh/controller.toml")
DEFAULT_STATE = Path("/var/lib/nodemesh-controller")


def _fail(prefix: str, err: NodemeshError) -> NoReturn:
    click.echo(f"{prefix}: {err}", err=True)
    sys.exit(err.exit_code if isinstance(err, ConfigError) else 1)


def _first_nodemesh_error(exc: BaseException) -> NodemeshError | None:
    """Nurseries wrap errors in groups; the operator wants the one sentence inside."""
    if isinstance(exc, NodemeshError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_nodemesh_error(inner)
            if found is not None:
                return found
    return None


@click.command("controller")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="Controller config file (TOML).",
)
def controller(config_path: Path) -> None:
    """Run the nodemesh controller: the mesh CA and its API."""
    from nodemesh.controller.daemon import run_controller  # trio/h11 only when running

    try:
        cfg = load_controller_config(config_path)
    except ConfigError as e:
        _fail("nodemesh controller", e)
    log.configure(cfg.log_level, cfg.log_format)
    try:
        trio.run(run_controller, cfg, config_path)
    except BaseException as e:  # unwrap exception groups for the operator
        found = _first_nodemesh_error(e)
        if found is None:
            raise
        _fail("nodemesh controller", found)


_state_dir = click.option(  # where the controller keeps its CA: every ``ca`` command's
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_STATE,
    show_default=True,
)


@click.group("ca")
def ca() -> None:
    """Manage the mesh certificate authority offline."""


@ca.command("init")
@_state_dir
@click.option("--trust-domain", default="nodemesh.local", show_default=True)
def ca_init(state_dir: Path, trust_domain: str) -> None:
    """Create the root CA under STATE_DIR (or keep the one already there)."""
    try:
        parse_trust_domain(trust_domain)
    except Exception as e:  # config's parser raises its private error type
        _fail("nodemesh ca init", ConfigError(f"--trust-domain {trust_domain!r} {e}"))
    existed = (state_dir / CERT_FILE).exists()
    try:
        authority = CertificateAuthority.load_or_create(state_dir, trust_domain, None, None, None)
    except NodemeshError as e:
        _fail("nodemesh ca init", e)
    verb = "kept existing" if existed else "created"
    click.echo(f"{verb} root CA in {state_dir}")
    _print_summary(authority.summary())
    click.echo(f"install {state_dir / CERT_FILE} on every agent as controller.ca_file")


@ca.command("show")
@_state_dir
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def ca_show(state_dir: Path, output: str) -> None:
    """Print the root CA's subject, fingerprint and validity."""
    if not (state_dir / CERT_FILE).exists():
        _fail(
            "nodemesh ca show",
            ConfigError(f"{state_dir}: holds no CA; run nodemesh ca init --state-dir {state_dir}"),
        )
    try:
        summary = CertificateAuthority.load_state(state_dir).summary()
    except NodemeshError as e:
        _fail("nodemesh ca show", e)
    summary["cert_file"] = str(state_dir / CERT_FILE)
    if output == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def _print_summary(summary: dict[str, str]) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


@ca.command("issued")
@_state_dir
@click.option("-n", "--limit", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def ca_issued(state_dir: Path, limit: int, output: str) -> None:
    """List the newest certificates the controller issued: who asked, from where, with which
    key (from STATE_DIR/issued.jsonl, on the controller host)."""
    from datetime import UTC, datetime

    from nodemesh.controller.audit import ISSUED_FILE, IssuanceLog

    log_file = IssuanceLog(state_dir)
    try:
        entries = log_file.recent(limit)
    except NodemeshError as e:
        _fail("nodemesh ca issued", e)
    if output == "json":
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        click.echo(f"no issuances recorded in {state_dir / ISSUED_FILE}")
        return

    def when(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    rows = [
        (when(e["time"]), e["identity"], e["serial"][:16], when(e["not_after"]),
         e["requester"], e["requester_ip"], e["key_sha256"][:16])
        for e in entries
    ]  # fmt: skip
    head = ("ISSUED", "IDENTITY", "SERIAL", "EXPIRES", "REQUESTER", "FROM", "KEY SHA-256")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
