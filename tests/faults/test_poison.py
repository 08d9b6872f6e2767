"""Poison input on each transport (issue item 5), and the ``qops dlq`` commands.

Each bad message is dead-lettered once with its reason, the worker goes on with the next
message, and ``qops dlq list/requeue/purge`` manage what was kept. Raw bytes are put on
the broker the way a broken or foreign producer would: an LPUSH on Redis, a row on
SQLite, a pika publish on RabbitMQ.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from qops.errors import NotRegistered
from qops.protocol import Message
from tests.faults.conftest import Broker
from tests.helpers import qops_env, run_qops, wait_until


def inject(broker: Broker, transport: Any, queue: str, raw: bytes,
           headers: dict[str, Any] | None = None) -> None:
    """Put ``raw`` on ``queue`` as it is, bypassing qops's producer: on Redis and SQLite
    ``raw`` is the whole kombu envelope; on RabbitMQ it is the body, sent with
    ``headers`` and content type JSON."""
    if broker.kind == "redis":
        import redis

        transport.bind([queue])  # the kombu binding, as any producer writes it
        client = redis.Redis.from_url(broker.url)
        try:
            client.lpush(queue, raw)
        finally:
            client.close()
    elif broker.kind == "sqlite":
        with transport.db.write() as conn:
            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
            conn.execute("INSERT INTO messages (queue, priority, payload) VALUES (?, 0, ?)",
                         (queue, raw))
    else:
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(broker.url.split("?")[0]))
        try:
            ch = conn.channel()
            ch.queue_declare(queue, durable=True)
            ch.basic_publish("", queue, raw, pika.BasicProperties(
                content_type="application/json", content_encoding="utf-8",
                headers=headers or {}, delivery_mode=2))
        finally:
            conn.close()


def envelope(body: str, *, base64_body: bool = True, **headers: Any) -> bytes:
    """A kombu envelope with ``body`` as it is (not encoded by us)."""
    props = {"body_encoding": "base64"} if base64_body else {}
    return json.dumps({"body": body, "content-type": "application/json",
                       "content-encoding": "utf-8", "headers": headers,
                       "properties": {**props, "delivery_tag": str(uuid.uuid4()),
                                      "priority": 0}}).encode()


def dead_letters(broker: Broker, *extra: str) -> list[dict[str, Any]]:
    p = run_qops("-b", broker.url, "dlq", "list", "--json", *extra, env=qops_env())
    assert p.returncode == 0, p.stderr
    out: list[dict[str, Any]] = json.loads(p.stdout)
    return out


def dlq(broker: Broker, *args: str) -> Any:
    return run_qops("-b", broker.url, "dlq", *args, env=qops_env())


def test_poison_is_dead_lettered_and_dlq_commands(app, broker, workers, queue):
    import proj.tasks

    transport = app.transport
    # 1. an envelope that is not JSON (RabbitMQ has no envelope: a body that is not)
    if broker.kind == "amqp":
        inject(broker, transport, queue, b'{"body": "cut sho',
               {"task": "proj.tasks.add", "id": "raw-json"})
    else:
        inject(broker, transport, queue, b'{"body": "cut sho')
    # 2. a body that can't be decoded: bad base64 (Redis/SQLite), bytes that are not
    #    UTF-8 (RabbitMQ)
    if broker.kind == "amqp":
        inject(broker, transport, queue, b"\xff\xfe[[1, 2], {}, {}]",
               {"task": "proj.tasks.add", "id": "raw-bytes"})
    else:
        inject(broker, transport, queue, envelope("%%% not base64 %%%", task="proj.tasks.add",
                                                  id="raw-b64"))
    publish = transport.publish
    # 3. a task message whose body is not JSON
    publish(queue, Message(body=b"[[1, 2", headers={"task": "proj.tasks.add",
                                                    "id": "bad-json"}))
    # 4. protocol v1 (no headers; the task name in the body)
    publish(queue, Message(body=b'{"task": "proj.tasks.add", "args": [1, 2]}', headers={}))
    # 5. a task name no worker knows
    missing = app.send_task("nope.missing", queue=queue)
    # 6. arguments that do not fit the signature
    wrong = app.send_task("proj.tasks.add", [1, 2, 3], queue=queue)
    # 7. a task this (old) worker does not know yet, but the new code will
    later = proj.tasks.mul.apply_async((2, 3), queue=queue)
    good = proj.tasks.add.apply_async((20, 22), queue=queue)

    old = workers.start("old", "-Q", queue, "-P", "threads", app="tests.faults.oldapp")
    assert good.get(timeout=30) == 42  # the worker went on past every bad message
    assert wait_until(lambda: len(transport.dead_letters()) >= 7, timeout=10), \
        workers.log(old)[-3000:]
    time.sleep(0.3)
    assert old.proc is not None and old.proc.poll() is None
    assert old.stop() == 0

    # -- qops dlq list --json: each one once, with its reason
    items = dead_letters(broker)
    assert len(items) == 7, items
    assert {d["queue"] for d in items} == {queue}
    reasons = sorted(d["reason"] for d in items)
    text = "\n".join(reasons)
    if broker.kind == "amqp":
        assert sum("body is not valid JSON" in r for r in reasons) == 3, text
    else:
        assert any("invalid JSON envelope" in r for r in reasons), text
        assert any("invalid base64 body" in r for r in reasons), text
        assert any("body is not valid JSON" in r for r in reasons), text
    assert any("protocol v1" in r for r in reasons), text
    assert any("unknown task 'nope.missing'" in r for r in reasons), text
    assert any("unknown task 'proj.tasks.mul'" in r for r in reasons), text
    assert any("arguments do not fit proj.tasks.add" in r for r in reasons), text
    # each names its task, where the message says it: an operator traces them back
    named = {d["task_id"]: d["task"] for d in items if d["task_id"]}
    assert named[missing.id] == "nope.missing" and named[wrong.id] == "proj.tasks.add"
    assert named[later.id] == "proj.tasks.mul" and named["bad-json"] == "proj.tasks.add"
    # clients waiting on tasks that can't run are told
    assert isinstance(missing.get(timeout=5, propagate=False), NotRegistered)
    assert isinstance(wrong.get(timeout=5, propagate=False), TypeError)
    assert later.state == "FAILURE"

    # -- requeue one by id, after deploying the code that knows it
    [mul] = [d for d in items if "proj.tasks.mul" in d["reason"]]
    p = dlq(broker, "requeue", mul["id"])
    assert p.returncode == 0 and "requeued 1 message" in p.stdout, p.stdout + p.stderr
    p = dlq(broker, "requeue", "no-such-id")
    assert p.returncode == 1 and "not found" in p.stderr, p.stdout + p.stderr
    new = workers.start("new", "-Q", queue, "-P", "threads")
    # (a fresh AsyncResult: one that has seen a final state keeps it)
    assert wait_until(lambda: app.AsyncResult(later.id).state == "SUCCESS", timeout=30), \
        workers.log(new)[-3000:]
    # the SUCCESS replaced the old worker's FAILURE (only a SUCCESS is never replaced)
    assert app.AsyncResult(later.id).get(timeout=1) == 6
    assert len(dead_letters(broker)) == 6

    # -- requeue --all: still poison, so each comes back to the DLQ once, no loop
    p = dlq(broker, "requeue", "--all", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == {"requeued": 6, "not_found": 0}, \
        p.stdout + p.stderr
    assert wait_until(lambda: len(transport.dead_letters()) == 6, timeout=15)
    assert sorted(d["reason"] for d in dead_letters(broker)
                  if "unknown task 'proj.tasks.mul'" not in d["reason"]) == \
        [r for r in reasons if "unknown task 'proj.tasks.mul'" not in r]
    time.sleep(0.5)
    [stats] = transport.queue_stats([queue])
    assert stats.ready == 0 and len(transport.dead_letters()) == 6
    assert new.proc is not None and new.proc.poll() is None

    # -- purge: needs -f without a terminal
    p = dlq(broker, "purge")
    assert p.returncode == 2 and "--force" in p.stderr
    p = dlq(broker, "purge", "-f", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == {"purged": 6}, p.stdout + p.stderr
    assert dead_letters(broker) == []
    assert proj.tasks.add.apply_async((1, 1), queue=queue).get(timeout=20) == 2


def test_oversized_message_is_dead_lettered(app, broker, workers, queue):
    """The worker's limit is 4 KiB; this producer's is the default (16 MiB)."""
    import proj.tasks


    big = proj.tasks.add.apply_async(("x" * 10_000, "y"), queue=queue)
    good = proj.tasks.add.apply_async((20, 22), queue=queue)
    w = workers.start("w", "-Q", queue, "-P", "threads", QOPS_TASK_MAX_MESSAGE_SIZE="4096")
    workers.wait_ready(w)
    assert wait_until(lambda: good.ready() or w.proc.poll() is not None, timeout=30)
    assert w.proc.poll() is None, f"the worker exited:\n{workers.log(w)[-2000:]}"
    assert good.get(timeout=1) == 42  # the worker went on
    assert big.state != "SUCCESS", "the oversized message ran"
    [dead] = app.transport.dead_letters()
    assert dead.queue == queue and "4096" in dead.reason, dead.reason
    assert len(dead.raw) > 4096


def test_unparseable_task_with_an_id_tells_its_client(app, broker, workers, queue):
    """guarantees.md: where a bad message has a task id and there is a result backend,
    the task is marked FAILURE so that a client waiting on it is told."""
    task_id = str(uuid.uuid4())
    app.transport.publish(queue, Message(body=b"[[1, 2", headers={"task": "proj.tasks.add",
                                                                  "id": task_id}))
    good = app.send_task("proj.tasks.add", [1, 2], queue=queue)
    workers.start("w", "-Q", queue, "-P", "threads")
    assert good.get(timeout=30) == 3
    assert wait_until(lambda: len(app.transport.dead_letters()) == 1, timeout=5)
    assert app.AsyncResult(task_id).state == "FAILURE"


def break_dead_letter_store(broker: Broker, transport: Any) -> None:
    """Make every dead-letter write fail, as a full or misconfigured broker would."""
    if broker.kind == "redis":
        transport._client.set("qops.dlq", "not a hash")  # WRONGTYPE for HSET
    elif broker.kind == "sqlite":
        with transport.db.write() as conn:
            conn.execute("CREATE TRIGGER dlq_full BEFORE INSERT ON dead_letters "
                         "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    else:
        import pika

        params = pika.URLParameters(broker.url.split("?")[0])
        dlq_name = broker.url.split("dead_letter_queue=")[1]
        conn = pika.BlockingConnection(params)
        try:  # a DLQ that is full and refuses more (qops uses a queue as it finds it)
            conn.channel().queue_declare(dlq_name, durable=True, arguments={
                "x-max-length": 0, "x-overflow": "reject-publish"})
        finally:
            conn.close()


def test_worker_survives_a_failing_dead_letter_store(app, broker, workers, queue):
    """The DLQ can't be written: the bad message must stay (not lost, not acked) and the
    worker must go on with the good ones."""
    break_dead_letter_store(broker, app.transport)
    app.transport.publish(queue, Message(body=b"[[1, 2", headers={"task": "proj.tasks.add",
                                                                  "id": "bad-json"}))
    good = app.send_task("proj.tasks.add", [1, 2], queue=queue)
    w = workers.start("w", "-Q", queue, "-P", "threads")
    assert wait_until(lambda: good.ready() or w.proc.poll() is not None, timeout=30)
    assert w.proc.poll() is None, f"the worker exited:\n{workers.log(w)[-1500:]}"
    assert good.get(timeout=1) == 3
    assert w.stop() == 0
    [stats] = app.transport.queue_stats([queue])
    assert stats.ready == 1  # the bad message is still there, to be dead-lettered later


def test_envelope_helper_is_valid_for_good_base64() -> None:
    """(Self-check of ``envelope``: with a real base64 body it is a valid envelope.)"""
    from qops.protocol import decode_envelope

    body = base64.b64encode(b"[[1, 2], {}, {}]").decode()
    msg = decode_envelope(envelope(body, task="proj.tasks.add", id="x"))
    assert msg.body == b"[[1, 2], {}, {}]" and msg.headers["task"] == "proj.tasks.add"
