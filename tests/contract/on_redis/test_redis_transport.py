"""Redis-only behaviour: the kombu wire layout, qops's in-flight keys, failure modes.

Runs against the real server in the test database (the ``redis_url`` fixture flushes it
before and after each test). Raw keys are inspected with a plain redis-py client, the way
a Celery 5 client or worker would see them.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import pytest
import redis

from qops.errors import BrokerUnreachable, PublishError, UsageError
from qops.protocol import Message
from qops.transports.base import TransportOptions, from_url
from qops.transports.redis import RedisConsumer, RedisTransport, split_url
from tests.contract import FAST
from tests.contract.on_redis import SEP
from tests.helpers import drain

pytestmark = pytest.mark.redis


def msg(n: int, priority: int | None = None, body: bytes | None = None) -> Message:
    props: dict[str, object] = {"correlation_id": f"id-{n}", "reply_to": "r"}
    if priority is not None:
        props["priority"] = priority
    return Message(body=body if body is not None else f"[[{n}], {{}}, {{}}]".encode(),
                   headers={"task": "t", "id": f"id-{n}"}, properties=props)


def kombu_envelope(n: int, queue: str, priority: int = 0, base64_body: bool = True) -> bytes:
    """An envelope as kombu 5's Redis transport writes it for a Celery task."""
    body = json.dumps([[n], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                  "chord": None}]).encode()
    props = {"correlation_id": f"id-{n}", "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
             "delivery_info": {"exchange": "", "routing_key": queue}, "priority": priority,
             "delivery_tag": str(uuid.uuid4())}
    if base64_body:
        props["body_encoding"] = "base64"
    return json.dumps({
        "body": base64.b64encode(body).decode() if base64_body else body.decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "proj.add", "id": f"id-{n}", "retries": 0},
        "properties": props,
    }).encode()


def ack_from_pool(consumer, *deliveries) -> None:
    """Ack the way a worker's pool does: from another thread than the one calling get()
    (acks made on that thread are early acks, sent at once)."""
    th = threading.Thread(target=lambda: [consumer.ack(d) for d in deliveries])
    th.start()
    th.join(5)


# -- kombu wire layout ---------------------------------------------------------------


def test_consumes_kombu_envelopes_in_step_order(transport: RedisTransport,
                                                raw: redis.Redis) -> None:
    q = "celery"
    raw.lpush(f"{q}{SEP}9", kombu_envelope(9, q, priority=9))
    raw.lpush(f"{q}{SEP}3", kombu_envelope(3, q, priority=3))
    raw.lpush(q, kombu_envelope(0, q, priority=0))
    raw.lpush(q, kombu_envelope(1, q, priority=0, base64_body=False))  # older kombu
    c = transport.consumer([q], prefetch=1)
    try:
        got = []
        for _ in range(4):
            [d] = drain(c, 1)
            assert d.error is None and d.queue == q
            got.append((d.message.headers["id"], d.message.properties["priority"]))
            assert json.loads(d.message.body)[0] == [int(d.message.headers["id"][3:])]
            c.ack(d)
        # wire step 0 first; read back in qops's scale (9 - wire priority), wire 0 (what
        # kombu writes for a message sent without a priority) as unset
        assert got == [("id-0", None), ("id-1", None), ("id-3", 6), ("id-9", 0)]
    finally:
        c.close()
    assert raw.keys("*unacked*") == []  # nothing left in flight, kombu's keys never made


