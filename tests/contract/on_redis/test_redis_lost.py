"""Worker-lost records on Redis (qops/transports/redis/lost.py): a message runs
unwatched (no write when it starts) until a node whose tasks run in its own process
(solo, threads: registered ``unseen``) dies holding it; from then on it is watched
(its start written before it runs) until it is acked or dead-lettered."""

from __future__ import annotations

import hashlib

import pytest
import redis

from qops.protocol import Message
from qops.transports.redis import RedisConsumer, RedisTransport
from tests.helpers import drain

pytestmark = pytest.mark.redis


def msg(n: int) -> Message:
    return Message(body=b"[[], {}, {}]", headers={"id": f"id-{n}", "task": "t"},
                   properties={"delivery_tag": f"tag-{n}"})


def record(raw: redis.Redis, d) -> dict[bytes, bytes]:
    return raw.hgetall("qops.lost." + hashlib.sha1(d.raw).hexdigest())


def lost_keys(raw: redis.Redis) -> list[bytes]:
    return sorted(raw.scan_iter("qops.lost.*"))


def consumer(t: RedisTransport, cid: str, prefetch: int = 3) -> RedisConsumer:
    c = t.consumer(["q"], prefetch=prefetch, consumer_id=cid)
    assert isinstance(c, RedisConsumer)
    return c


def die(t: RedisTransport, raw: redis.Redis, cid: str) -> None:
    """What a node killed with its process looks like to the others: its heartbeat
    lapses and another node's recover() gives back what it held."""
    raw.delete(f"qops.alive.{cid}")
    assert t.recover() > 0


def test_a_start_without_a_record_writes_nothing(transport: RedisTransport,
                                                 raw: redis.Redis) -> None:
    transport.publish("q", msg(1))
    c = consumer(transport, "w1")
    try:
        [d] = drain(c, 1)
        assert not d.redelivered
        c.mark_started(d)
        assert lost_keys(raw) == []
        assert raw.hget("qops.consumer.w1", "unseen") == b"1"
        c.heartbeat()  # registering again keeps it
        assert raw.hget("qops.consumer.w1", "unseen") == b"1"
        c.ack(d)
    finally:
        c.close()
    assert lost_keys(raw) == []


def test_a_dead_unseen_consumer_leaves_a_record_on_all_it_held(
        transport: RedisTransport, raw: redis.Redis) -> None:
    """Started or only taken: nobody saw what it ran. Each counts one loss at its next
    delivery, then runs watched."""
    for i in range(3):
        transport.publish("q", msg(i))
    dead = consumer(transport, "dead")
    got = drain(dead, 3)
    dead.mark_started(got[0])
    assert not raw.exists("qops.lost")
    die(transport, raw, "dead")
    assert len(lost_keys(raw)) == 3
    assert all(record(raw, d) == {b"running": b"?"} for d in got)
    flag_outlives_records(raw)
    c = consumer(transport, "w2")
    try:
        again = drain(c, 3)
        assert [d.message.headers["id"] for d in again] == ["id-0", "id-1", "id-2"]
        assert all(d.redelivered for d in again)
        assert [c.worker_lost(d) for d in again] == [(1, True)] * 3
        raw.expire("qops.lost", 10)
        c.mark_started(again[0])  # watched: its start is written
        assert record(raw, again[0]) == {b"count": b"1", b"running": b"w2"}
        flag_outlives_records(raw)
        for d in again:
            c.ack(d)
        c.heartbeat()  # the acks and the record's delete go
        assert lost_keys(raw) == []
    finally:
        c.close()


def flag_outlives_records(raw: redis.Redis) -> None:
    """``qops.lost`` (the reserve script looks for records only when it exists) expires
    no sooner than any record: every write of a record sets both."""
    ttls = [raw.ttl(k) for k in lost_keys(raw)]
    assert ttls and raw.ttl("qops.lost") >= max(ttls) > 0


