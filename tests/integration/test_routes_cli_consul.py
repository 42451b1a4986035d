"""``nodemesh routes`` against a real Consul KV and the recorded controller over mTLS."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakecontroller import FakeController, Files, fake_controller
from tests.integration.devconsul import DevConsul

pytestmark = pytest.mark.integration
NODEMESH = Path(sys.executable).parent / "nodemesh"
TABLE = {"routes": [{"name": "api", "path": "/api/.*"}, {"name": "idle", "path": "/idle"}]}


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[FakeController, Files]]:
    with fake_controller(tmp_path) as found:
        yield found


def run(dev: DevConsul, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(NODEMESH), "routes", *args, "--consul", f"127.0.0.1:{dev.http_port}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_table_and_numbers(dev_consul: DevConsul, controller: tuple[FakeController, Files]) -> None:
    fake, files = controller
    dev_consul.client().kv.put("nodemesh/routes/web", json.dumps(TABLE))
    creds = ["--controller", fake.address, "--ca-file", str(files.ca), "--cert", str(files.cert)]
    out = run(dev_consul, "web", "-o", "json", *creds)
    assert out.returncode == 0, out.stderr
    rows = [(r["route"], r["requests"]) for r in json.loads(out.stdout)]
    # The recorded answer counted web's "api" route and its default route ("" on the wire).
    assert rows == [("api", 1000), ("idle", None), ("[default]", 200)]
    assert fake.queries[-1][:2] == ("route", "1m")

    text = run(dev_consul, "web", *creds).stdout.splitlines()
    assert text[0].split()[:4] == ["SERVICE", "ROUTE", "METHOD", "PATH"]
    assert text[2].split()[:4] == ["web", "idle", "*", "/idle"]


def test_definitions_without_a_controller(dev_consul: DevConsul, tmp_path: Path) -> None:
    dev_consul.client().kv.put("nodemesh/routes/web", json.dumps(TABLE))
    out = run(dev_consul, "web", "--config", str(tmp_path / "none.toml"))
    assert out.returncode == 0
    assert "no numbers:" in out.stderr and "none.toml" in out.stderr
    assert [line.split()[1] for line in out.stdout.splitlines()[1:]] == ["api", "idle", "[default]"]


def test_consul_down_is_one_clear_error(tmp_path: Path) -> None:
    argv = [str(NODEMESH), "routes", "--consul", "127.0.0.1:1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.startswith("nodemesh routes: Consul at 127.0.0.1:1 did not answer")
    assert len(out.stderr.strip().splitlines()) == 1
