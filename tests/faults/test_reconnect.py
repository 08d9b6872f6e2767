"""What a worker holds when its broker connection drops (issue item 4, in detail).

A worker holds three kinds of messages: running, waiting in the pool (prefetched) and
waiting for their ETA. When its connection to the broker drops and comes back:

- Redis: nothing moves (in-flight lists live in Redis, the worker's heartbeat keeps
  them its own): every task runs once.
- RabbitMQ: the broker puts back every unacked message the moment the connection
  drops, and delivers it again. The worker must not also run its own old copy of the
  ones it had not started (prefetched, ETA-held): that would run them twice though no
  task was interrupted. A task that was running when the connection dropped runs again
  (at-least-once: its ack can no longer reach the broker).
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import runs, use
from tests.helpers import wait_until


@pytest.mark.parametrize("broker", ["redis", "amqp"], indirect=True)
def test_connection_loss_runs_held_messages_once(app, broker, make_proxy, workers, queue,
                                                 tmp_path):
    import proj.tasks

    proxy = make_proxy(broker.url)
    url = broker.with_host(proxy)
    path = tmp_path / "runs.txt"
    # mark is at-most-once here: acked when dispatched, so after the loss the broker may
    # not deliver it again, and the worker's own copy must still run
    w = workers.start("w", "-Q", queue, "-c", "1", broker_url=url,
                      QOPS_TASK_ANNOTATIONS='{"proj.tasks.mark": {"acks_late": false}}')
    workers.wait_ready(w)
    use(app, url, broker.backend)
    running = proj.tasks.record.apply_async((str(path), 2.0), queue=queue)
    waiting = [proj.tasks.record.apply_async((str(path),), queue=queue) for _ in range(2)]
    acked = proj.tasks.mark.apply_async((str(path),), queue=queue)
    eta = proj.tasks.record.apply_async((str(path),), countdown=4, queue=queue)
    assert wait_until(lambda: runs(path)[running.id] == 1, timeout=20)
    time.sleep(0.3)  # the others are reserved by now
    proxy.cut()
    time.sleep(1.0)
    proxy.restore()
    assert eta.get(timeout=20) >= 1
    for r in waiting:
        assert r.get(timeout=20) >= 1
    time.sleep(1.0)
    counts = runs(path)
    print(f"\n{broker.kind}: runs after a connection loss: running {counts[running.id]}, "
          f"prefetched {[counts[r.id] for r in waiting]}, ETA {counts[eta.id]}")
    assert [counts[r.id] for r in waiting] == [1, 1], counts
    assert counts[acked.id] == 1, counts  # not lost, not skipped as stale
    assert counts[eta.id] == 1, counts
    assert counts[running.id] == (1 if broker.kind == "redis" else 2), counts
    assert w.proc is not None and w.proc.poll() is None
