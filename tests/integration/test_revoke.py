"""Revoke and truthful task states, on each real transport.

A task is reserved (``inspect reserved``, PENDING, no ``task-started``) from the moment
the worker takes it until a pool slot starts it; then it is active (STARTED,
``task-started``). Revoking it anywhere before that settles it REVOKED and it never
runs: waiting in the broker, prefetched, held for an ETA; ``terminate`` kills it while
it runs. Revoked ids outlive a restart with ``--statedb``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from qops import App, group
from qops.control import broadcast
from qops.errors import TaskRevokedError
from tests.faults.conftest import runs
from tests.helpers import WorkerProcess, qops_env, wait_until

NODE = "rv@revoke.test"
REPLY = 10.0  # seconds a remote-control call may wait for the node (a busy machine)


@pytest.fixture
def queue() -> str:
    return f"rv-{uuid.uuid4().hex[:8]}"


def worker(urls: tuple[str, str], tmp_path: Path, queue: str, *args: str) -> WorkerProcess:
    """A -c 1 node on ``queue`` that stores STARTED, sends task events, answers pings."""
    broker, backend = urls
    return WorkerProcess("-n", NODE, "-Q", queue, "-c", "1", "-E", *args, broker=broker,
                         backend=backend, env=qops_env(QOPS_TASK_TRACK_STARTED="1"),
                         logfile=tmp_path / "worker.log")


def ask(app: App, method: str, **arguments: Any) -> Any:
    """The node's reply to an inspect or control command."""
    replies = broadcast(app, method, arguments, destination=[NODE], timeout=REPLY).replies
    return replies.get(NODE)


def up(app: App, tmp_path: Path) -> None:
    """Wait for the node: short pings (a node that is not up yet never answers, and
    each long one would wait its whole timeout)."""
    def pong() -> bool:
        return NODE in broadcast(app, "ping", {}, destination=[NODE], timeout=0.5).replies

    assert wait_until(pong, timeout=30), (tmp_path / "worker.log").read_text()


class Events:
    """Task events of the node, collected on a thread of their own (own app)."""

    def __init__(self, broker: str) -> None:
        self.app = App("events", broker=broker)
        self.sub = self.app.transport.subscribe(self.app.names["events"], pattern="task.#")
        self.seen: list[dict[str, Any]] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            msg = self.sub.get(0.2)
            if msg is not None:
                data = json.loads(msg.body)
                self.seen.extend(data if isinstance(data, list) else [data])

    def ids(self, type_: str) -> list[str]:
        return [e["uuid"] for e in list(self.seen) if e.get("type") == type_]

    def close(self) -> None:
        self.stopped = True
        self.thread.join(5)
        self.sub.close()
        self.app.close()


def test_countdown_task_revoked_from_its_result(proj, urls, tmp_path, queue) -> None:
    """``apply_async(countdown=...).revoke()``: REVOKED at once, never run."""
    from proj.qops import app

    runs_file = tmp_path / "runs"
    with worker(urls, tmp_path, queue):
        up(app, tmp_path)
        res = proj.record.apply_async((str(runs_file),), countdown=3, queue=queue)
        assert wait_until(lambda: [s["request"]["id"] for s in ask(app, "scheduled")]
                          == [res.id], timeout=10)
        res.revoke()
        with pytest.raises(TaskRevokedError):
            res.get(timeout=2.5)  # settled before its ETA: not when it falls due
        assert res.state == "REVOKED"
        assert ask(app, "scheduled") == [] and ask(app, "revoked") == [res.id]
        # and a task revoked while it still waits in the broker is never run either
        later = proj.record.apply_async((str(runs_file),), countdown=1, queue=queue)
        app.control.revoke(later.id, reply=True, destination=[NODE])  # before it arrives?
        time.sleep(3.5)
        assert later.state == "REVOKED"
    assert runs(runs_file) == {}


def test_prefetched_tasks_are_reserved_and_can_be_revoked(proj, urls, tmp_path, queue) -> None:
    """A -c 1 worker holding 16: one active and STARTED, 15 reserved and PENDING, one
    ``task-started``; revoking the last 4 leaves them REVOKED, never run, the other 12
    SUCCESS."""
    from proj.qops import app

    runs_file = tmp_path / "runs"
    events = Events(urls[0])
    try:
        with worker(urls, tmp_path, queue, "--prefetch-multiplier", "16"):
            up(app, tmp_path)
            first = proj.record.apply_async((str(runs_file), 4.0), queue=queue)
            rest = [proj.record.apply_async((str(runs_file), 0.05), queue=queue)
                    for _ in range(15)]
            assert wait_until(lambda: len(ask(app, "reserved")) == 15, timeout=15), \
                ask(app, "reserved")
            # (the first task leaves reserved as it starts, and shows as active once its
            # STARTED is stored: a moment later, which a loaded machine can stretch)
            assert wait_until(lambda: [t["id"] for t in ask(app, "active")] == [first.id],
                              timeout=5), ask(app, "active")
            assert first.state == "STARTED"
            assert {r.state for r in rest} == {"PENDING"}
            found = ask(app, "query_task", ids=[first.id, rest[0].id, "nope"])
            assert found[first.id][0] == "active" and found[rest[0].id][0] == "reserved"
            assert "nope" not in found
            assert wait_until(lambda: events.ids("task-started") == [first.id], timeout=5), \
                events.ids("task-started")

            revoked = rest[-4:]
            reply = ask(app, "revoke", task_id=[r.id for r in revoked])
            assert "ok" in reply, reply
            if not urls[0].startswith("amqp"):
                # settled at once, while the first task still runs
                assert wait_until(lambda: {r.state for r in revoked} == {"REVOKED"}, 3)
                assert not first.ready()
                assert len(ask(app, "reserved")) == 11
            # (a pool child that consumes for itself and runs a task has not taken what
            # RabbitMQ sent meanwhile: it settles those when it gets to them)
            for r in rest[:-4]:
                assert r.get(timeout=30) == 1
        assert first.get(timeout=1) == 1
        done = runs(runs_file)
        assert set(done) == {first.id, *(r.id for r in rest[:-4])}
        assert set(done.values()) == {1}
        for r in revoked:
            with pytest.raises(TaskRevokedError):
                r.get(timeout=1)
        assert wait_until(lambda: len(events.ids("task-started")) == 12, timeout=5)
        assert sorted(events.ids("task-started")) == sorted(done)
        assert sorted(events.ids("task-revoked")) == sorted(r.id for r in revoked)
    finally:
        events.close()


