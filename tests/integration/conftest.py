"""Fixtures the integration tests share: each transport with a result backend, and the
example app pointed at them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker, result backend) for each transport (RabbitMQ keeps results in Redis)."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        return url, url
    redis_url = request.getfixturevalue("redis_url")
    if request.param == "redis":
        return redis_url, redis_url
    return request.getfixturevalue("amqp_url"), redis_url


@pytest.fixture
def proj(urls: tuple[str, str]) -> Iterator[Any]:
    """The example app, pointed at this test's broker and backend."""
    import proj.tasks
    from proj.qops import app

    broker, backend = urls
    app.conf.set("broker_url", broker, layer="cli")
    app.conf.set("result_backend", backend, layer="cli")
    app.close()
    yield proj.tasks
    app.conf._layers["cli"].clear()
    app.close()
