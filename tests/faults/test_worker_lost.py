"""Worker-lost accounting (qops/worker/lost.py): a task that kills its process reaches
the dead-letter store after ``task_max_worker_lost`` (3) deaths, with default settings,
on every transport: whether the pool child dies (os._exit, SIGKILL) or the whole node
(solo pool: the task's os._exit ends the node, which a supervisor restarts). The count
lives with the broker and ends with the message."""

from __future__ import annotations

import time
from typing import Any

import pytest

from qops.errors import WorkerLostError
from tests.faults.conftest import runs
from tests.helpers import wait_until

FAST = {"QOPS_TASK_WORKER_LOST_BACKOFF": "0.2"}


def _dead_letter_for(app: Any, task_id: str, queue: str) -> Any:
    """The dead letter of ``task_id`` (on RabbitMQ the body holds only the arguments:
    the only one of ``queue``)."""
    for dl in app.transport.dead_letters(1000):
        if task_id in dl.raw.decode("utf-8", "replace") or dl.queue == queue:
            return dl
    return None


def _check_failed(app: Any, res: Any, queue: str, how: str) -> None:
    exc = res.get(timeout=5, propagate=False)
    assert isinstance(exc, WorkerLostError), exc
    assert "worker lost 3 times" in str(exc), exc
    dl = _dead_letter_for(app, res.id, queue)
    assert dl is not None, "not in the dead-letter store"
    assert dl.reason.startswith("worker lost 3 times: "), dl.reason
    assert how in dl.reason, dl.reason


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_crashing_task_is_dead_lettered(app, broker, workers, queue, tmp_path, how):
    import proj.tasks

    path = tmp_path / "runs.txt"
    w = workers.start("a", "-Q", queue, "-c", "1", **FAST)
    res = proj.tasks.crash.apply_async((str(path), how), queue=queue)
    assert wait_until(lambda: res.state == "FAILURE", timeout=60), workers.log(w)
    _check_failed(app, res, queue, "exit code 3" if how == "exit" else "SIGKILL (signal 9)")
    time.sleep(2.0)  # nothing more runs: no busy loop
    assert runs(path)[res.id] == 3, workers.log(w)
    log = workers.log(w)
    assert log.count("starting a new one") <= 3 or broker.kind != "amqp", log
    assert w.proc is not None and w.proc.poll() is None
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 0 and stats.in_flight == 0


def test_task_that_kills_its_node_is_dead_lettered(app, broker, workers, queue, tmp_path):
    """Solo pool: os._exit ends the node. A supervisor starts it again each time; the
    restarted node finds the message it was running and counts the death."""
    import proj.tasks

    path, errbacks = tmp_path / "runs.txt", tmp_path / "errbacks.txt"
    # a Celery-style errback: called by the node that counts the third death (the task's
    # own process is gone), with the WorkerLostError
    res = proj.tasks.crash.apply_async((str(path),), queue=queue,
                                       link_error=proj.tasks.errback.s(str(errbacks)))
    _restart_until_failed(res, workers, queue)
    assert res.state == "FAILURE"
    _check_failed(app, res, queue, "")
    assert runs(path)[res.id] == 3
    assert wait_until(errbacks.exists, timeout=10)
    assert errbacks.read_text().split()[:2] == [res.id, "WorkerLostError"]
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 0


def test_tasks_beside_the_killer_are_not_dead_lettered(app, broker, workers, queue,
                                                         tmp_path):
    """Solo pool: tasks that ended just before the task that kills the node (their acks
    may not have reached the broker yet, so they may run again) and tasks the node held
    behind it (not on RabbitMQ: docs/guarantees.md) are not dead-lettered with it: after
    the three deaths only the killer is."""
    import proj.tasks

    path = tmp_path / "runs.txt"
    before = [proj.tasks.record.apply_async((str(path),), queue=queue) for _ in range(5)]
    res = proj.tasks.crash.apply_async((str(path),), queue=queue)
    after = [proj.tasks.record.apply_async((str(path),), queue=queue) for _ in range(5)]
    w = _restart_until_failed(res, workers, queue)
    _check_failed(app, res, queue, "")
    for r in before:
        assert r.get(timeout=10) >= 1, workers.log(w)
    if broker.kind != "amqp":  # (RabbitMQ counts what a dead connection held: the doc)
        for r in after:
            assert r.get(timeout=10) >= 1, workers.log(w)
        assert [dl.queue for dl in app.transport.dead_letters(100)].count(queue) == 1


def test_count_ends_when_the_task_succeeds(app, broker, workers, queue, tmp_path):
    """Dies once, then succeeds: SUCCESS, and the broker keeps no record of it."""
    import proj.tasks

    path = tmp_path / "runs.txt"
    w = workers.start("a", "-Q", queue, "-c", "1", **FAST)
    res = proj.tasks.crash.apply_async((str(path),), {"until": 1}, queue=queue)
    assert res.get(timeout=60) == 2, workers.log(w)
    time.sleep(0.5)  # the ack (and the record's delete) ride with the next reserve
    assert _dead_letter_for(app, res.id, queue) is None
    if broker.kind == "redis":
        client = app.transport._client
        assert wait_until(lambda: not list(client.scan_iter("qops.lost.*")), timeout=5)
    if broker.kind == "sqlite":
        conn = app.transport.db.conn()
        assert conn.execute("SELECT COUNT(*) FROM messages WHERE lost > 0").fetchone()[0] == 0


def _restart_until_failed(res, workers, queue):
    """Start a solo node again each time the task kills it, until the task has failed
    (at most six starts); the last node started."""
    w, starts = None, 0
    deadline = time.monotonic() + 120
    while res.state != "FAILURE" and time.monotonic() < deadline:
        w = workers.start(f"n{starts}", "-Q", queue, "-P", "solo", **FAST)
        starts += 1
        assert w.proc is not None
        while w.proc.poll() is None and res.state != "FAILURE":
            time.sleep(0.1)
        assert starts <= 6, workers.log(w)
    return w
