"""Redis-only layout of what remote control and events use: kombu reply bindings, the
fanout and event channels as a Celery 5 peer sees them, and the live-node registry.

Raw keys and channels are inspected with a plain redis-py client, as kombu would.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from qops.protocol import Message
from qops.transports.base import from_url, topic_matches
from qops.transports.redis import RedisTransport, topic_glob
from tests.contract import FAST
from tests.contract.on_redis import SEP

pytestmark = pytest.mark.redis


def db_of(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def kombu_reply(node: str, ticket: str) -> bytes:
    """A pidbox reply envelope as a Celery 5 worker's kombu LPUSHes it."""
    body = json.dumps({node: {"ok": "pong"}}).encode()
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
        "content-type": "application/json", "headers": {"ticket": ticket, "clock": 1},
        "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "reply.celery.pidbox",
                                         "routing_key": "oid1"},
                       "delivery_tag": "t1"},
    }).encode()


def next_message(pubsub: redis.client.PubSub, timeout: float = 3.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if m is not None:
            return m
    return None


# -- reply queues bound like kombu's pidbox reply queues ------------------------------------


def test_reply_binding_present_while_open_and_gone_after_close(transport: RedisTransport,
                                                                raw: redis.Redis) -> None:
    transport.publish("celery", Message(body=b"[[], {}, {}]", headers={"task": "t"}))
    name = "oid1.reply.celery.pidbox"
    member = f"oid1{SEP}{SEP}{name}"
    c = transport.reply_consumer(name, exchange="reply.celery.pidbox", routing_key="oid1")
    try:
        assert raw.smembers("_kombu.binding.reply.celery.pidbox") == {member.encode()}
        # a reply binding is not a queue
        assert [s.name for s in transport.queue_stats()] == ["celery"]
        # what a Celery worker's kombu does with its reply: look up the binding, LPUSH
        [found] = raw.smembers("_kombu.binding.reply.celery.pidbox")
        routing_key, _, queue = found.decode().split(SEP)
        assert routing_key == "oid1"
        raw.lpush(queue, kombu_reply("celery@h", "tk"))
        d = c.get(2.0)
        assert d is not None and d.message is not None
        assert json.loads(d.message.body) == {"celery@h": {"ok": "pong"}}
        assert d.message.headers["ticket"] == "tk"
        c.ack(d)
    finally:
        c.close()
    assert raw.exists("_kombu.binding.reply.celery.pidbox", name) == 0
    assert [s.name for s in transport.queue_stats()] == ["celery"]


def test_reply_consumer_without_exchange_binds_nothing(transport: RedisTransport,
                                                       raw: redis.Redis) -> None:
    c = transport.reply_consumer("plain-reply")
    try:
        assert raw.keys("_kombu.binding.*") == []
    finally:
        c.close()


def test_other_bindings_of_the_reply_exchange_survive_close(transport: RedisTransport,
                                                            raw: redis.Redis) -> None:
    other = f"oid2{SEP}{SEP}oid2.reply.celery.pidbox"
    raw.sadd("_kombu.binding.reply.celery.pidbox", other)  # a Celery client's
    c = transport.reply_consumer("oid1.reply.celery.pidbox", exchange="reply.celery.pidbox",
                                 routing_key="oid1")
    c.close()
    assert raw.smembers("_kombu.binding.reply.celery.pidbox") == {other.encode()}


# -- fanout and event channels ---------------------------------------------------------------


def test_event_channel_layout_seen_by_a_kombu_subscriber(transport: RedisTransport,
                                                          raw: redis.Redis,
                                                          redis_url: str) -> None:
    """Celery's event receiver PSUBSCRIBEs '/<db>.celeryev/*' (fanout_patterns, '#' as
    '*'): qops's events must land there, routing key after the last '/'."""
    db = db_of(redis_url)
    listener = raw.pubsub()
    listener.psubscribe(f"/{db}.qopsev/*")
    assert listener.get_message(timeout=2)["type"] == "psubscribe"
    try:
        transport.broadcast("qopsev", Message(body=b'{"type": "worker-heartbeat"}'),
                            routing_key="worker.heartbeat")
        m = next_message(listener)
        assert m is not None
        assert m["channel"] == f"/{db}.qopsev/worker.heartbeat".encode()
        env = json.loads(m["data"])
        assert env["properties"]["delivery_info"] == {"exchange": "qopsev",
                                                      "routing_key": "worker.heartbeat"}
        assert base64.b64decode(env["body"]) == b'{"type": "worker-heartbeat"}'
        # a plain fanout broadcast is another channel: not an event
        transport.broadcast("qopsev", Message(body=b"{}"))
        assert next_message(listener, 0.3) is None
    finally:
        listener.close()


def test_pattern_subscription_filters_by_topic(transport: RedisTransport, raw: redis.Redis,
                                               redis_url: str) -> None:
    db = db_of(redis_url)
    tasks = transport.subscribe("ev", pattern="task.#")
    every = transport.subscribe("ev", pattern="#")
    one_word = transport.subscribe("ev", pattern="*.heartbeat")
    plain = transport.subscribe("ev")
    try:
        for rk in ("worker.heartbeat", "task.succeeded", "task", "taskx.failed"):
            transport.broadcast("ev", Message(body=json.dumps(rk).encode()), routing_key=rk)
        # a Celery worker's event, published by hand
        raw.publish(f"/{db}.ev/task.failed", json.dumps({
            "body": base64.b64encode(b'"celery"').decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": {},
            "properties": {"body_encoding": "base64"}}))
        transport.broadcast("ev", Message(body=b'"fanout"'))

        def bodies(sub, n: int) -> list[str]:
            out = []
            for _ in range(n):
                m = sub.get(2.0)
                assert m is not None
                out.append(json.loads(m.body))
            assert sub.get(0.2) is None
            return out

        assert bodies(tasks, 3) == ["task.succeeded", "task", "celery"]
        assert bodies(every, 5) == ["worker.heartbeat", "task.succeeded", "task",
                                    "taskx.failed", "celery"]
        assert bodies(one_word, 1) == ["worker.heartbeat"]
        assert bodies(plain, 1) == ["fanout"]  # no event reaches a plain subscriber
    finally:
        for s in (tasks, every, one_word, plain):
            s.close()


def test_channel_names_are_not_globs(transport: RedisTransport) -> None:
    """A channel name with glob characters matches only itself."""
    sub = transport.subscribe("ev[1]", pattern="#")
    plain = transport.subscribe("ev?")
    try:
        transport.broadcast("ev1", Message(body=b'"no"'), routing_key="a")
        transport.broadcast("evx", Message(body=b'"no"'))
        transport.broadcast("ev[1]", Message(body=b'"yes"'), routing_key="a")
        transport.broadcast("ev?", Message(body=b'"yes"'))
        for s in (sub, plain):
            m = s.get(2.0)
            assert m is not None and json.loads(m.body) == "yes"
            assert s.get(0.2) is None
    finally:
        sub.close()
        plain.close()


@pytest.mark.parametrize(("pattern", "glob"), [
    ("#", "*"), ("task.#", "task*"), ("#.failed", "*failed"), ("a.#.b", "a*b"),
    ("*.heartbeat", "*.heartbeat"), ("worker.*", "worker.*"), ("a.b", "a.b"),
    ("a?.[x]", "a\\?.\\[x\\]"),
])
def test_topic_glob(pattern: str, glob: str) -> None:
    assert topic_glob(pattern) == glob


@pytest.mark.parametrize("key", ["a", "a.b", "a.b.c", "task", "task.x", "x.task",
                                 "a.x.b", "ab", "a.b.b"])
@pytest.mark.parametrize("pattern", ["#", "task.#", "#.b", "a.#.b", "*.b", "a.*", "a.b"])
def test_topic_glob_is_a_superset(pattern: str, key: str) -> None:
    """What the topic matches, the glob matches too (the subscriber then filters)."""
    import fnmatch

    if topic_matches(pattern, key):
        assert fnmatch.fnmatchcase(key, topic_glob(pattern))


def test_global_keyprefix_on_channels_and_bindings(redis_url: str, raw: redis.Redis) -> None:
    t = from_url(redis_url + "?global_keyprefix=app1:", FAST)
    db = db_of(redis_url)
    listener = raw.pubsub()
    listener.psubscribe(f"app1:/{db}.qopsev/*")
    assert listener.get_message(timeout=2)["type"] == "psubscribe"
    sub = t.subscribe("qopsev", pattern="#")
    c = t.reply_consumer("r1", exchange="reply.x", routing_key="k")
    try:
        assert raw.sismember("app1:_kombu.binding.reply.x", f"k{SEP}{SEP}r1")
        t.broadcast("qopsev", Message(body=b"{}"), routing_key="task.sent")
        m = next_message(listener)
        assert m is not None and m["channel"] == f"app1:/{db}.qopsev/task.sent".encode()
        assert sub.get(2.0) is not None
        t.register_node("n1", {}, 30)
        assert raw.zscore("app1:qops.nodes", "n1") is not None
        assert t.live_nodes() == ["n1"]
    finally:
        c.close()
        sub.close()
        listener.close()
        t.close()
    assert raw.exists("app1:_kombu.binding.reply.x") == 0


# -- the live-node registry -------------------------------------------------------------------


def test_node_registry_layout_and_expiry(transport: RedisTransport, raw: redis.Redis) -> None:
    server_now = float(raw.time()[0])
    transport.register_node("w1@h", {"pid": 12, "queues": ["celery"]}, 0.5)
    transport.register_node("w2@h", {"pid": 13}, 30)
    until = raw.zscore("qops.nodes", "w1@h")
    assert until is not None and server_now < until < server_now + 3
    assert json.loads(raw.hget("qops.nodes.info", "w1@h")) == {"pid": 12, "queues": ["celery"]}
    assert transport.live_nodes() == ["w1@h", "w2@h"]
    time.sleep(0.7)
    assert transport.live_nodes() == ["w2@h"]  # expired: not listed ...
    transport._nodes_swept = 0.0  # ... and the next sweep forgets it
    assert transport.live_nodes() == ["w2@h"]
    assert raw.zrange("qops.nodes", 0, -1) == [b"w2@h"]
    assert raw.hkeys("qops.nodes.info") == [b"w2@h"]
    # a heartbeat extends the registration
    transport.register_node("w2@h", {"pid": 13}, 60)
    assert raw.zscore("qops.nodes", "w2@h") > server_now + 50
    transport.unregister_node("w2@h")
    assert transport.live_nodes() == []
    assert raw.exists("qops.nodes", "qops.nodes.info") == 0
