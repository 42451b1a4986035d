"""Integration fixtures: a real Consul dev agent per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.devconsul import DevConsul, start_dev_consul


@pytest.fixture(scope="module")
def dev_consul(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevConsul]:
    """A Consul dev agent with ``web`` registered on its node."""
    try:
        with start_dev_consul(tmp_path_factory.mktemp("consul")) as dev:
            dev.client().agent.service.register("web", service_id="web-1", port=8080)
            yield dev
    except RuntimeError as e:
        pytest.fail(str(e))