def test_group_revoke_and_terminate_from_results(proj, urls, tmp_path, queue) -> None:
    """``GroupResult.revoke()`` revokes every member; ``revoke(terminate=True)`` kills
    the running task (REVOKED, not run again)."""
    from proj.qops import app

    runs_file = tmp_path / "runs"
    with worker(urls, tmp_path, queue):
        up(app, tmp_path)
        gres = group(proj.record.s(str(runs_file)) for _ in range(3)).apply_async(
            queue=queue, countdown=5)
        assert wait_until(lambda: len(ask(app, "scheduled")) == 3, timeout=10)
        gres.revoke()
        for r in gres.results:
            with pytest.raises(TaskRevokedError):
                r.get(timeout=3)
        busy = proj.record.apply_async((str(runs_file), 30.0), queue=queue)
        # running, not only STARTED (stored before the pool process takes the task: a
        # terminate in between kills it before its first line, under load)
        assert wait_until(lambda: runs(runs_file)[busy.id] == 1, timeout=15)
        busy.revoke(terminate=True, wait=True)
        with pytest.raises(TaskRevokedError):
            busy.get(timeout=15)
        after = proj.record.apply_async((str(runs_file),), queue=queue)
        assert after.get(timeout=20) == 1  # the pool replaced its process and goes on
        time.sleep(3)  # a terminated task that came back would run by now, or a member
    assert runs(runs_file) == {busy.id: 1, after.id: 1}


def test_terminate_on_a_threads_pool_says_it_cannot(proj, urls, tmp_path, queue) -> None:
    """A threads node cannot stop a running task: ``revoke --terminate`` answers with an
    error that says so (it answered "none running" and exit 0 while the task ran on),
    and the task, flagged as revoked, runs to its end."""
    from proj.qops import app

    runs_file = tmp_path / "runs"
    with worker(urls, tmp_path, queue, "-P", "threads"):
        up(app, tmp_path)
        busy = proj.record.apply_async((str(runs_file), 2.0), queue=queue)
        assert wait_until(lambda: runs(runs_file)[busy.id] == 1, timeout=15)
        reply = ask(app, "revoke", task_id=busy.id, terminate=True, signal="SIGTERM")
        assert "cannot terminate" in reply["error"] and "threads" in reply["error"]
        assert busy.id in reply["error"]
        idle = ask(app, "revoke", task_id="not-running", terminate=True, signal="SIGTERM")
        assert idle == {"ok": "terminate: none running; tasks not-running flagged as revoked"}
        assert busy.get(timeout=15) == 1  # ran on
    # and it said at start that it would not enforce the time limits proj's tasks have
    [line] = [x for x in (tmp_path / "worker.log").read_text().splitlines()
              if "time limits are not enforced by the threads pool" in x]
    assert line.endswith(": proj.tasks.limited, proj.tasks.stubborn"), line


def test_statedb_keeps_revoked_ids_across_a_restart(proj, urls, tmp_path, queue) -> None:
    from proj.qops import app

    runs_file = tmp_path / "runs"
    task_id = str(uuid.uuid4())
    statedb = tmp_path / "state" / "%n.db"
    (tmp_path / "state").mkdir()
    with worker(urls, tmp_path, queue, "--statedb", str(statedb)):
        up(app, tmp_path)
        reply = app.control.revoke(task_id, reply=True, destination=[NODE], timeout=REPLY)
        assert reply and "ok" in reply[0][NODE]
    assert (tmp_path / "state" / "rv.db").exists()
    # waiting in the broker while no worker runs, then found revoked by the new one
    res = proj.record.apply_async((str(runs_file),), queue=queue, task_id=task_id)
    with worker(urls, tmp_path, queue, "-S", str(statedb)):
        up(app, tmp_path)
        assert ask(app, "revoked") == [task_id]
        with pytest.raises(TaskRevokedError):
            res.get(timeout=20)
        assert proj.record.apply_async((str(runs_file),), queue=queue).get(timeout=20) == 1
    assert task_id not in runs(runs_file)
