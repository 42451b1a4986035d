"""``nodemesh stat``/``edges`` against a controller on loopback over real mTLS.

The controller here is a recorded one (``tests/fakecontroller.py``): its answers are the
documented shape, its TLS is the mesh's own CA, and it refuses clients without a certificate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nodemesh.identity.client import ControllerUnavailable
from nodemesh.telemetry import query
from tests.fakecontroller import FakeController, Files, fake_controller

pytestmark = pytest.mark.integration
NODEMESH = Path(sys.executable).parent / "nodemesh"


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[FakeController, Files]]:
    with fake_controller(tmp_path) as found:
        yield found


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NODEMESH), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def flags(fake: FakeController, files: Files) -> list[str]:
    return ["--controller", fake.address, "--ca-file", str(files.ca), "--cert", str(files.cert)]


async def test_fetch_rows_presents_the_node_certificate(
    controller: tuple[FakeController, Files],
) -> None:
    fake, files = controller
    creds = query.load_credentials(files.ca, files.cert)
    with trio.fail_after(10):
        got = await query.fetch_rows(fake.address, "1m", "service", creds)
    assert [r["name"] for r in got] == ["web", "shop", "idle"]
    assert fake.queries == [("service", "1m", "spiffe://nodemesh.local/dc/dc1/node/ops")]


async def test_a_certificate_from_another_ca_is_refused(
    controller: tuple[FakeController, Files], tmp_path: Path
) -> None:
    from nodemesh.identity.ca import CertificateAuthority
    from tests.fakecontroller import write_credentials

    fake, files = controller
    rogue = write_credentials(CertificateAuthority.create("nodemesh.local"), tmp_path / "rogue")
    creds = query.load_credentials(files.ca, rogue.cert)  # trusts the real CA, wrong cert
    with trio.fail_after(10), pytest.raises(ControllerUnavailable):
        await query.fetch_rows(fake.address, "1m", "service", creds)
    assert fake.queries == []


async def test_a_stopped_controller_is_unavailable(
    controller: tuple[FakeController, Files],
) -> None:
    fake, files = controller
    creds = query.load_credentials(files.ca, files.cert)
    fake.stop()
    with trio.fail_after(10), pytest.raises(ControllerUnavailable, match="unreachable"):
        await query.fetch_rows(fake.address, "1m", "service", creds)


def test_stat_services_table(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    out = run("stat", *flags(fake, files))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "MESHED", "SUCCESS"]
    assert lines[3].split() == ["web", "2", "99.00%", "20.0", "0.81ms", "2.05ms", "4.09ms", "14"]


@pytest.mark.parametrize(
    ("kind", "names"), [("routes", ["web/", "web/api"]), ("hosts", ["h2", "h3"])]
)
def test_stat_routes_and_hosts_json(
    controller: tuple[FakeController, Files], kind: str, names: list[str]
) -> None:
    fake, files = controller
    out = run("stat", kind, "-o", "json", *flags(fake, files))
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == names


def test_edges_table_and_json(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    table = run("edges", *flags(fake, files))
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["SRC", "DST", "SRC_ID", "DST_ID", "SECURED"]
    doc = json.loads(run("edges", "-o", "json", *flags(fake, files)).stdout)
    assert [(e["src"], e["dst"], e["secured"]) for e in doc] == [
        ("load", "shop", True),
        ("shop", "web", True),
        ("unknown", "web", False),
    ]


def test_edges_dot_is_valid_graphviz(controller: tuple[FakeController, Files]) -> None:
    if shutil.which("dot") is None:
        pytest.fail("graphviz's dot is missing; scripts/bootstrap installs it")
    fake, files = controller
    out = run("edges", "-o", "dot", *flags(fake, files))
    assert out.returncode == 0, out.stderr
    svg = subprocess.run(
        ["dot", "-Tsvg"], input=out.stdout, capture_output=True, text=True, timeout=30, check=False
    )
    assert svg.returncode == 0, svg.stderr
    assert svg.stderr == ""  # dot warns on stderr about anything it had to guess
    assert "99.09%" in svg.stdout and "p99 4.09ms" in svg.stdout
    assert svg.stdout.count('class="edge"') == 3


def test_bad_window_is_a_usage_error(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    out = run("stat", "routes", "--window", "5x", *flags(fake, files))
    assert out.returncode == 64
    assert "--window '5x' is not a duration" in out.stderr


def test_routes_need_the_controller(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    fake.stop()
    out = run("stat", "routes", *flags(fake, files))
    assert out.returncode == 1
    assert out.stderr.startswith(f"nodemesh stat: controller at {fake.address} unreachable")


def test_services_fall_back_to_the_agents(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    fake.stop()
    # No Consul there either: the fallback is tried, and says why it failed.
    out = run("stat", *flags(fake, files), "--consul", "127.0.0.1:1")
    assert "reading agents directly" in out.stderr
    assert out.returncode == 1


def test_missing_certificate_names_the_file(tmp_path: Path) -> None:
    out = run("edges", "--controller", "127.0.0.1:1", "--config", str(tmp_path / "none.toml"))
    assert out.returncode == 64
    assert "none.toml: no such file; pass --ca-file and --cert" in out.stderr


def test_stat_watch_asks_again_each_time(controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    out = run("stat", "--watch", "0.2", "--count", "3", *flags(fake, files))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("NAME ") == 3
    assert len(fake.queries) == 3