def test_published_layout_is_what_celery_expects(transport: RedisTransport,
                                                 raw: redis.Redis) -> None:
    q = "jobs"
    transport.publish(q, msg(1))  # unset priority: base list
    transport.publish(q, msg(2, priority=0))  # lowest in qops scale: wire step 9
    transport.publish(q, msg(3, priority=5))  # wire 4, floored to step 3
    transport.publish(q, msg(4, priority=9))  # highest: base list
    assert raw.smembers(f"_kombu.binding.{q}") == {f"{q}{SEP}{SEP}{q}".encode()}
    assert raw.llen(q) == 2 and raw.llen(f"{q}{SEP}3") == 1 and raw.llen(f"{q}{SEP}9") == 1
    env = json.loads(raw.lindex(q, -1))  # first pushed, next to be consumed (right end)
    props = env["properties"]
    assert base64.b64decode(env["body"]) == b"[[1], {}, {}]"
    assert props["body_encoding"] == "base64"
    assert props["delivery_info"] == {"exchange": "", "routing_key": q}
    uuid.UUID(props["delivery_tag"])
    assert props["priority"] == 0 and props["delivery_mode"] == 2
    assert env["content-type"] == "application/json" and env["headers"]["id"] == "id-1"
    assert json.loads(raw.lindex(f"{q}{SEP}9", 0))["properties"]["priority"] == 9
    assert json.loads(raw.lindex(f"{q}{SEP}3", 0))["properties"]["priority"] == 3


def test_stats_and_purge_find_queues_from_kombu_bindings(transport: RedisTransport,
                                                         raw: redis.Redis) -> None:
    # what a Celery worker leaves behind: its binding set and messages on priority lists
    raw.sadd("_kombu.binding.celery", f"celery{SEP}{SEP}celery")
    raw.lpush("celery", kombu_envelope(1, "celery"))
    raw.lpush(f"celery{SEP}6", kombu_envelope(2, "celery", priority=6))
    raw.set("unacked_mutex", "x")  # kombu's keys: never touched
    stats = {s.name: s for s in transport.queue_stats()}
    assert stats["celery"].ready == 2 and stats["celery"].in_flight == 0
    assert transport.queue_exists("celery")
    assert transport.purge("celery") == 2
    assert raw.exists("celery", f"celery{SEP}6") == 0
    assert raw.get("unacked_mutex") == b"x"
    assert raw.sismember("_kombu.binding.celery", f"celery{SEP}{SEP}celery")


def test_pidbox_and_event_receiver_bindings_are_not_task_queues(transport: RedisTransport,
                                                                raw: redis.Redis) -> None:
    """What a Celery worker and an event receiver bind on Redis (a pidbox queue per
    node, celeryev.<uuid> per receiver, often left behind) is not listed as a queue."""
    raw.sadd("_kombu.binding.celery", f"celery{SEP}{SEP}celery")
    raw.sadd("_kombu.binding.celery.pidbox", f"{SEP}{SEP}w1@h.celery.pidbox")
    raw.sadd("_kombu.binding.qops.pidbox", f"{SEP}{SEP}w2@h.qops.pidbox")
    raw.sadd("_kombu.binding.celeryev", f"#{SEP}{SEP}celeryev.0b1c2d3e")
    raw.sadd("_kombu.binding.qopsev", f"task.#{SEP}{SEP}qopsev.4f5a6b7c")
    raw.sadd("_kombu.binding.reply.celery.pidbox", f"oid{SEP}{SEP}oid.reply.celery.pidbox")
    assert [s.name for s in transport.queue_stats()] == ["celery"]


def test_broadcast_is_kombu_fanout(transport: RedisTransport, raw: redis.Redis,
                                   redis_url: str) -> None:
    db = redis_url.rsplit("/", 1)[1]
    listener = raw.pubsub()
    listener.psubscribe(f"/{db}.qops.pidbox")
    assert listener.get_message(timeout=2)["type"] == "psubscribe"
    sub = transport.subscribe("qops.pidbox")
    try:
        transport.broadcast("qops.pidbox", Message(body=b'{"method": "ping"}',
                                                   headers={"clock": 3}))
        seen = None
        deadline = time.monotonic() + 3
        while seen is None and time.monotonic() < deadline:
            m = listener.get_message(ignore_subscribe_messages=True, timeout=0.5)
            seen = m and json.loads(m["data"])
        assert seen["properties"]["delivery_info"]["exchange"] == "qops.pidbox"
        assert base64.b64decode(seen["body"]) == b'{"method": "ping"}'
        got = sub.get(2.0)
        assert got is not None and got.headers == {"clock": 3}
        # a Celery client's broadcast, published by hand, reaches the qops subscriber
        raw.publish(f"/{db}.qops.pidbox", kombu_envelope(7, ""))
        got = sub.get(2.0)
        assert got is not None and got.headers["id"] == "id-7"
        assert sub.get(0.1) is None
    finally:
        sub.close()
        listener.close()


