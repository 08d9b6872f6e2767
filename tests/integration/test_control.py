"""Two real worker nodes per transport, driven through the CLI: control, inspect,
status, purge, queues, events -- with the exit codes scripts rely on."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qops.protocol import Message
from tests.helpers import REPLY_TIMEOUT, WorkerProcess, run_qops, wait_until

W1, W2 = "w1@ctl.test", "w2@ctl.test"


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def cluster(broker: str, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    queue = f"ctl-{uuid.uuid4().hex[:8]}"
    nodes = {name: WorkerProcess("-n", name, "-Q", queue, "-P", "threads", "-c", "2",
                                 "-l", "INFO", broker=broker, backend=broker if "amqp" not in broker
                                 else None, logfile=tmp_path / f"{name}.log")
             for name in (W1, W2)}
    for w in nodes.values():
        w.start()
    try:
        for w in nodes.values():
            w.wait_ready()
        assert wait_until(lambda: qops(broker, "status", "-d", f"{W1},{W2}").returncode == 0,
                          timeout=30), "the nodes did not come up"
        yield nodes
    finally:
        for w in nodes.values():
            w.stop()


def qops(broker: str, *args: str) -> object:
    return run_qops("-b", broker, *args)


def j(broker: str, *args: str) -> tuple[int, dict]:
    if args[0] in ("inspect", "control", "status") and "--timeout" not in args:
        args = (*args, "--timeout", REPLY_TIMEOUT)
    r = run_qops("-b", broker, "--json", *args)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {})


def test_status_inspect_control(broker: str, cluster: dict[str, WorkerProcess]) -> None:
    start = time.monotonic()
    code, doc = j(broker, "status", "--timeout", "30")
    assert code == 0 and sorted(doc["nodes"]) == [W1, W2]
    # it returned when both nodes had replied, not at the 30 s deadline (the wall time
    # includes starting the CLI's Python, seconds on a busy machine)
    assert time.monotonic() - start < 15 and doc["elapsed"] < 2

    code, doc = j(broker, "inspect", "registered", "-d", W1)
    assert code == 0 and list(doc["replies"]) == [W1]
    assert "proj.tasks.add" in doc["replies"][W1]
    assert not [n for n in doc["replies"][W1] if n.startswith("celery.")]  # as Celery's

    code, doc = j(broker, "inspect", "stats")
    assert code == 0
    assert doc["replies"][W1]["pool"]["implementation"] == "threads"
    assert doc["replies"][W2]["pid"] == cluster[W2].pid

    code, doc = j(broker, "control", "rate_limit", "proj.tasks.add", "10/m")
    assert code == 0
    assert doc["replies"] == {W1: {"ok": "new rate limit set successfully"},
                              W2: {"ok": "new rate limit set successfully"}}
    code, doc = j(broker, "control", "rate_limit", "proj.tasks.nope", "1/s")
    assert code == 1 and "unknown task" in doc["replies"][W1]["error"]
    r = qops(broker, "control", "rate_limit", "proj.tasks.add", "10/x")
    assert r.returncode == 2 and "10/x" in r.stderr

    code, doc = j(broker, "inspect", "active_queues", "-d", W2)
    assert code == 0 and doc["replies"][W2][0]["name"].startswith("ctl-")

    r = qops(broker, "inspect", "no_such_method")
    assert r.returncode == 2
    r = qops(broker, "control", "--list")
    assert r.returncode == 0 and "rate_limit" in r.stdout


def test_inspect_active_shows_running_task(broker: str, cluster: dict[str, WorkerProcess]):
    code, doc = j(broker, "inspect", "active_queues", "-d", W1)
    queue = doc["replies"][W1][0]["name"]
    # long enough to be still running at the query_task below, on a busy machine too
    r = run_qops("-A", "proj", "-b", broker, "call", "proj.tasks.sleep", "--args", "[8]",
                 "--queue", queue)
    task_id = r.stdout.strip()

    def seen() -> bool:
        _, d = j(broker, "inspect", "active")
        return any(t["id"] == task_id for ts in d.get("replies", {}).values() for t in ts)

    assert wait_until(seen, timeout=10)
    code, doc = j(broker, "inspect", "query_task", task_id)
    assert code == 0
    assert any(task_id in rep for rep in doc["replies"].values())
    r = qops(broker, "inspect", "query_task", task_id, "--timeout", REPLY_TIMEOUT)  # a node without it: empty, no error
    assert r.returncode == 0 and "ERROR" not in r.stdout and "- empty -" in r.stdout, r.stdout
    for w in cluster.values():  # cold shutdown: don't wait for the sleeping task
        w.signal(signal.SIGQUIT)


def test_shutdown_partial_and_no_nodes(broker: str, cluster: dict[str, WorkerProcess]):
    code, doc = j(broker, "control", "shutdown", "-d", W2)
    assert code == 0 and doc["replies"] == {W2: {"ok": "shutting down"}}
    assert cluster[W2].wait(20) == 0  # replied, then went down cleanly
    # W2 never answers, so status waits the whole timeout: long enough for W1 to answer
    # on a loaded machine
    code, doc = j(broker, "status", "-d", f"{W1},{W2}", "--timeout", "3")
    assert code == 75 and doc["missing"] == [W2] and list(doc["nodes"]) == [W1]
    code, doc = j(broker, "status")
    assert code == 0 and list(doc["nodes"]) == [W1]  # W2 left the live set
    cluster[W1].stop()
    code, doc = j(broker, "status", "--timeout", "0.5")
    assert code == 69 and doc["nodes"] == {}
    r = qops(broker, "control", "ping", "--timeout", "0.5")
    assert r.returncode == 69
    assert "qops: error: no nodes replied within 0.5s" in r.stderr.splitlines(), r.stderr


def test_purge_counts_and_leaves_other_queues(broker: str) -> None:
    from qops.transports.base import from_url

    t = from_url(broker)
    q1, q2 = f"p1-{uuid.uuid4().hex[:6]}", f"p2-{uuid.uuid4().hex[:6]}"
    try:
        for i in range(3):
            t.publish(q1, Message(body=b"[[], {}, {}]", headers={"task": "x", "id": str(i)}))
        for i in range(2):
            t.publish(q2, Message(body=b"[[], {}, {}]", headers={"task": "x", "id": str(i)}))
        code, doc = j(broker, "purge", "-Q", q1, "--dry-run")
        assert code == 0 and doc["queues"][q1]["purged"] == 3
        r = qops(broker, "purge", "-Q", q1)
        assert r.returncode == 2 and "--force" in r.stderr  # no TTY, no -f
        code, doc = j(broker, "purge", "-Q", q1, "-f")
        assert code == 0 and doc["queues"] == {q1: {"purged": 3, "in_flight": 0}}
        code, doc = j(broker, "queues", "-Q", f"{q1},{q2}")
        assert {q["name"]: q["ready"] for q in doc} == {q1: 0, q2: 2}
        r = qops(broker, "purge", "-Q", f"{q2},nope-{uuid.uuid4().hex[:4]}", "-f")
        assert r.returncode == 1 and "no such queue" in r.stderr
        code, doc = j(broker, "queues", "-Q", q2)
        assert doc[0]["ready"] == 2  # nothing was purged
    finally:
        t.purge(q1)
        t.purge(q2)
        t.close()


def test_events_stream(broker: str, cluster: dict[str, WorkerProcess]) -> None:
    r = qops(broker, "events", "--type", "worker-heartbeat,task-bogus", "--count", "1")
    assert r.returncode == 2 and "no event type 'task-bogus'" in r.stderr, r.stderr
    r = run_qops("-b", broker, "--json", "events", "--count", "2", "--timeout", "5",
                 "--type", "worker-h*")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) == 2
    assert {e["hostname"] for e in events} <= {W1, W2}
    assert all(e["type"] == "worker-heartbeat" and "freq" in e for e in events)
