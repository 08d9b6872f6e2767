"""Prefork on RabbitMQ: each pool child consumes for itself (qops/worker/children.py).

The node still looks like one node from outside: remote control reaches the children
and merges their answers, a warm shutdown gives back what they hold, hard time limits
replace the child, and a child that dies does not make a task run twice against
``reject_on_worker_lost``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from qops.errors import TimeLimitExceeded, WorkerLostError
from tests.faults.conftest import run_pids, runs
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until

NODE = "kids@pool.test"


@pytest.fixture
def setup(amqp_url: str, redis_url: str) -> Iterator[tuple[Any, str, str]]:
    """(tasks module, broker URL, queue): the example app on RabbitMQ, results in Redis."""
    import proj.tasks
    from proj.qops import app

    app.conf.set("broker_url", amqp_url, layer="cli")
    app.conf.set("result_backend", redis_url, layer="cli")
    app.close()
    yield proj.tasks, amqp_url, f"kids-{uuid.uuid4().hex[:8]}"
    app.conf._layers["cli"].clear()
    app.close()


@contextmanager
def node(broker: str, backend: str, queue: str, tmp_path: Path, *args: str,
         **env: str) -> Iterator[WorkerProcess]:
    """A worker node (-c 2 unless ``args`` say otherwise) that answers pings."""
    with WorkerProcess("-n", NODE, "-Q", queue, "-c", "2", "-l", "INFO", *args,
                       broker=broker, backend=backend,
                       env=qops_env(QOPS_TASK_TRACK_STARTED="1", **env),
                       logfile=tmp_path / "worker.log") as w:
        w.wait_ready()
        assert wait_until(lambda: inspect(broker, "ping", timeout="1")[0] == 0, timeout=30), \
            log(tmp_path)
        yield w


def inspect(broker: str, *args: str, timeout: str = REPLY_TIMEOUT) -> tuple[int, Any]:
    r = run_qops("-b", broker, "--json", "inspect", *args, "-d", NODE, "--timeout", timeout)
    doc = json.loads(r.stdout) if r.stdout.strip() else {}
    return r.returncode, doc.get("replies", {}).get(NODE)


def control(broker: str, *args: str) -> Any:
    r = run_qops("-b", broker, "--json", "control", *args, "-d", NODE,
                 "--timeout", REPLY_TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["replies"][NODE]


def log(tmp_path: Path) -> str:
    path = tmp_path / "worker.log"
    return path.read_text() if path.exists() else ""


def pool_pids(broker: str) -> list[int]:
    code, stats = inspect(broker, "stats")
    assert code == 0, stats
    return sorted(stats["pool"]["processes"])


def test_children_consume_and_answer_control(setup, redis_url, tmp_path) -> None:
    tasks, broker, queue = setup
    with node(broker, redis_url, queue, tmp_path):
        pids = pool_pids(broker)
        assert len(pids) == 2
        # one consumer per child on the queue, none in the parent
        [stats] = tasks.app.transport.queue_stats([queue])
        assert stats.consumers == 2
        ran = {tasks.pid.apply_async(queue=queue).get(timeout=10) for _ in range(20)}
        assert ran <= set(pids)

        # (long enough for `inspect active` to find it running on a loaded host: with 3 s
        # a CI run on a slow host once saw it finished first)
        slow = tasks.sleep.apply_async((8,), queue=queue)
        later = tasks.add.apply_async((1, 1), countdown=60, queue=queue)
        assert wait_until(lambda: slow.state == "STARTED", timeout=10)
        code, active = inspect(broker, "active")
        assert code == 0 and [t["id"] for t in active] == [slow.id]
        assert active[0]["worker_pid"] in pids
        code, scheduled = inspect(broker, "scheduled")
        assert [s["request"]["id"] for s in scheduled] == [later.id]
        code, found = inspect(broker, "query_task", later.id)
        assert found[later.id][0] == "scheduled"

        # revoke reaches the child holding the ETA task
        assert "ok" in control(broker, "revoke", later.id)
        code, revoked = inspect(broker, "revoked")
        assert later.id in revoked
        # stats counts what the children did, merged
        assert slow.get(timeout=20) == 8
        code, stats_doc = inspect(broker, "stats")
        assert stats_doc["total"]["proj.tasks.pid"] == 20

        # a queue added at run time is consumed by every child
        extra = f"{queue}-extra"
        assert "ok" in control(broker, "add_consumer", extra)
        assert tasks.add.apply_async((2, 3), queue=extra).get(timeout=10) == 5
        code, queues = inspect(broker, "active_queues")
        assert sorted(q["name"] for q in queues) == sorted([queue, extra])
        [stats] = tasks.app.transport.queue_stats([extra])
        assert stats.consumers == 2

        # the pool grows and shrinks by whole consuming children
        assert "ok" in control(broker, "pool_grow", "1")
        assert wait_until(lambda: len(pool_pids(broker)) == 3, timeout=10)
        assert "ok" in control(broker, "pool_shrink", "2")
        assert wait_until(lambda: len(pool_pids(broker)) == 1, timeout=10)
        assert tasks.add.apply_async((4, 4), queue=queue).get(timeout=10) == 8
    tasks.app.transport.purge(extra)


def test_warm_shutdown_gives_back_what_children_hold(setup, redis_url, tmp_path) -> None:
    tasks, broker, queue = setup
    with node(broker, redis_url, queue, tmp_path, "-c", "1") as w:
        shut_down_warm(tasks, w, queue, tmp_path)


def shut_down_warm(tasks: Any, w: WorkerProcess, queue: str, tmp_path: Path) -> None:
    running = tasks.sleep.apply_async((2,), queue=queue)
    assert wait_until(lambda: running.state == "STARTED", timeout=10)
    waiting = [tasks.add.apply_async((i, i), queue=queue) for i in range(3)]
    time.sleep(0.3)  # prefetched by the busy child
    start_stop = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0, log(tmp_path)
    assert time.monotonic() - start_stop < 10
    assert running.get(timeout=1) == 2  # the running task finished
    assert all(r.state == "PENDING" for r in waiting)
    [stats] = tasks.app.transport.queue_stats([queue])
    assert stats.ready == 3 and stats.consumers == 0
    tasks.app.transport.purge(queue)


def test_hard_time_limit_replaces_the_child(setup, redis_url, tmp_path) -> None:
    tasks, broker, queue = setup
    path = tmp_path / "runs.txt"
    with node(broker, redis_url, queue, tmp_path, "-c", "1"):
        before = pool_pids(broker)
        res = tasks.sleep.apply_async((30,), time_limit=1, queue=queue)
        t0 = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            res.get(timeout=10)
        assert time.monotonic() - t0 < 5  # the signal, not the parent's kill 2 s later
        assert wait_until(lambda: pool_pids(broker) != before, timeout=10)

        # a task that blocks the signal is killed by the parent; RabbitMQ delivers it
        # again and it fails here instead of running (and hanging) once more
        res = tasks.stubborn.apply_async((str(path), 30), queue=queue)
        with pytest.raises(TimeLimitExceeded, match="was killed"):
            res.get(timeout=20)
        time.sleep(0.5)
        assert runs(path)[res.id] == 1, log(tmp_path)
        assert tasks.add.apply_async((1, 2), queue=queue).get(timeout=10) == 3


@pytest.mark.parametrize("requeue", [True, False])
def test_killed_child_and_reject_on_worker_lost(setup, redis_url, tmp_path,
                                                requeue: bool) -> None:
    """With a sibling free to take the redelivered message at once (-c 2)."""
    tasks, broker, queue = setup
    path = tmp_path / "runs.txt"
    with node(broker, redis_url, queue, tmp_path,
               QOPS_TASK_REJECT_ON_WORKER_LOST="1" if requeue else "0"):
        res = tasks.record.apply_async((str(path), 30.0), {"first_only": True}, queue=queue)
        assert wait_until(lambda: runs(path)[res.id] == 1, timeout=10)
        [child] = run_pids(path, res.id)
        os.kill(child, signal.SIGKILL)
        if requeue:
            assert res.get(timeout=20) == 2
        else:
            with pytest.raises(WorkerLostError, match="killed by SIGKILL"):
                res.get(timeout=20)
            time.sleep(0.5)
            assert runs(path)[res.id] == 1
        assert wait_until(lambda: len(pool_pids(broker)) == 2, timeout=10)  # replaced
        assert child not in pool_pids(broker)


def test_a_child_that_cannot_connect_stops_the_start(amqp_url: str, tmp_path: Path) -> None:
    """The node fails at start-up with the child's reason, as one that consumes itself."""
    broker = amqp_url.rsplit("/", 1)[0] + f"/no-such-vhost-{uuid.uuid4().hex[:6]}"
    with WorkerProcess("-n", NODE, "-c", "2", broker=broker,
                       logfile=tmp_path / "worker.log") as w:
        assert w.wait(20) == 74
    text = log(tmp_path)
    assert "qops: error: RabbitMQ at" in text and "refused access to vhost" in text


def test_rate_limit_is_the_nodes_not_each_childs(setup, redis_url, tmp_path) -> None:
    """Two children share a node's rate: 4/s for the node is 2/s each (a bucket holds
    one token), so 10 tasks take at least 2 s; at 4/s each they would take about 1 s."""
    tasks, broker, queue = setup
    with node(broker, redis_url, queue, tmp_path):
        assert "ok" in control(broker, "rate_limit", "proj.tasks.add", "4/s")
        t0 = time.monotonic()
        results = [tasks.add.apply_async((i, i), queue=queue) for i in range(10)]
        assert [r.get(timeout=20) for r in results] == [2 * i for i in range(10)]
        assert time.monotonic() - t0 >= 1.8
        # after the pool grows, each of the three children has a third of the rate
        assert "ok" in control(broker, "pool_grow", "1")
        assert wait_until(lambda: len(pool_pids(broker)) == 3, timeout=10)
        t0 = time.monotonic()
        results = [tasks.add.apply_async((i, i), queue=queue) for i in range(11)]
        assert [r.get(timeout=20) for r in results] == [2 * i for i in range(11)]
        assert time.monotonic() - t0 >= 1.8
