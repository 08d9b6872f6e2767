"""Quorum queues (task_create_missing_queue_type / task_default_queue_type 'quorum') with
a real worker: the broker's x-delivery-count feeds worker-lost accounting (no copy
republished), and ETA tasks run while others keep flowing (docs/protocol.md §3.3)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops.errors import WorkerLostError
from qops.transports.amqp import parse_url
from tests.faults.conftest import runs
from tests.helpers import wait_until

pytestmark = pytest.mark.amqp

QUORUM = {"QOPS_TASK_CREATE_MISSING_QUEUE_TYPE": "quorum",
          "QOPS_TASK_WORKER_LOST_BACKOFF": "0.2"}


@pytest.fixture
def quorum_app(app: Any) -> Iterator[Any]:
    app.conf.set("task_create_missing_queue_type", "quorum", layer="cli")
    app.close()
    yield app


def _dead_letter_headers(url: str, task_id: str) -> dict[str, Any]:
    """The headers of ``task_id``'s message in the dead-letter queue (browsed, not taken)."""
    dlq = parse_url(url).dead_letter_queue
    conn = pika.BlockingConnection(pika.URLParameters(url.split("?")[0]))
    try:
        ch = conn.channel()
        while True:
            method, props, _ = ch.basic_get(dlq, auto_ack=False)
            assert method is not None, "not in the dead-letter queue"
            if (props.headers or {}).get("id") == task_id:
                return dict(props.headers)
    finally:
        conn.close()


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_worker_lost_on_a_quorum_queue_uses_the_delivery_count(quorum_app, broker, workers,
                                                               queue, tmp_path):
    import proj.tasks

    path = tmp_path / "runs.txt"
    w = workers.start("a", "-Q", queue, "-c", "1", **QUORUM)
    res = proj.tasks.crash.apply_async((str(path),), queue=queue)
    assert wait_until(lambda: res.state == "FAILURE", timeout=60), workers.log(w)
    exc = res.get(timeout=5, propagate=False)
    assert isinstance(exc, WorkerLostError) and "worker lost 3 times" in str(exc), exc
    assert runs(path)[res.id] == 3
    headers = _dead_letter_headers(broker.url, res.id)
    assert headers.get("x-delivery-count") == 3, headers  # the broker counted 3 returns
    assert "x-qops-worker-lost" not in headers  # the classic-queue path was not taken
    assert "refuses a channel-wide prefetch" not in workers.log(w)


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_eta_tasks_on_a_quorum_queue(quorum_app, broker, workers, queue):
    import proj.tasks

    w = workers.start("a", "-Q", queue, "-c", "2", **QUORUM)
    started = time.monotonic()
    later = proj.tasks.add.apply_async((1, 2), queue=queue, countdown=2)
    now = proj.tasks.add.apply_async((3, 4), queue=queue)
    assert now.get(timeout=30) == 7, workers.log(w)
    assert time.monotonic() - started < 2.0  # not stuck behind the held ETA task
    assert later.get(timeout=30) == 3, workers.log(w)
    assert time.monotonic() - started >= 2.0
