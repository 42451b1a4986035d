"""The controller under systemd's protocol, played by this test: READY once it serves, a
watchdog ping from its loop, SIGHUP re-reading the config, STOPPING on SIGTERM."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.test_agent_systemd import _expect
from tests.integration.test_controller_restart import Controller, controller  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    yield s
    s.close()


async def _logged(ctl: Controller, event: str) -> str:
    with trio.fail_after(10):
        while True:
            for line in ctl.logs.read_text(errors="replace").splitlines():
                if event in line:
                    return line
            await trio.sleep(0.1)


async def test_ready_watchdog_reload_and_stopping(
    controller: Controller,  # noqa: F811
    notify: socket.socket,
) -> None:
    await controller.start()
    await _expect(notify, "READY=1", timeout=10)
    await _expect(notify, "WATCHDOG=1", timeout=5)
    assert controller.proc is not None

    toml = controller.config.read_text()
    controller.config.write_text(toml + '[log]\nlevel = "debug"\n')
    controller.config.write_text(
        controller.config.read_text().replace('listen = "127.0.0.1:', 'listen = "127.0.0.2:')
    )
    controller.proc.send_signal(signal.SIGHUP)
    seen = await _expect(notify, "READY=1", timeout=10)
    assert any("RELOADING=1" in m for m in seen)
    line = await _logged(controller, "config_reloaded")
    assert "log_level" in line and "needs_restart=['listen']" in line

    controller.config.write_text(toml + '[log]\nlevel = "loud"\n')
    controller.proc.send_signal(signal.SIGHUP)
    seen = await _expect(notify, "READY=1", timeout=10)
    assert any("reload failed" in m and "log.level" in m for m in seen)
    assert "config_reload_failed" in await _logged(controller, "config_reload_failed")

    assert await controller.stop(signal.SIGTERM) == 0
    await _expect(notify, "STOPPING=1", timeout=1)