# -- qops's own keys and semantics -------------------------------------------------------------


def test_in_flight_keys_and_ack(transport: RedisTransport, raw: redis.Redis) -> None:
    transport.publish("q", msg(1))
    c = transport.consumer(["q"], prefetch=2, consumer_id="w1")
    try:
        [d] = drain(c, 1)
        assert d.raw == raw.lindex(b"qops.unacked.w1/q", 0)  # the exact bytes popped
        assert raw.sismember("qops.consumers", "w1") and raw.pttl("qops.alive.w1") > 0
        assert json.loads(raw.hget("qops.consumer.w1", "queues")) == ["q"]
        assert raw.sismember("qops.sources.w1", "q")
        [stats] = transport.queue_stats(["q"])
        assert (stats.ready, stats.in_flight, stats.consumers) == (0, 1, 1)
        ack_from_pool(c, d, d)  # twice is harmless
        # the ack is queued: the next get() carries it to Redis with its reserve
        assert raw.llen("qops.unacked.w1/q") == 1
        assert c.get(0.05) is None
        assert raw.llen("qops.unacked.w1/q") == 0
        assert raw.exists("unacked", "unacked_index") == 0
    finally:
        c.close()
    assert not raw.sismember("qops.consumers", "w1")
    assert raw.exists("qops.alive.w1", "qops.consumer.w1", "qops.sources.w1") == 0


def test_batched_reserve_counts_against_prefetch(transport: RedisTransport,
                                                 raw: redis.Redis) -> None:
    for i in range(10):
        transport.publish("q", msg(i))
    c = transport.consumer(["q"], prefetch=4, consumer_id="w1")
    try:
        first = c.get(1.0)
        assert first is not None
        # the batch of 4 is in flight on the server even though 1 was handed out
        assert raw.llen("q") == 6 and raw.llen("qops.unacked.w1/q") == 4
        rest = drain(c, 3)
        assert [d.message.headers["id"] for d in [first, *rest]] == [f"id-{i}" for i in range(4)]
        assert c.get(0.3) is None
        c.ack(first)
        nxt = c.get(1.0)
        assert nxt is not None and nxt.message.headers["id"] == "id-4"
        for d in [*rest, nxt]:
            c.ack(d)
    finally:
        c.close()
    assert raw.llen("q") == 5


def test_queued_acks_ride_with_the_next_reserve(transport: RedisTransport,
                                               raw: redis.Redis) -> None:
    for i in range(12):
        transport.publish("q", msg(i))
    c = transport.consumer(["q"], prefetch=8, consumer_id="w1")
    try:
        got = drain(c, 8)  # one reserve of 8
        assert raw.llen("q") == 4 and raw.llen("qops.unacked.w1/q") == 8
        ack_from_pool(c, *got[:4])
        # queued, not sent: still in flight on the server, but free for the prefetch
        assert raw.llen("qops.unacked.w1/q") == 8
        nxt = c.get(1.0)
        assert nxt is not None and nxt.message.headers["id"] == "id-8"
        # one round trip removed the 4 acked and took the 4 that fit (batch of 4)
        assert raw.llen("q") == 0 and raw.llen("qops.unacked.w1/q") == 8
        held = {json.loads(x)["headers"]["id"] for x in raw.lrange("qops.unacked.w1/q", 0, -1)}
        assert held == {f"id-{i}" for i in range(4, 12)}
    finally:
        c.close()
    assert sorted(json.loads(x)["headers"]["id"] for x in raw.lrange("q", 0, -1)) == sorted(
        f"id-{i}" for i in range(4, 12))


