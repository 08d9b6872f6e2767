"""Fixtures of the Redis-only tests: a plain redis-py client on the test database (to
look at raw keys as kombu would) and a RedisTransport with fast heartbeats."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from qops.transports.base import from_url
from qops.transports.redis import RedisTransport
from tests.contract import FAST


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def transport(redis_url: str) -> Iterator[RedisTransport]:
    t = from_url(redis_url, FAST)
    assert isinstance(t, RedisTransport)
    yield t
    t.close()
