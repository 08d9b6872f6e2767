"""Real brokers for the tests.

Redis and RabbitMQ are used for real (no mocks). Locally a missing service skips its
tests with one line saying how to start it; with CI=true it fails the run.

Isolation: Redis tests use their own database (QOPS_TEST_REDIS_DB, default 13) and
flush it around each test; RabbitMQ tests run in a vhost made for this session and
deleted at the end; SQLite tests use a file under tmp_path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

REDIS_HOST = os.environ.get("QOPS_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("QOPS_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("QOPS_TEST_REDIS_DB", "13"))
AMQP_HOST = os.environ.get("QOPS_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("QOPS_TEST_AMQP_PORT", "5672"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

START_HINT = {
    "redis": "start it with: redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 "
    '--save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log',
    "amqp": "start it with: rabbitmq-server -detached",
}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    msg = f"{name} is not running on {host}:{port}; {START_HINT[name]}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_service("redis", REDIS_HOST, REDIS_PORT)
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client.flushdb()
    client.close()


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found")
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    require_service("amqp", AMQP_HOST, AMQP_PORT)
    vhost = f"qops-test-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield vhost
    _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url(amqp_vhost: str) -> str:
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{amqp_vhost}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture
def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "sqlite", "redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Every transport, for the contract suite."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def real_broker_url(request: pytest.FixtureRequest) -> str:
    """The three transports that work across processes."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def queue_name() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"
