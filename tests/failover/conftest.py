"""Fixtures of the failover tests: one private cluster per module (xdist worker), healed
before each test; every process stopped by pid at the end (servers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.failover.servers import SentinelCluster, need_binaries


@pytest.fixture(scope="module")
def sentinel_cluster() -> Iterator[SentinelCluster]:
    need_binaries("redis-server")
    cluster = SentinelCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sentinels(sentinel_cluster: SentinelCluster) -> SentinelCluster:
    """The cluster with its master and a synced replica, db 0 empty."""
    import redis

    sentinel_cluster.heal()
    client = redis.Redis(port=sentinel_cluster.master_port())
    client.flushall()
    client.close()
    return sentinel_cluster
