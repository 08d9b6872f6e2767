"""A real worker process on each real transport, driven through the library API."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from qops.errors import TaskRevokedError, TimeLimitExceeded
from qops.protocol import Message
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, qops_env, run_qops, wait_until


@pytest.fixture
def queue() -> str:
    return f"itq-{uuid.uuid4().hex[:8]}"


def worker(urls: tuple[str, str], tmp_path: Path, *args: str) -> WorkerProcess:
    broker, backend = urls
    # STARTED states let the tests see when a task really runs
    return WorkerProcess(*args, broker=broker, backend=backend,
                         env=qops_env(QOPS_TASK_TRACK_STARTED="1"),
                         logfile=tmp_path / "worker.log")


def test_round_trip_and_failures(proj, urls, tmp_path) -> None:
    with worker(urls, tmp_path, "-c", "2"):
        assert proj.add.delay(2, 3).get(timeout=20) == 5
        with pytest.raises(ValueError, match="kaboom"):
            proj.fail.delay().get(timeout=10)
        exc = proj.fail.delay("quiet").get(timeout=10, propagate=False)
        assert isinstance(exc, ValueError) and str(exc) == "quiet"
        res = proj.fail.delay("tb")
        with pytest.raises(ValueError):
            res.get(timeout=10)
        assert res.failed() and "ValueError: tb" in res.traceback
        assert proj.flaky.delay(2).get(timeout=10) == 2
        chained = (proj.add.s(2, 2) | proj.mul.s(8) | proj.add.s(1)).delay()
        assert chained.get(timeout=10) == 33


def test_poison_messages_are_dead_lettered_and_worker_goes_on(proj, urls, tmp_path, queue):
    from proj.qops import app

    transport = app.transport
    good = Message(body=b"[[1, 2], {}, {}]",
                   headers={"task": "proj.tasks.add", "id": str(uuid.uuid4())},
                   properties={"correlation_id": "x"})
    bad_json = Message(body=b"[[1, 2", headers={"task": "proj.tasks.add", "id": "bad-json"})
    v1 = Message(body=b'{"task": "proj.tasks.add", "args": [1, 2]}', headers={})
    unknown = Message(body=b"[[], {}, {}]", headers={"task": "nope.missing", "id": "unknown"})
    wrong_args = Message(body=b"[[1, 2, 3], {}, {}]",
                         headers={"task": "proj.tasks.add", "id": "wrong-args"})
    for m in (bad_json, v1, unknown, wrong_args):
        transport.publish(queue, m)
    res = proj.add.apply_async((20, 22), queue=queue)
    with worker(urls, tmp_path, "-Q", queue, "-P", "threads"):
        assert res.get(timeout=20) == 42
        assert wait_until(lambda: len([d for d in transport.dead_letters()
                                        if d.queue == queue]) == 4, timeout=10)
    reasons = sorted(d.reason for d in transport.dead_letters() if d.queue == queue)
    assert any("not valid JSON" in r for r in reasons)
    assert any("protocol v1" in r for r in reasons)
    assert any("unknown task 'nope.missing'" in r for r in reasons)
    assert any("arguments do not fit" in r for r in reasons)
    # The clients waiting on broken tasks are told, not left hanging.
    with pytest.raises(TypeError):
        app.AsyncResult("wrong-args").get(timeout=5)
    del good


def test_warm_shutdown_lets_running_task_finish(proj, urls, tmp_path) -> None:
    w = worker(urls, tmp_path, "-c", "1").start()
    try:
        assert proj.add.delay(1, 1).get(timeout=20) == 2
        res = proj.sleep.delay(1.5)
        assert wait_until(lambda: res.state == "STARTED", timeout=10)
        w.signal(signal.SIGTERM)
        assert w.wait(20) == 0
        assert res.get(timeout=5) == 1.5
    finally:
        w.stop()


def test_warm_shutdown_returns_prefetched(proj, urls, tmp_path, queue) -> None:
    """Reserved-but-unstarted messages go back to the queue at once on TERM."""
    from proj.qops import app

    w = worker(urls, tmp_path, "-c", "1", "-Q", queue, "--prefetch-multiplier", "4").start()
    try:
        first = proj.sleep.apply_async((1.5,), queue=queue)
        rest = [proj.add.apply_async((i, i), queue=queue) for i in range(3)]
        assert wait_until(lambda: first.state == "STARTED", timeout=15)
        time.sleep(0.3)  # let the worker prefetch the rest
        w.signal(signal.SIGTERM)
        assert w.wait(20) == 0
        assert first.get(timeout=5) == 1.5
        [stats] = app.transport.queue_stats([queue])
        assert stats.ready == 3 and stats.in_flight == 0
    finally:
        w.stop()
    with worker(urls, tmp_path, "-c", "1", "-Q", queue):
        assert [r.get(timeout=20) for r in rest] == [0, 2, 4]


def test_countdown_expires_and_time_limits(proj, urls, tmp_path) -> None:
    with worker(urls, tmp_path, "-c", "2"):
        assert proj.add.delay(0, 0).get(timeout=20) == 0
        sent = time.monotonic()
        later = proj.add.apply_async((1, 2), countdown=1.5)
        quick = proj.add.delay(5, 5)
        assert quick.get(timeout=10) == 10
        assert time.monotonic() - sent < 1.5  # the countdown did not block the pool
        assert later.get(timeout=10) == 3
        assert time.monotonic() - sent >= 1.4
        expired = proj.add.apply_async((1, 1), expires=-1)
        assert isinstance(expired.get(timeout=10, propagate=False), Exception)
        assert expired.state == "REVOKED"
        assert proj.limited.delay(5).get(timeout=10) == "soft limit hit"
        killed = proj.sleep.apply_async((10,), time_limit=1)
        with pytest.raises(TimeLimitExceeded):
            killed.get(timeout=10)
        assert proj.add.delay(3, 4).get(timeout=10) == 7  # the pool replaced its child



def test_revoke_terminate_ends_the_running_task(proj, urls, tmp_path) -> None:
    """``control revoke --terminate`` (TERM by default) ends the pool process running the
    task, although pool children ignore a TERM sent to the whole process group."""
    with worker(urls, tmp_path, "-c", "1"):
        before = proj.pid.delay().get(timeout=20)
        res = proj.sleep.delay(30)
        assert wait_until(lambda: res.state == "STARTED", timeout=10)
        r = run_qops("-b", urls[0], "control", "revoke", res.id, "--terminate",
                     "--timeout", REPLY_TIMEOUT)
        assert r.returncode == 0, r.stdout + r.stderr
        with pytest.raises(TaskRevokedError):
            res.get(timeout=20)
        assert proj.pid.delay().get(timeout=20) != before  # a new pool process


def test_max_tasks_per_child_replaces_the_pool_process(proj, urls, tmp_path) -> None:
    with worker(urls, tmp_path, "-c", "1", "--max-tasks-per-child", "2"):
        pids = [proj.pid.delay().get(timeout=20) for _ in range(6)]
    # one process per two tasks, each replaced after its second
    assert [len(set(pids[i:i + 2])) for i in range(0, 6, 2)] == [1, 1, 1], pids
    assert len(set(pids)) == 3, pids
