"""The issuance record: every certificate the API signs is on disk first, with who asked, from
where and with which key; ``nodemesh ca issued`` reads it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodemesh.controller import audit
from nodemesh.controller.api import ControllerApi
from nodemesh.controller.audit import Issuance, IssuanceLog
from nodemesh.controller.cli import ca as ca_cli
from nodemesh.identity import keys, spiffe
from nodemesh.identity.ca import CertificateAuthority
from tests.unit.test_controller_decisions import DC, HOST_A, NODES, TD, TOKEN, Directory, _csr, _req

T = 1_764_080_000.0


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


def _api(authority: CertificateAuthority, tmp_path: Path) -> ControllerApi:
    return ControllerApi(
        authority, Directory(NODES), TOKEN, DC, 3600, clock=lambda: T, audit=IssuanceLog(tmp_path)
    )


async def test_every_issuance_is_recorded_with_requester_address_and_key(
    authority: CertificateAuthority, tmp_path: Path
) -> None:
    api = _api(authority, tmp_path)
    node = await api.handle(_req("/v1/sign/node", {"csr": _csr(HOST_A)}))
    web = spiffe.service_id(TD, DC, "web")
    svc = await api.handle(
        _req("/v1/sign/service", {"csr": _csr(web), "service": "web"}, token=None, peer=HOST_A)
    )
    assert node.status == svc.status == 200
    entries = IssuanceLog(tmp_path).recent(10)
    assert [(e["identity"], e["requester"], e["requester_ip"]) for e in entries] == [
        (HOST_A.uri, "join token", "198.18.0.1"),
        (web.uri, HOST_A.uri, "198.18.0.1"),
    ]
    for e, resp in zip(entries, (node, svc), strict=True):
        chain = json.loads(resp.body)["certificate"].encode()
        info = keys.leaf_info(chain)
        assert e["serial"] == format(info.serial, "x") and e["not_after"] == info.not_after
        assert e["key_sha256"] == keys.key_sha256(chain) and len(e["key_sha256"]) == 64
        assert e["time"] == T
    assert (tmp_path / audit.ISSUED_FILE).stat().st_mode & 0o777 == 0o600


async def test_no_certificate_leaves_when_its_record_cannot_be_written(
    authority: CertificateAuthority, tmp_path: Path
) -> None:
    (tmp_path / audit.ISSUED_FILE).mkdir()  # where the file should be: every open fails
    resp = await _api(authority, tmp_path).handle(_req("/v1/sign/node", {"csr": _csr(HOST_A)}))
    assert resp.status == 503
    doc = json.loads(resp.body)
    assert "cannot record the issuance" in doc["error"] and "certificate" not in doc


def _entry(i: int) -> Issuance:
    return Issuance(T + i, f"spiffe://mesh.test/dc/dc1/svc/s{i}", f"{i:x}", T + 3600, "198.18.0.1",
                    "join token", "ab" * 32)  # fmt: skip


def test_the_record_rolls_to_one_older_generation_and_reads_across_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_BYTES", 1000)
    log = IssuanceLog(tmp_path)
    for i in range(12):
        log.record(_entry(i))
    assert (tmp_path / (audit.ISSUED_FILE + ".1")).exists()
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    with (tmp_path / audit.ISSUED_FILE).open("ab") as f:
        f.write(b'{"identity": "cut in the mid')  # a crash mid-line
    got = [e["serial"] for e in log.recent(5)]
    assert got == ["7", "8", "9", "a", "b"]


def test_ca_issued_prints_a_table_and_json(tmp_path: Path) -> None:
    log = IssuanceLog(tmp_path)
    for i in range(3):
        log.record(_entry(i))
    runner = CliRunner()
    text = runner.invoke(ca_cli, ["issued", "--state-dir", str(tmp_path), "-n", "2"])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].split() == ["ISSUED", "IDENTITY", "SERIAL", "EXPIRES", "REQUESTER", "FROM",
                                "KEY", "SHA-256"]  # fmt: skip
    assert len(lines) == 3 and "svc/s2" in lines[2] and "2025-11-25T14:13:21Z" in lines[1]
    out = runner.invoke(ca_cli, ["issued", "--state-dir", str(tmp_path), "-o", "json"])
    assert [e["serial"] for e in json.loads(out.output)] == ["0", "1", "2"]
    empty = runner.invoke(ca_cli, ["issued", "--state-dir", str(tmp_path / "none")])
    assert empty.exit_code == 0 and "no issuances recorded" in empty.output
