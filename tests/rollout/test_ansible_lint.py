"""ansible-lint passes on the playbooks and roles at the production profile (.ansible-lint).

It also syntax-checks every playbook with ansible-playbook itself.  No root and no VM needed.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.rollout.vms import ANSIBLE_DIR, REPO

pytestmark = pytest.mark.rollout

LINT_TIMEOUT = 300  # seconds; it takes about 15 s here


def test_ansible_lint_passes() -> None:
    venv_bin = REPO / ".venv" / "bin"
    lint = venv_bin / "ansible-lint"
    if not lint.exists():
        pytest.skip(f"no ansible-lint in {venv_bin}; run scripts/bootstrap (the test extra has it)")
    env = {
        **os.environ,
        # ansible-lint runs ansible-playbook --syntax-check: the venv's, first on PATH.
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "NO_COLOR": "1",
    }
    p = subprocess.run(
        [str(lint)],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
        check=False,
    )
    report = (p.stdout + p.stderr).strip()
    assert p.returncode == 0, report
    assert "Profile 'production' was required, and it passed" in report, report
