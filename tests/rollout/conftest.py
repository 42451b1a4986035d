"""Fixtures for the rollout tier: the inputs a rollout needs, built or found once per session.

    def test_x(rollout_inputs: RolloutInputs) -> None: ...

``rollout_inputs`` holds the cached Debian rootfs (``scripts/rootfs``), the Consul binary
(``scripts/fetch-consul``) and two wheelhouses (``scripts/wheelhouse``): the tree as it is, and
the same tree labelled as a newer build, to upgrade to.  Everything skips, with the reason,
when the machine cannot boot containers (not root, a tool missing).  The fleet itself (VMs,
Consul servers, the control host) is built per module, see ``test_rollout.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nodemesh.lab.consul import find_binary
from nodemesh.lab.netns import LabError
from tests.rollout.vms import REPO, UPGRADE_LABEL, RolloutInputs, unmet

BUILD_TIMEOUT = 900  # seconds; the first rootfs build takes about a minute here


def _script(*argv: str) -> Path:
    """Run one of scripts/ (they print a path on their last stdout line); fail with its output."""
    try:
        p = subprocess.run(
            [str(REPO / "scripts" / argv[0]), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/{argv[0]} took longer than {BUILD_TIMEOUT}s")
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not Path(lines[-1]).exists():
        pytest.fail(f"scripts/{' '.join(argv)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return Path(lines[-1])


@pytest.fixture(scope="session")
def rollout_inputs() -> RolloutInputs:
    reason = unmet()
    if reason:
        pytest.skip(reason)
    try:
        consul = find_binary(REPO)
    except LabError as e:
        pytest.skip(f"no Consul for the rollout: {e}")
    return RolloutInputs(
        rootfs=_script("rootfs"),
        consul_binary=consul,
        wheelhouse=_script("wheelhouse"),
        wheelhouse_next=_script("wheelhouse", "--label", UPGRADE_LABEL),
    )
