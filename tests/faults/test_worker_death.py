"""Workers that die, and tasks that outlive heartbeats (issue items 1 and 2).

- A SIGKILLed worker's ``acks_late`` task runs again on another worker: at once on
  RabbitMQ (the broker sees the connection drop), within one heartbeat interval on SQLite
  (same host: the pid is gone), within ``worker_heartbeat_ttl`` + one interval on Redis.
  It ends SUCCESS, once.
- A killed prefork child: the task runs again (``task_reject_on_worker_lost``, the
  default) or ends FAILURE with WorkerLostError (setting off); never silently lost.
- A task running many heartbeat TTLs on a healthy worker runs exactly once, with an
  idle second worker watching the same queue.
"""

from __future__ import annotations

import os
import signal
import time

from qops.errors import WorkerLostError
from tests.faults.conftest import alive, run_pids, run_times, runs
from tests.helpers import wait_until

# Liveness as the tests' environment sets it (tests/helpers.qops_env): a Redis consumer
# is dead 3 s after its last heartbeat; live workers look every 0.5 s.
TTL, INTERVAL = 3.0, 0.5


def test_sigkilled_worker_task_runs_again_once(app, broker, workers, queue, tmp_path):
    import proj.tasks

    path = tmp_path / "runs.txt"
    a = workers.start("a", "-Q", queue, "-c", "1")
    res = proj.tasks.record.apply_async((str(path), 30.0), {"first_only": True}, queue=queue)
    assert wait_until(lambda: runs(path)[res.id] == 1, timeout=30), workers.log(a)
    [child] = run_pids(path, res.id)
    b = workers.start("b", "-Q", queue, "-c", "1")  # idle: a holds the only message
    workers.wait_ready(b)
    time.sleep(INTERVAL)  # b has beaten and looked for dead consumers at least once

    os.kill(a.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
    killed = time.time()
    assert a.wait(10) == -signal.SIGKILL  # (reaped: a zombie's pid would still exist)

    assert wait_until(lambda: runs(path)[res.id] >= 2, timeout=20), workers.log(b)
    took = run_times(path, res.id)[1] - killed
    limit = {"amqp": 1.0, "sqlite": INTERVAL + 1.0, "redis": TTL + INTERVAL + 1.0}
    assert took < limit[broker.kind], f"re-run after {took:.1f}s\n{workers.log(b)}"
    print(f"\n{broker.kind}: the killed worker's task ran again {took:.2f}s later")
    # the pool child died with its parent (PR_SET_PDEATHSIG): it did not go on running
    assert wait_until(lambda: not alive(child), timeout=10)

    assert res.get(timeout=20) == 2  # the second run finished, and it is the one stored
    time.sleep(1.0)
    assert runs(path)[res.id] == 2  # killed run + one re-run, no third
    assert res.state == "SUCCESS"
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 0


def test_killed_pool_child_follows_reject_on_worker_lost(app, broker, workers, tmp_path):
    """Both settings at once, each on its own worker and queue."""
    import proj.tasks

    path = tmp_path / "runs.txt"
    requeue = workers.start("requeue", "-Q", "lost-requeue", "-c", "1")
    fail = workers.start("fail", "-Q", "lost-fail", "-c", "1",
                         QOPS_TASK_REJECT_ON_WORKER_LOST="0")
    again = proj.tasks.record.apply_async((str(path), 30.0), {"first_only": True},
                                          queue="lost-requeue")
    lost = proj.tasks.record.apply_async((str(path), 30.0), {"first_only": True},
                                         queue="lost-fail")
    assert wait_until(lambda: runs(path)[again.id] == 1 and runs(path)[lost.id] == 1,
                      timeout=30), workers.log(requeue) + workers.log(fail)
    for task_id in (again.id, lost.id):
        [child] = run_pids(path, task_id)
        os.kill(child, signal.SIGKILL)

    # default (True): the message goes back to the queue and runs again, to SUCCESS
    assert again.get(timeout=20) == 2
    first, second = run_pids(path, again.id)
    assert first != second  # a new pool child ran it
    # False: FAILURE with WorkerLostError, not run again
    assert wait_until(lambda: lost.state == "FAILURE", timeout=20), workers.log(fail)
    exc = lost.get(timeout=1, propagate=False)
    assert isinstance(exc, WorkerLostError), exc
    assert "killed by SIGKILL" in str(exc)
    time.sleep(1.0)
    assert runs(path)[lost.id] == 1 and runs(path)[again.id] == 2
    assert requeue.proc is not None and requeue.proc.poll() is None
    assert fail.proc is not None and fail.proc.poll() is None
    for stats in app.transport.queue_stats(["lost-requeue", "lost-fail"]):
        assert stats.ready == 0


def test_long_task_runs_once_with_a_watcher(app, broker, workers, queue, tmp_path):
    """A task running > 3 heartbeat TTLs (and > 15 heartbeat intervals) on a healthy
    worker is never handed to the idle second worker."""
    import proj.tasks

    fast = {"QOPS_WORKER_HEARTBEAT_INTERVAL": "0.25", "QOPS_WORKER_HEARTBEAT_TTL": "1.2"}
    path = tmp_path / "runs.txt"
    a = workers.start("a", "-Q", queue, "-c", "1", **fast)
    res = proj.tasks.record.apply_async((str(path), 4.0), queue=queue)
    assert wait_until(lambda: runs(path)[res.id] == 1, timeout=30), workers.log(a)
    b = workers.start("b", "-Q", queue, "-c", "1", **fast)
    workers.wait_ready(b)
    assert res.get(timeout=30) == 1
    time.sleep(0.5)
    assert runs(path)[res.id] == 1
    assert "Recovered" not in workers.log(a) + workers.log(b)
    assert b.proc is not None and b.proc.poll() is None
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 0
