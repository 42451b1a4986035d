"""Fixtures for system tests: a started lab of network-namespace hosts, always torn down.

    def test_something(lab: Lab) -> None:          # the module's lab, built from `lab_spec`
        r = lab.curl("h1", lab.app_url("h2", "web"))

A module picks its own lab by overriding ``lab_spec`` (module scope):

    @pytest.fixture(scope="module")
    def lab_spec() -> LabSpec:
        return LabSpec(hosts=3, apps=(AppSpec("h2", "web"),))

``make_lab`` builds further labs inside one test (each closed at the test's end).  Everything
skips, with the reason, when the machine cannot host a lab (not root, no `ip`, no Consul).
NODEMESH_LAB_KEEP=1 keeps each lab's logs and configs (the path is printed at teardown).
When a test that uses a lab fails, the tail of every log in it is attached to the report.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nodemesh.lab.consul import find_binary
from nodemesh.lab.mesh import REPO, AppSpec, Lab, LabSpec
from nodemesh.lab.netns import LabError

LOG_TAIL_LINES = 30
NEEDED = ("ip", "curl", "setpriv")


def _unmet() -> str:
    if os.geteuid() != 0:
        return "lab needs root (network namespaces); run scripts/test as root"
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return f"lab needs {', '.join(missing)}; run scripts/bootstrap as root"
    return ""


@pytest.fixture(scope="session")
def lab_consul_binary() -> Path:
    reason = _unmet()
    if reason:
        pytest.skip(reason)
    try:
        return find_binary(REPO)
    except LabError as e:
        pytest.skip(f"no Consul for the lab: {e}")


def _keep() -> bool:
    return os.environ.get("NODEMESH_LAB_KEEP", "") not in ("", "0")


def _spec(spec: LabSpec, binary: Path) -> LabSpec:
    return replace(spec, consul_binary=spec.consul_binary or binary, keep_workdir=_keep())


@pytest.fixture(scope="module")
def lab_spec() -> LabSpec:
    """The default lab: one Consul server, controller, two agent hosts, web on h2, shop on h1."""
    return LabSpec(
        servers=1,
        hosts=2,
        apps=(AppSpec("h2", "web", 8080), AppSpec("h1", "shop", 8090, ("web",))),
    )


@pytest.fixture(scope="module")
def lab(lab_spec: LabSpec, lab_consul_binary: Path) -> Iterator[Lab]:
    with Lab(_spec(lab_spec, lab_consul_binary), progress=_progress) as started:
        yield started


@pytest.fixture
def make_lab(lab_consul_binary: Path) -> Iterator[Callable[[LabSpec], Lab]]:
    """Build (and start) extra labs in one test; all are closed when the test ends."""
    made: list[Lab] = []

    def make(spec: LabSpec) -> Lab:
        new = Lab(_spec(spec, lab_consul_binary), progress=_progress)
        made.append(new)
        new.__enter__()
        return new

    try:
        yield make
    finally:
        problems = []
        for one in reversed(made):
            try:
                one.close()
            except LabError as e:
                problems.append(str(e))
        if problems:
            pytest.fail("; ".join(problems))


def _progress(msg: str) -> None:
    if msg.startswith("logs and configs kept"):
        print(f"\n==> {msg}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "lab" not in getattr(item, "fixturenames", ()):
        return
    started = getattr(item, "funcargs", {}).get("lab")
    if isinstance(started, Lab) and started.dir.exists():
        for log in sorted(started.dir.glob("*/*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"lab log {log.parent.name}/{log.name}", "\n".join(lines)))
