"""Private files for key material: 0700 directories, 0600 files, written atomically.

A key file is created with its final mode (never chmod-ed after the bytes land) and renamed
into place, so a crash leaves either the old file or the new one, never half a key.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nodemesh.errors import IdentityError


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700; it holds keys."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:
        raise IdentityError(
            f"{path}: cannot create a private directory ({e.strerror}); "
            "make it writable by the nodemesh user"
        ) from None


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise IdentityError(
            f"{path}: cannot write ({e.strerror}); make its directory writable by nodemesh"
        ) from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _scratch_parent() -> str | None:
    # tmpfs when there is one, so key bytes never reach a disk even briefly.
    shm = "/dev/shm"  # noqa: S108  # only the parent; mkdtemp makes a private 0700 dir in it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def scratch_file(data: bytes) -> Iterator[str]:
    """A 0600 file holding ``data`` inside a fresh 0700 directory, deleted on exit.

    Only for APIs that insist on a path (``ssl.SSLContext.load_cert_chain``).
    """
    d = tempfile.mkdtemp(prefix="nodemesh-", dir=_scratch_parent())
    path = os.path.join(d, "pair.pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(d)
