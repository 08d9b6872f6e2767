"""Fixtures of the failover tests: one private cluster per module (xdist worker), healed
before each test; every process stopped by pid at the end (servers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.failover.servers import RABBIT_BIN, RabbitCluster, SentinelCluster, need_binaries


def _running(cluster: Any) -> Iterator[Any]:
    """Start ``cluster`` for the module; stop every process of it at the end."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sentinel_cluster() -> Iterator[SentinelCluster]:
    need_binaries("redis-server")
    yield from _running(SentinelCluster())


@pytest.fixture
def sentinels(sentinel_cluster: SentinelCluster) -> SentinelCluster:
    """The cluster with its master and a synced replica, db 0 empty."""
    import redis

    sentinel_cluster.heal()
    client = redis.Redis(port=sentinel_cluster.master_port())
    client.flushall()
    client.close()
    return sentinel_cluster


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    need_binaries("epmd", str(RABBIT_BIN / "rabbitmq-server"), str(RABBIT_BIN / "rabbitmqctl"))
    yield from _running(RabbitCluster())


@pytest.fixture
def rabbits(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with its three nodes running (a node killed by a test is started
    again)."""
    for i in range(RabbitCluster.NODES):
        if i not in rabbit_cluster.procs:
            rabbit_cluster.restart(i)
    return rabbit_cluster