def test_queued_ack_frees_the_prefetch_slot(transport: RedisTransport,
                                            raw: redis.Redis) -> None:
    transport.publish("q", msg(1))
    transport.publish("q", msg(2))
    c = transport.consumer(["q"], prefetch=1, consumer_id="w1")
    try:
        first = c.get(1.0)
        assert first is not None and c.get(0.05) is None  # prefetch 1: full
        ack_from_pool(c, first)
        second = c.get(1.0)
        assert second is not None and second.message.headers["id"] == "id-2"
        assert raw.lrange("qops.unacked.w1/q", 0, -1) == [second.raw]
        c.ack(second)
    finally:
        c.close()
    assert raw.llen("q") == 0


def test_ack_is_flushed_while_get_blocks(transport: RedisTransport, raw: redis.Redis) -> None:
    """An ack from a pool thread reaches Redis within about one BLMOVE slice even when the
    consumer thread is idle, blocked waiting for new messages."""
    transport.publish("q", msg(1))
    c = transport.consumer(["q"], prefetch=4, consumer_id="w1")
    try:
        d = c.get(1.0)
        assert d is not None
        th = threading.Thread(target=c.get, args=(2.0,))
        th.start()
        time.sleep(0.05)  # get() is in BLMOVE now
        acked = time.monotonic()
        c.ack(d)
        while raw.llen("qops.unacked.w1/q") and time.monotonic() - acked < 2:
            time.sleep(0.005)
        took = time.monotonic() - acked
        assert raw.llen("qops.unacked.w1/q") == 0
        assert took < 0.3, took
        assert th.is_alive()  # flushed by the blocked get() itself, between slices
        th.join(5)
    finally:
        c.close()


def test_close_and_heartbeat_flush_queued_acks(transport: RedisTransport,
                                               raw: redis.Redis) -> None:
    for i in range(3):
        transport.publish("q", msg(i))
    c = transport.consumer(["q"], prefetch=3, consumer_id="w1")
    a, b, x = drain(c, 3)
    ack_from_pool(c, a)
    assert raw.llen("qops.unacked.w1/q") == 3
    c.heartbeat()  # the heartbeat thread flushes too
    assert raw.llen("qops.unacked.w1/q") == 2
    ack_from_pool(c, b)
    c.close()  # the acked message must not go back with the rest
    assert [json.loads(r)["headers"]["id"] for r in raw.lrange("q", 0, -1)] == ["id-2"]
    c.ack(x)  # after close: nothing happens
    assert raw.llen("q") == 1


def test_resync_keeps_queued_acks(transport: RedisTransport, raw: redis.Redis) -> None:
    """A queued ack's message is still in flight on the server: a resync must not take
    it for an orphan and requeue it (it would run twice)."""
    transport.publish("q", msg(1))
    c = transport.consumer(["q"], prefetch=2, consumer_id="w1")
    try:
        d = c.get(1.0)
        assert d is not None
        ack_from_pool(c, d)
        assert raw.llen("qops.unacked.w1/q") == 1  # queued
        assert isinstance(c, RedisConsumer)
        c._resync_needed = True
        assert c.get(0.2) is None
        assert raw.llen("q") == 0 and raw.llen("qops.unacked.w1/q") == 0
    finally:
        c.close()
    assert raw.llen("q") == 0


def test_ack_of_a_cancelled_queue_is_flushed(transport: RedisTransport,
                                             raw: redis.Redis) -> None:
    transport.publish("a", msg(1))
    transport.publish("b", msg(2))
    c = transport.consumer(["a", "b"], prefetch=2, consumer_id="w1")
    try:
        got = drain(c, 2)
        assert sorted(d.queue for d in got) == ["a", "b"]
        c.cancel_queue("a")
        ack_from_pool(c, *got)
        assert c.get(0.05) is None
        assert raw.llen("qops.unacked.w1/a") == 0 and raw.llen("qops.unacked.w1/b") == 0
    finally:
        c.close()
    assert raw.llen("a") == 0 and raw.llen("b") == 0


