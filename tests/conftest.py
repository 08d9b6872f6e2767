"""Real brokers for the tests.

Redis and RabbitMQ are used for real (no mocks). Locally a missing service skips its
tests with one line saying how to start it; with CI=true it fails the run.

Isolation, also under pytest-xdist (``make test`` runs ``pytest -n``): each xdist worker
runs its tests one at a time and has brokers of its own.

- Redis: database QOPS_TEST_REDIS_DB (default 8) plus the worker's index (gw0 -> 8,
  gw1 -> 9, ...), flushed around each test. Redis's pub/sub (remote control, events)
  spans databases, but qops and kombu name their channels ``/<db>.<exchange>``, so a
  worker's nodes never hear another worker's. Too many workers for the server's
  databases fails the run with a message saying so.
- RabbitMQ: a vhost made for the worker's session and deleted at its end.
- SQLite: a file under tmp_path (unique per test); memory: a uuid name.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

REDIS_HOST = os.environ.get("QOPS_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("QOPS_TEST_REDIS_PORT", "6379"))
REDIS_DB_BASE = int(os.environ.get("QOPS_TEST_REDIS_DB", "8"))
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


def xdist_worker() -> tuple[int, int]:
    """(index, count) of this pytest-xdist worker; (0, 1) without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not name:
        return 0, 1
    return int(name.lstrip("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


@pytest.fixture(scope="session")
def redis_db() -> int:
    """This worker's Redis database: QOPS_TEST_REDIS_DB + the xdist worker index."""
    require_service("redis", REDIS_HOST, REDIS_PORT)
    import redis

    index, count = xdist_worker()
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        databases = int(client.config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG disabled on this server: Redis's default
        databases = 16
    finally:
        client.close()
    last = REDIS_DB_BASE + count - 1
    if REDIS_DB_BASE < 0 or last >= databases:
        pytest.fail(f"{count} test workers need Redis databases {REDIS_DB_BASE}..{last}, "
                    f"but the server has {databases} (0..{databases - 1}): lower "
                    "QOPS_TEST_REDIS_DB or run fewer workers (pytest -n)", pytrace=False)
    return REDIS_DB_BASE + index


@pytest.fixture
def redis_url(redis_db: int) -> Iterator[str]:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
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
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    vhost = f"qops-test-{worker}-{uuid.uuid4().hex[:8]}"  # one per xdist worker
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


@contextmanager
def shared_broker_url(kind: str, request: pytest.FixtureRequest, folder: Path) -> Iterator[str]:
    """A broker URL for a module-scoped fixture (nodes shared by a module's tests):
    ``kind`` is sqlite (a file in ``folder``), redis (this worker's database, flushed
    before and after: the function-scoped ``redis_url`` of a test would flush it under
    the shared nodes) or amqp (this worker's vhost)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder}/broker.db"
    elif kind == "redis":
        import redis

        db = int(request.getfixturevalue("redis_db"))
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        client.flushdb()
        try:
            yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
        finally:
            client.flushdb()
            client.close()
    else:
        vhost = str(request.getfixturevalue("amqp_vhost"))
        yield f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{vhost}"


@pytest.fixture
def queue_name() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"
