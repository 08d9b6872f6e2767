"""Bulk sends: ``Transport.publish_many`` and the API on it (``App.send_many``,
``Task.apply_many``/``delay_many``, ``group``). Every message arrives once, in order;
a failure names exactly the messages the broker did not take, and the others are there."""

from __future__ import annotations

import sqlite3
import struct
import uuid
from collections.abc import Iterator

import pika
import pytest
import redis

from qops import App
from qops.canvas import group
from qops.errors import PublishError, PublishManyError, UsageError
from qops.protocol import Message, parse_task_message
from qops.transports.base import Transport, from_url
from tests.contract import FAST
from tests.helpers import drain


def msg(n: int) -> Message:
    return Message(body=f"[[{n}], {{}}, {{}}]".encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties={"correlation_id": f"id-{n}", "reply_to": ""})


def take(transport: Transport, queue: str, n: int) -> list[Message]:
    """The ``n`` messages on ``queue`` (acked), checking that there is no other."""
    c = transport.consumer([queue], prefetch=max(n, 1) + 1)
    try:
        got = drain(c, n, timeout=10)
        for d in got:
            c.ack(d)
        assert c.get(0.3) is None, "more messages than expected"
    finally:
        c.close()
    out = [d.message for d in got]
    assert len(out) == n, f"{len(out)} of {n} messages arrived"
    return out


def ids(messages: list[Message]) -> list[str]:
    return [m.headers["id"] for m in messages]


def test_each_message_once_in_order(transport: Transport, queue_name: str) -> None:
    other = f"{queue_name}-b"
    items = [(other if i % 3 == 0 else queue_name, msg(i)) for i in range(60)]
    transport.publish_many(items)
    transport.publish_many([])
    for queue in (queue_name, other):
        want = [m.headers["id"] for q, m in items if q == queue]
        assert ids(take(transport, queue, len(want))) == want


@pytest.fixture
def app(real_broker_url: str) -> Iterator[App]:
    a = App(f"bulk-{uuid.uuid4().hex[:6]}", broker=real_broker_url, task_ignore_result=True)

    @a.task(name="bulk.add")
    def add(x: int, y: int = 0) -> int:
        return x + y

    yield a
    a.close()


def test_the_bulk_api_returns_results_in_order(app: App, queue_name: str) -> None:
    add = app.tasks["bulk.add"]
    other = f"{queue_name}-b"
    first = add.delay_many([(i, i) for i in range(5)], queue=queue_name)
    second = add.apply_many([((1,), {"y": 2}), ([3], None, {"task_id": "mine"}),
                             ((4, 4), {}, {"queue": other})], queue=queue_name)
    third = app.send_many([add.s(7, 7), app.signature("bulk.add", (8,), {"y": 8})],
                          queue=queue_name)
    assert app.send_many([]) == []
    assert second[1].id == "mine"
    got = [parse_task_message(m) for m in take(app.transport, queue_name, 9)]
    assert [r.id for r in got] == [r.id for r in first + second[:2] + third]
    assert [(r.args, r.kwargs) for r in got] == [
        *[([i, i], {}) for i in range(5)], ([1], {"y": 2}), ([3], {}), ([7, 7], {}),
        ([8], {"y": 8})]
    [moved] = [parse_task_message(m) for m in take(app.transport, other, 1)]
    assert (moved.id, moved.args) == (second[2].id, [4, 4])


def test_group_sends_its_members_in_one_batch(app: App, queue_name: str) -> None:
    add = app.tasks["bulk.add"]
    result = group(add.s(i, i) for i in range(4)).apply_async(queue=queue_name)
    got = [parse_task_message(m) for m in take(app.transport, queue_name, 4)]
    assert [r.id for r in got] == [r.id for r in result.results]
    assert [(r.group, r.group_index, r.args) for r in got] == [
        (result.id, i, [i, i]) for i in range(4)]


def test_bad_calls_send_nothing(app: App, queue_name: str) -> None:
    add = app.tasks["bulk.add"]
    with pytest.raises(UsageError, match="iterable of argument tuples"):
        add.delay_many([(1,), 2], queue=queue_name)
    with pytest.raises(UsageError, match=r"\(args, kwargs\)"):
        add.apply_many([((1,), {}), (1,)], queue=queue_name)
    with pytest.raises(TypeError, match="bulk.add"):
        add.delay_many([(1,), (1, 2, 3)], queue=queue_name)
    with pytest.raises(UsageError, match="chain"):
        app.send_many([add.s(1) | add.s()], queue=queue_name)
    assert take(app.transport, queue_name, 0) == []


# -- failures: exactly the unconfirmed ones are named --------------------------------------