def test_reserve_falls_back_to_eval_on_noscript(transport: RedisTransport,
                                               raw: redis.Redis,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """After SCRIPT FLUSH or a Redis restart the server does not know the reserve script:
    the consumer's EVALSHA gets NOSCRIPT (nothing ran) and it runs the script with EVAL.
    Simulated with an unknown SHA, not a SCRIPT FLUSH, which would hit every db."""
    transport.publish("q", msg(1))
    c = transport.consumer(["q"], prefetch=2, consumer_id="w1")
    try:
        monkeypatch.setattr(transport._lua_reserve, "sha", "0" * 40)
        d = c.get(1.0)
        assert d is not None and d.message.headers["id"] == "id-1"
        ack_from_pool(c, d)
        assert c.get(0.05) is None
        assert raw.llen("qops.unacked.w1/q") == 0
    finally:
        c.close()


def test_early_ack_on_the_consumer_thread_is_sent_at_once(transport: RedisTransport,
                                                          raw: redis.Redis) -> None:
    """acks_late=False: the worker acks on its consumer thread and then runs the task at
    once; the ack must be on the server before that (at most once), not queued."""
    transport.publish("q", msg(1))
    transport.publish("q", msg(2))
    c = transport.consumer(["q"], prefetch=4, consumer_id="w1")
    try:
        d = c.get(1.0)
        assert d is not None
        assert raw.llen("qops.unacked.w1/q") == 2  # both reserved, one handed out
        c.ack(d)  # this thread called get(): an early ack
        assert raw.lrange("qops.unacked.w1/q", 0, -1) == [c.get(1.0).raw]
    finally:
        c.close()


def test_requeue_goes_back_to_its_priority_list(transport: RedisTransport,
                                                raw: redis.Redis) -> None:
    transport.publish("q", msg(1, priority=0))  # wire step 9
    c = transport.consumer(["q"], prefetch=1)
    try:
        [d] = drain(c, 1)
        assert d.message.properties["priority"] == 0
        c.requeue(d)
        assert raw.llen(f"q{SEP}9") == 1 and raw.llen("q") == 0
    finally:
        c.close()


def test_close_gives_back_in_original_order(transport: RedisTransport,
                                            raw: redis.Redis) -> None:
    for i in range(5):
        transport.publish("q", msg(i))
    c = transport.consumer(["q"], prefetch=5)
    got = drain(c, 2)  # 5 in flight (batch), 2 handed out
    assert len(got) == 2
    c.close()
    assert raw.llen("q") == 5
    c2 = transport.consumer(["q"], prefetch=10)
    try:
        again = drain(c2, 5)
        assert [d.message.headers["id"] for d in again] == [f"id-{i}" for i in range(5)]
        for d in again:
            c2.ack(d)
    finally:
        c2.close()


def test_recover_moves_only_dead_consumers_messages(transport: RedisTransport,
                                                    raw: redis.Redis) -> None:
    for i in range(3):
        transport.publish("q", msg(i))
    transport.publish("other", msg(9))
    dead = transport.consumer(["q"], prefetch=3, consumer_id="dead")
    live = transport.consumer(["other"], prefetch=1, consumer_id="live")
    assert len(drain(dead, 3)) == 3 and len(drain(live, 1)) == 1
    raw.delete("qops.alive.dead")  # what an expired heartbeat looks like
    assert transport.recover() == 3
    assert transport.recover() == 0
    assert not raw.sismember("qops.consumers", "dead")
    assert raw.llen("other") == 0 and raw.llen("qops.unacked.live/other") == 1
    # back at the head, in the order they were first taken
    assert [json.loads(x)["headers"]["id"] for x in raw.lrange("q", 0, -1)] == [
        "id-2", "id-1", "id-0"]
    live.close()


def test_lost_reply_leaves_no_orphan(transport: RedisTransport, raw: redis.Redis) -> None:
    """A reserve whose reply never arrived (connection dropped) leaves messages in our
    in-flight list that get() does not know: the next get() puts them back first."""
    c = transport.consumer(["q"], prefetch=2, consumer_id="w1")
    try:
        raw.lpush("qops.unacked.w1/q", kombu_envelope(5, "q"))
        assert isinstance(c, RedisConsumer)
        c._resync_needed = True
        [d] = drain(c, 1)
        assert d.message.headers["id"] == "id-5"
        assert raw.llen("qops.unacked.w1/q") == 1  # only the one we now hold
        c.ack(d)
    finally:
        c.close()


def test_get_wakes_at_once_on_publish(transport: RedisTransport) -> None:
    """The consumer blocks in BLMOVE on the queue's list, so a publish wakes it at once
    (not at the end of a polling slice)."""
    c = transport.consumer(["q"], prefetch=1)
    latencies = []
    try:
        for i in range(5):
            result: list = []
            th = threading.Thread(
                target=lambda out=result: out.append((c.get(3.0), time.monotonic())))
            th.start()
            time.sleep(0.13 + 0.017 * i)  # land at different points of the wait slice
            sent = time.monotonic()
            transport.publish("q", msg(i))
            th.join(5)
            d, when = result[0]
            assert d is not None
            latencies.append(when - sent)
            c.ack(d)
    finally:
        c.close()
    # median: one scheduling hiccup on a busy machine must not fail the test
    assert sorted(latencies)[2] < 0.02, latencies


# -- bad input and failures ------------------------------------------------------------------------


def test_malformed_payloads_yield_errors_not_crashes(transport: RedisTransport,
                                                     raw: redis.Redis) -> None:
    bad_b64 = json.loads(kombu_envelope(1, "q"))
    bad_b64["body"] = "not base64 !!"
    payloads = [b"{not json", json.dumps(bad_b64).encode(), b"[" * 100_000,
                kombu_envelope(2, "q")]
    for p in payloads:
        raw.lpush("q", p)
    c = transport.consumer(["q"], prefetch=1)
    try:
        got = []
        for expected in payloads[:3]:
            [d] = drain(c, 1)
            assert d.message is None and d.error and d.raw == expected
            got.append(d.error)
            c.reject(d, d.error)
        assert "JSON" in got[0] and "base64" in got[1]
        [good] = drain(c, 1)
        assert good.message.headers["id"] == "id-2"
        c.ack(good)
    finally:
        c.close()
    dead = transport.dead_letters()
    assert [x.raw for x in dead] == payloads[:3]
    assert {x.queue for x in dead} == {"q"}
    assert transport.purge_dead_letters() == 3


def test_dead_letter_requeue_keeps_priority_list(transport: RedisTransport,
                                                 raw: redis.Redis) -> None:
    transport.publish("q", msg(1, priority=0))
    c = transport.consumer(["q"], prefetch=1)
    try:
        [d] = drain(c, 1)
        c.reject(d, "unknown task")
        assert raw.llen("qops.unacked." + c.id + f"/q{SEP}9") == 0
        [dl] = transport.dead_letters()
        assert dl.raw == d.raw and dl.reason == "unknown task"
        rec = json.loads(raw.hget("qops.dlq", dl.id))
        assert base64.b64decode(rec["raw"]) == d.raw and rec["queue"] == "q"
        assert transport.requeue_dead_letters() == 1
        assert transport.requeue_dead_letters([dl.id]) == 0  # already back
        assert raw.lrange(f"q{SEP}9", 0, -1) == [d.raw]
    finally:
        c.close()


def test_unreachable_broker_fails_fast_with_masked_url() -> None:
    t = from_url("redis://:secret@127.0.0.1:1/0", TransportOptions(connect_timeout=2))
    start = time.monotonic()
    for action in (lambda: t.publish("q", msg(1)), t.ping,
                   lambda: t.consumer(["q"], prefetch=1), t.queue_stats):
        with pytest.raises(BrokerUnreachable) as info:
            action()
        text = str(info.value)
        assert "redis://:**@127.0.0.1:1/0" in text and "secret" not in text
        assert "\n" not in text and "redis-server is running" in text
    assert time.monotonic() - start < 2.0
    t.close()


def test_bad_url_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        from_url("redis://127.0.0.1:notaport/0")


# -- global_keyprefix ----------------------------------------------------------------------------


def test_split_url_takes_out_the_prefix() -> None:
    assert split_url("redis://h:6379/3?global_keyprefix=app1:") == ("redis://h:6379/3", "app1:")
    assert split_url("rediss://:p@h/3?ssl_cert_reqs=none&global_keyprefix=x") == (
        "rediss://:p@h/3?ssl_cert_reqs=none", "x")
    assert split_url("redis://h/0") == ("redis://h/0", "")


class _Refusing:
    """A redis-py client whose every command fails with ``exc`` (a pipeline's on execute)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def pipeline(self, transaction: bool = True) -> _RefusingPipeline:
        return _RefusingPipeline(self.exc)

    def __getattr__(self, name: str) -> object:
        def fail(*args: object, **kwargs: object) -> None:
            raise self.exc
        return fail


class _RefusingPipeline:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def execute(self) -> None:
        raise self.exc

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: self


@pytest.mark.parametrize("exc, error, text", [
    (redis.ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
     PublishError, "refused the {what} {target!r}: OOM command not allowed"),
    (redis.ConnectionError("Connection refused"),
     BrokerUnreachable, "unreachable while {doing} {target!r}: Connection refused"),
])
def test_a_send_redis_refuses_is_a_publish_error(transport: RedisTransport,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 exc: Exception, error: type[Exception],
                                                 text: str) -> None:
    """An error reply (OOM at maxmemory, READONLY on a replica) to a publish, a reply or a
    broadcast means Redis did not take the message: PublishError; a lost connection stays
    BrokerUnreachable."""
    monkeypatch.setattr(transport, "_client", _Refusing(exc))
    sends = [("publishing to", "message for", "q", lambda: transport.publish("q", msg(1))),
             ("sending a reply to", "reply for", "r",
              lambda: transport.send_reply("r", msg(2))),
             ("broadcasting on", "broadcast on", "ctl",
              lambda: transport.broadcast("ctl", msg(3)))]
    for doing, what, target, send in sends:
        with pytest.raises(error) as info:
            send()
        assert text.format(doing=doing, what=what, target=target) in str(info.value)
    assert "q" not in transport._bound  # that publish wrote the binding too (a pipeline)
    transport._bound.add("q")  # now a plain LPUSH
    with pytest.raises(error) as info:
        transport.publish("q", msg(4))
    assert text.format(doing="publishing to", what="message for", target="q") in str(info.value)


def test_global_keyprefix_on_every_key_and_channel(redis_url: str, raw: redis.Redis) -> None:
    t = from_url(redis_url + "?global_keyprefix=app1:", FAST)
    db = redis_url.rsplit("/", 1)[1]
    listener = raw.pubsub()
    listener.psubscribe(f"app1:/{db}.ctl")
    assert listener.get_message(timeout=2)["type"] == "psubscribe"
    try:
        t.publish("q", msg(1, priority=0))
        t.publish("q", msg(2))
        c = t.consumer(["q"], prefetch=1, consumer_id="w1")
        [d] = drain(c, 1)
        assert raw.exists("app1:qops.alive.w1", "app1:qops.unacked.w1/q") == 2
        c.reject(d, "no")
        assert raw.hlen("app1:qops.dlq") == 1
        c.close()
        t.broadcast("ctl", Message(body=b"{}"))
        m = None
        deadline = time.monotonic() + 3
        while m is None and time.monotonic() < deadline:
            m = listener.get_message(ignore_subscribe_messages=True, timeout=0.5)
        assert m is not None
        assert {k.decode() for k in raw.keys("*")} == {
            "app1:_kombu.binding.q", f"app1:q{SEP}9", "app1:qops.dlq", "app1:qops.dlq.index"}
        assert [s.name for s in t.queue_stats()] == ["q"]
        assert t.purge("q") == 1
    finally:
        listener.close()
        t.close()
