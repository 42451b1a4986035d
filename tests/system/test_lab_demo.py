"""The demo command end to end, as a user runs it: progress, live rows, a clean exit on a timer,
on SIGTERM and on Ctrl-C, and nothing left behind.  Runs without the mesh (--no-mesh) so it
tests the demo's own machinery; the meshed demo is exercised by the mesh's system tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodemesh.lab import netns

pytestmark = pytest.mark.system

DEMO = [sys.executable, "-m", "nodemesh.lab.demo", "--no-mesh", "--servers", "1", "--hosts", "2"]
SUMMARY = re.compile(
    r"^demo: (\d+) requests, (\d+) ok \(([\d.]+)%\), p50 [\d.]+ ms, p99 [\d.]+ ms; "
)


def _prefix(out: str) -> str:
    m = re.search(r"creating \d+ hosts \((nm-[0-9a-f]{6})-\*\)", out)
    assert m, out
    return m.group(1)


def _left_behind(prefix: str) -> list[str]:
    return sorted(ns for ns in netns.list_netns() if ns.startswith(prefix + "-"))


def _sweep(out: str) -> None:
    """Delete the namespaces of the lab a killed demo printed, and what runs in them."""
    m = re.search(r"creating \d+ hosts \((nm-[0-9a-f]{6})-\*\)", out)
    if m is None:
        return  # it was killed before it made any
    for ns in _left_behind(m.group(1)):
        for pid in netns.netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def test_demo_runs_for_its_duration_and_cleans_up(lab_consul_binary: Path) -> None:
    p = subprocess.run(
        [*DEMO, "--duration", "3", "--rate", "50"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CONSUL_BIN": str(lab_consul_binary)},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for step in (
        "==> starting consul servers (1)",
        "==> starting web on h2",
        "==> starting shop on h1",
        "==> starting shop on h2",
        "==> starting load on h1",
        "==> deleting namespaces",
    ):
        assert step in out
    assert "TIME" in out and "P99_MS" in out
    m = SUMMARY.match(out.strip().splitlines()[-1])
    assert m, out
    sent, ok = int(m.group(1)), int(m.group(2))
    assert 100 <= sent <= 160 and ok == sent
    assert _left_behind(_prefix(out)) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_stops_cleanly_on_a_signal(lab_consul_binary: Path, sig: signal.Signals) -> None:
    p = subprocess.Popen(
        DEMO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "CONSUL_BIN": str(lab_consul_binary)},
    )
    assert p.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.match(r"^\s+2s ", line):  # the second live row: load is flowing
                break
        assert any(re.match(r"^\s+2s ", x) for x in lines), "".join(lines)
        p.send_signal(sig)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
            _sweep("".join(lines))  # killed: its lab never tore down
    out = "".join(lines) + rest
    assert p.returncode == 0, out
    assert SUMMARY.match(out.strip().splitlines()[-1]), out
    assert _left_behind(_prefix(out)) == []