def test_sqlite_rolls_the_whole_batch_back(sqlite_url: str, queue_name: str) -> None:
    t = from_url(sqlite_url, FAST)
    try:
        t.publish(queue_name, msg(0))
        with sqlite3.connect(t.path) as db:  # type: ignore[attr-defined]
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                       "WHEN CAST(NEW.payload AS TEXT) LIKE '%id-13%' BEGIN SELECT RAISE(ABORT, 'no'); END")
        with pytest.raises(PublishManyError, match="rolled back") as err:
            t.publish_many([(queue_name, msg(i)) for i in range(10, 20)])
        assert err.value.unconfirmed == list(range(10))
        assert ids(take(t, queue_name, 1)) == ["id-0"]
    finally:
        t.close()


def test_redis_names_the_messages_of_a_refused_command(redis_url: str,
                                                       queue_name: str) -> None:
    t = from_url(redis_url, FAST)
    other = f"{queue_name}-b"
    client = redis.Redis.from_url(redis_url)
    try:
        name, _raw = t.encode(other, msg(0))  # type: ignore[attr-defined]
        client.set(t.key(name), "not a list")  # type: ignore[attr-defined]
        items = [(other if i in (3, 4, 8) else queue_name, msg(i)) for i in range(10)]
        with pytest.raises(PublishManyError, match="WRONGTYPE") as err:
            t.publish_many(items)
        assert err.value.unconfirmed == [3, 4, 8]
        assert ids(take(t, queue_name, 7)) == [f"id-{i}" for i in (0, 1, 2, 5, 6, 7, 9)]
    finally:
        client.close()
        t.close()


def _full_queue(amqp_url: str, queue: str, length: int) -> None:
    """Declare ``queue`` holding at most ``length`` messages, refusing (nacking) more."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_declare(queue, durable=True, arguments={
            "x-max-length": length, "x-overflow": "reject-publish"})
    finally:
        conn.close()


def test_amqp_nacks_are_named_and_the_rest_delivered(amqp_url: str, queue_name: str) -> None:
    _full_queue(amqp_url, queue_name, 3)
    app = App(f"bulk-{uuid.uuid4().hex[:6]}", broker=amqp_url, task_ignore_result=True)
    try:
        with pytest.raises(PublishManyError, match="did not confirm 3 of 6") as err:
            app.send_many([app.signature("bulk.x", (i,)) for i in range(6)], queue=queue_name)
        assert err.value.unconfirmed == [3, 4, 5]
        got = take(app.transport, queue_name, 3)
        assert len(err.value.task_ids) == 3 and not set(err.value.task_ids) & set(ids(got))
        # one at a time, the fast path still waits for the confirm: a nack raises
        app.send_many([app.signature("bulk.x", (i,)) for i in range(3)], queue=queue_name)
        with pytest.raises(PublishError, match="nack"):
            app.send_task("bulk.x", (9,), queue=queue_name)
        take(app.transport, queue_name, 3)
    finally:
        app.close()


def test_amqp_acks_are_read_without_pika_and_counted_as_pika_counts(
        amqp_url: str, queue_name: str) -> None:
    """The confirm channel settles the Basic.Ack frames at the start of what it reads
    itself: its own channel's only, up to the first other frame (left to pika, in
    order), and it counts them as pika would (pika's heartbeat checker watches them)."""
    t = from_url(amqp_url, FAST)
    try:
        t.publish(queue_name, msg(0))  # the link and its confirm channel
        confirms = t._link()[0].confirms()
        impl = confirms._impl
        read, frames = impl.bytes_received, impl.frames_received
        for n in range(1, 4):
            t.publish(queue_name, msg(n))  # one Basic.Ack (21 bytes) each
        assert (impl.bytes_received - read, impl.frames_received - frames) == (63, 3)

        def ack(channel: int, tag: int, multiple: int) -> bytes:
            return struct.pack(">BHLLQBB", 1, channel, 13, 0x003C0050, tag, multiple, 0xCE)

        number = confirms._number
        confirms._pending.update({101: 0, 102: 1, 103: 2, 104: 3})
        rest = ack(number + 1, 104, 0) + ack(number, 104, 0)[:9]
        assert confirms._acks(ack(number, 101, 0) + ack(number, 103, 1) + rest) == rest
        assert confirms._pending == {104: 3}
        confirms._pending.clear()
        assert ids(take(t, queue_name, 4)) == [f"id-{n}" for n in range(4)]
    finally:
        t.close()


def test_amqp_redeclares_a_queue_deleted_under_a_batch(amqp_url: str, queue_name: str) -> None:
    t = from_url(amqp_url, FAST)
    try:
        t.publish_many([(queue_name, msg(0))])
        assert ids(take(t, queue_name, 1)) == ["id-0"]
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        conn.channel().queue_delete(queue_name)
        conn.close()
        # declared on this connection before: the broker returns the batch, which is
        # sent again after a new declare
        t.publish_many([(queue_name, msg(i)) for i in range(1, 6)])
        assert ids(take(t, queue_name, 5)) == [f"id-{i}" for i in range(1, 6)]
    finally:
        t.close()
