"""The controller's record of every certificate it signs: who asked, from where, for which
identity, with which key.

One JSON line per issuance in ``<state_dir>/issued.jsonl`` (mode 0600), appended and flushed
to disk before the certificate leaves the controller: if the line cannot be written, the
certificate is not issued (503), so nothing is ever signed off the record.  At ``MAX_BYTES``
the file moves to ``issued.jsonl.1`` (one older generation is kept) and a new one starts.
``nodemesh ca issued`` reads the newest lines back on the controller host.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodemesh.errors import IdentityError

ISSUED_FILE = "issued.jsonl"
MAX_BYTES = 16 * 1024 * 1024  # about 50,000 issuances per generation
MAX_LINE = 4096  # a line longer than this was not written by this module


@dataclass(frozen=True)
class Issuance:
    time: float  # Unix seconds, the controller's clock
    identity: str  # the SPIFFE ID signed
    serial: str  # hex
    not_after: float
    requester_ip: str
    requester: str  # the client certificate's identity, or "join token"
    key_sha256: str  # of the certified public key (SubjectPublicKeyInfo, DER), hex


class IssuanceLog:
    def __init__(self, directory: Path) -> None:
        self.path = directory / ISSUED_FILE

    def __repr__(self) -> str:
        return f"<IssuanceLog {self.path}>"

    def record(self, entry: Issuance) -> None:
        """Append ``entry`` and fsync; ``IdentityError`` if it is not on disk."""
        line = (json.dumps(asdict(entry), separators=(",", ":")) + "\n").encode()
        try:
            if self.path.exists() and self.path.stat().st_size + len(line) > MAX_BYTES:
                os.replace(self.path, self.path.with_name(ISSUED_FILE + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise IdentityError(
                f"{self.path}: cannot record the issuance ({e.strerror}); nothing was issued; "
                "free disk space or fix controller.state_dir"
            ) from None

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first (from both generations if need be).
        A line that is not an entry is skipped: the file is the controller's own, but a crash
        may have cut its last line."""
        out: deque[dict[str, Any]] = deque(maxlen=limit)
        for path in (self.path.with_name(ISSUED_FILE + ".1"), self.path):
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue
            except OSError as e:
                raise IdentityError(f"{path}: cannot read ({e.strerror}); run as root") from None
            with f:
                for raw in f:
                    if len(raw) > MAX_LINE:
                        continue
                    try:
                        doc = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and set(doc) >= _FIELDS:
                        out.append(doc)
        return list(out)


_FIELDS = set(Issuance.__dataclass_fields__)
