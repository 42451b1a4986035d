"""The shipped unit files: `systemd-analyze verify` has nothing to say, and the hardening score
stays where docs/operations.md records it.

The units name /opt/nodemesh/bin/nodemesh (where the ansible role installs it); verify checks
that the binary exists, so this copy points at the venv's instead.  Nothing else changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
UNITS = Path(__file__).parents[2] / "systemd"
NODEMESH = Path(sys.executable).parent / "nodemesh"
# Exposure scores (0 best .. 10 worst) as measured; a change that weakens a unit fails here.
MAX_EXPOSURE = {
    "nodemesh.service": 1.1,
    "nodemesh-controller.service": 1.1,
    "nodemesh-iptables.service": 2.3,
}


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (package systemd)")
    d = tmp_path_factory.mktemp("units")
    for f in UNITS.iterdir():
        text = f.read_text().replace("/opt/nodemesh/bin/nodemesh", str(NODEMESH))
        (d / f.name).write_text(text)
    return d


def test_the_units_are_the_ones_shipped() -> None:
    names = sorted(p.name for p in UNITS.iterdir())
    assert names == [
        "nodemesh-controller.service",
        "nodemesh-iptables.service",
        "nodemesh.service",
        "nodemesh.socket",
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.iterdir()))
def test_verify_prints_nothing(units: Path, name: str) -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(units / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_hardening_score(units: Path, name: str) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(units / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    assert float(m[1]) <= MAX_EXPOSURE[name]