def test_records_are_looked_for_only_when_some_exist(transport: RedisTransport,
                                                     raw: redis.Redis) -> None:
    """Without ``qops.lost`` the reserve skips the per-message lookup (a SHA-1 of the
    payload each): a record left without it (by hand here) is not seen."""
    transport.publish("q", msg(1))
    c = consumer(transport, "w1")
    try:
        [d] = drain(c, 1)
        c.requeue(d)
        raw.hset("qops.lost." + hashlib.sha1(d.raw).hexdigest(), "running", "?")
        [d] = drain(c, 1)
        assert not d.redelivered
        c.requeue(d)
        raw.set("qops.lost", 1)
        [d] = drain(c, 1)
        assert d.redelivered and c.worker_lost(d) == (1, True)
        flag_outlives_records(raw)
    finally:
        c.close()


def test_a_record_without_the_key_is_looked_for_after_a_death(
        transport: RedisTransport, raw: redis.Redis) -> None:
    """A record an older qops wrote (no ``qops.lost``) is not seen at first, so the
    message runs unwatched; the death of the node holding it sets the key, and the
    count goes on from the record instead of the message running again uncounted."""
    transport.publish("q", msg(1))
    c = consumer(transport, "w1")
    [d] = drain(c, 1)
    raw.hset("qops.lost." + hashlib.sha1(d.raw).hexdigest(), "count", 2)
    c.mark_started(d)  # unwatched: nothing written
    die(transport, raw, "w1")
    c2 = consumer(transport, "w2")
    try:
        [d] = drain(c2, 1)
        assert d.redelivered and c2.worker_lost(d) == (2, False)
    finally:
        c2.close()


def test_a_watched_message_not_started_is_not_counted_again(
        transport: RedisTransport, raw: redis.Redis) -> None:
    transport.publish("q", msg(1))
    first = consumer(transport, "first", prefetch=1)
    [d] = drain(first, 1)
    first.mark_started(d)
    die(transport, raw, "first")
    transport.publish("q", msg(2))
    second = consumer(transport, "second")
    [d, e] = drain(second, 2)
    assert second.worker_lost(d) == (1, True)
    second.mark_started(e)  # unwatched: nothing written
    die(transport, raw, "second")  # d held, counted, never started; e started
    assert record(raw, d) == {b"count": b"1"}
    assert record(raw, e) == {b"running": b"?"}
    third = consumer(transport, "third")
    try:
        [d, e] = drain(third, 2)
        assert d.redelivered and third.worker_lost(d) == (1, False)
        assert e.redelivered and third.worker_lost(e) == (1, True)
    finally:
        third.close()


def test_consumers_that_never_ran_a_task_leave_no_record(transport: RedisTransport,
                                                         raw: redis.Redis) -> None:
    """A prefork node's consumer (its children run the tasks: the node sees a death)
    never registers as unseen; nor do messages given back on close count."""
    for i in range(2):
        transport.publish("q", msg(i))
    parent = consumer(transport, "prefork")
    drain(parent, 2)
    die(transport, raw, "prefork")
    closing = consumer(transport, "closing")
    [d, _] = drain(closing, 2)
    closing.mark_started(d)  # unseen, but it closes: nothing of it died
    closing.close()
    assert lost_keys(raw) == []
    c = consumer(transport, "w3")
    try:
        assert not any(d.redelivered for d in drain(c, 2))
    finally:
        c.close()


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_the_worker_tells_its_consumer_where_tasks_settle(redis_url: str, pool: str) -> None:
    """Acks from the solo and threads pools' own threads yield the GIL to a get() waiting
    to reserve (RedisConsumer.ack); prefork's slot threads don't (9% slower with it)."""
    from qops import App
    from qops.worker.pool import ThreadPool
    from qops.worker.prefork import PreforkPool
    from qops.worker.worker import Worker

    assert not issubclass(PreforkPool, ThreadPool)  # (prefork: the consumer's default)
    app = App("lostpools", broker=redis_url)
    w = Worker(app, hostname=f"pools-{pool}@test", queues=["q"], pool=pool, concurrency=1,
               task_events=False)
    w.connect()
    consumer = w.loop.consumer
    assert consumer is not None and consumer.pool_threads is False
    try:
        w.start_pool()
        assert consumer.pool_threads is True
        w.pool.stop(5)
    finally:
        consumer.close()
        app.close()
