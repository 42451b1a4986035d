"""Which nodemesh the benchmark runs: a committed revision, not whatever the work tree holds.

The work tree changes under a long run (other people edit it, the venv installs it editable),
and a number is only worth recording with the exact code it measured.  ``--rev REV`` exports
that commit's ``src/`` and ``scripts/`` with ``git archive`` into a temporary directory and
re-executes the driver with ``PYTHONPATH`` pointing there: PYTHONPATH comes before the venv's
editable path, and the lab passes the driver's environment to every agent and the controller.
``--rev worktree`` skips all that and runs the work tree as it is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from measure import BenchError

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "worktree"
_MARK = "NODEMESH_BENCH_SOURCE"  # set in the re-executed driver: "<sha> <dir>"


def _git(*argv: str) -> str:
    p = subprocess.run(
        ["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=30, check=False
    )
    if p.returncode != 0:
        raise BenchError(f"`git {' '.join(argv)}` failed: {p.stderr.strip()}")
    return p.stdout.strip()


def current() -> tuple[str, Path | None]:
    """The revision this driver runs (a sha or "worktree") and its exported tree, if any."""
    mark = os.environ.get(_MARK)
    if not mark:
        return WORKTREE, None
    sha, _, where = mark.partition(" ")
    return sha, Path(where)


def reexec_at(rev: str, script: Path, argv: Sequence[str]) -> None:
    """Export ``rev`` and replace this process with the driver running on it (never returns),
    unless this process already runs an export or ``rev`` is the work tree."""
    if rev == WORKTREE or os.environ.get(_MARK):
        return
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    where = Path(tempfile.mkdtemp(prefix=f"nodemesh-bench-{sha[:10]}-"))
    where.chmod(0o755)  # agents run as the nodemesh user and import from here
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", sha, "src", "scripts"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        shutil.rmtree(where, ignore_errors=True)
        raise BenchError(f"`git archive {sha} src scripts` failed: {archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True, timeout=60)
    env = {**os.environ, "PYTHONPATH": str(where / "src"), _MARK: f"{sha} {where}"}
    # The same driver, argument for argument: a fixed program, no shell.
    os.execve(sys.executable, [sys.executable, str(script), *argv], env)  # noqa: S606


def cleanup() -> None:
    _, where = current()
    if where is not None and where.name.startswith("nodemesh-bench-"):
        shutil.rmtree(where, ignore_errors=True)
