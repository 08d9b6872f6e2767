"""ETA/countdown tasks hours ahead (issue item 7).

A worker holds such a message reserved (so no other worker takes it, however long it
waits) and runs it at its time. It is never run early, never twice, and never lost:
a warm shutdown puts it back in the queue at once, a killed worker's held messages come
back when its death is noticed. Holding many of them does not use up the prefetch:
the worker still runs new work.
"""

from __future__ import annotations

import os
import signal
import time

from tests.faults.conftest import runs
from tests.helpers import wait_until

FAST = {"QOPS_WORKER_HEARTBEAT_INTERVAL": "0.3", "QOPS_WORKER_HEARTBEAT_TTL": "1.5"}
HOURS = 3 * 3600


def received(log: str) -> int:
    return sum(1 for line in log.splitlines() if "] received" in line)


def test_far_eta_survives_restarts_and_runs_neither_early_nor_twice(app, broker, workers,
                                                                   queue, tmp_path):
    import proj.tasks

    path = tmp_path / "runs.txt"
    later = [proj.tasks.record.apply_async((str(path),), countdown=HOURS, queue=queue)
             for _ in range(3)]

    def ready() -> int:
        [s] = app.transport.queue_stats([queue])
        return s.ready

    a = workers.start("a", "-Q", queue, "-c", "1", **FAST)
    assert wait_until(lambda: received(workers.log(a)) == 3 and ready() == 0, timeout=30), \
        workers.log(a)[-2000:]
    b = workers.start("b", "-Q", queue, "-c", "1", **FAST)  # watches the same queue
    workers.wait_ready(b)
    time.sleep(2 * 1.5 + 0.5)  # more than two heartbeat TTLs
    assert ready() == 0 and received(workers.log(b)) == 0  # still a's, not handed on

    # warm shutdown of a: back in the queue at once, and b holds them now
    a.signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert a.wait(20) == 0
    assert wait_until(lambda: received(workers.log(b)) == 3, timeout=10), workers.log(b)
    assert time.monotonic() - stopped < 3.0
    assert ready() == 0

    # b killed: its held messages come back when its heartbeat expires; c holds them
    os.kill(b.pid, signal.SIGKILL)
    assert b.wait(10) == -signal.SIGKILL
    c = workers.start("c", "-Q", queue, "-c", "1", **FAST)
    assert wait_until(lambda: received(workers.log(c)) == 3, timeout=20), workers.log(c)
    assert ready() == 0
    time.sleep(0.5)
    assert not runs(path), "a task with an ETA hours ahead ran"
    assert all(r.state == "PENDING" for r in later)
    assert "Recovered 3 message(s)" in workers.log(c) or broker.kind == "amqp"


def test_held_eta_tasks_do_not_use_up_the_prefetch(app, broker, workers, queue):
    """prefetch 1, 4 tasks held for hours: a new task still runs at once; a warm
    shutdown then gives every held one back."""
    import proj.tasks

    for i in range(4):
        proj.tasks.add.apply_async((i, i), countdown=HOURS, queue=queue)
    w = workers.start("w", "-Q", queue, "-c", "1", "--prefetch-multiplier", "1")
    assert wait_until(lambda: received(workers.log(w)) == 4, timeout=30), workers.log(w)
    now = proj.tasks.add.apply_async((20, 22), queue=queue)
    assert now.get(timeout=10) == 42
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 4


def test_an_eta_held_past_half_the_consumer_timeout_is_renewed(app, broker, workers, queue,
                                                               tmp_path):
    """RabbitMQ takes back a delivery held unacknowledged past its consumer_timeout (30
    minutes by default) by closing the channel: a countdown of an hour came back
    redelivered every half hour, each time counted as a worker loss, and was
    dead-lettered. A worker gives such a message back (a copy, not a redelivery) after
    half the timeout and holds it again: it runs once, at its time, and no loss is
    counted. Here with consumer_timeout 2 s (broker_transport_options)."""
    import proj.tasks

    path = tmp_path / "runs.txt"
    w = workers.start("w", "-Q", queue, "-c", "1",
                      QOPS_BROKER_TRANSPORT_OPTIONS='{"consumer_timeout": 2}')
    workers.wait_ready(w)  # the countdown is the worker's, not its start-up's
    sent = time.monotonic()
    r = proj.tasks.record.apply_async((str(path),), countdown=4, queue=queue)
    assert r.get(timeout=30) == 1  # ran once
    assert time.monotonic() - sent >= 3.9  # not early
    log = workers.log(w)
    if broker.kind == "amqp":
        assert received(log) >= 3, log  # held, given back, held again: every second
    else:
        assert received(log) == 1, log  # Redis and SQLite keep a delivery for good
    assert "died holding" not in log and "worker lost" not in log
