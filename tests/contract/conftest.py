"""The ``transport`` fixture of the contract tests: one per transport (``broker_url``).
Files about one transport (tests/contract/on_redis, test_amqp_*) define their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qops.transports.base import Transport, from_url
from tests.contract import FAST


@pytest.fixture
def transport(broker_url: str) -> Iterator[Transport]:
    t = from_url(broker_url, FAST)
    yield t
    t.close()
