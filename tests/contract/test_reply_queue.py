"""Reply queues (``reply_consumer`` / ``send_reply``): every transport passes the same cases."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from qops.errors import UsageError
from qops.protocol import Message
from qops.transports.base import Transport, from_url
from tests.contract import FAST
from tests.helpers import drain


@pytest.fixture
def reply_name() -> str:
    return uuid.uuid4().hex


def reply(n: int) -> Message:
    return Message(body=f'{{"status": "SUCCESS", "result": {n}}}'.encode(), headers={},
                   properties={"correlation_id": f"task-{n}"})


def stat_names(transport: Transport) -> set[str]:
    return {s.name for s in transport.queue_stats(None)}


def leftovers(transport: Transport, name: str) -> int:
    """Replies for ``name`` the broker still holds anywhere, by looking at its storage."""
    scheme = transport.scheme
    if scheme == "memory":
        st = transport.state  # type: ignore[attr-defined]
        return len(st.queues.get(name, ()))
    if scheme == "sqlite":
        row = transport.db.conn().execute(  # type: ignore[attr-defined]
            "SELECT COUNT(*) FROM messages WHERE queue = ?", (name,)).fetchone()
        return int(row[0])
    if scheme == "redis":
        return int(transport._client.llen(transport.key(name)))  # type: ignore[attr-defined]
    return transport.queue_stats([name])[0].ready if transport.queue_exists(name) else 0


def test_replies_arrive_in_order_with_properties(transport: Transport, reply_name: str) -> None:
    c = transport.reply_consumer(reply_name)
    try:
        for i in range(5):
            transport.send_reply(reply_name, reply(i))
        got = drain(c, 5)
        assert [d.message.properties["correlation_id"] for d in got] == [
            f"task-{i}" for i in range(5)]
        assert got[0].message.body == b'{"status": "SUCCESS", "result": 0}'
        assert got[0].message.content_type == "application/json"
        assert all(d.queue == reply_name for d in got)
        for d in got:
            c.ack(d)
        assert c.get(0.1) is None
        assert c.queues == [reply_name]
    finally:
        c.close()


def test_requeue_gives_a_reply_back(transport: Transport, reply_name: str) -> None:
    # (not necessarily first: with the reply prefetch, RabbitMQ may have pushed the next
    # replies to the consumer already, and they are handed out before the requeued one)
    c = transport.reply_consumer(reply_name)
    try:
        transport.send_reply(reply_name, reply(1))
        transport.send_reply(reply_name, reply(2))
        [first] = drain(c, 1)
        c.requeue(first)
        got = drain(c, 2)
        assert sorted(d.message.properties["correlation_id"] for d in got) == [
            "task-1", "task-2"]
        assert c.get(0.1) is None
        for d in got:
            c.ack(d)
    finally:
        c.close()


def test_reply_to_nobody_is_dropped_quietly(transport: Transport, reply_name: str) -> None:
    transport.send_reply(reply_name, reply(1))  # nobody listens: no error
    assert reply_name not in stat_names(transport)
    if transport.scheme == "redis":
        # Redis keeps it briefly (pushing blind is atomic; checking first would not be)
        # but never for good
        ttl = transport._client.ttl(transport.key(reply_name))  # type: ignore[attr-defined]
        assert 0 < ttl <= 300
    else:
        assert leftovers(transport, reply_name) == 0
        assert not transport.queue_exists(reply_name)


def test_close_deletes_the_queue_and_its_replies(transport: Transport, reply_name: str) -> None:
    c = transport.reply_consumer(reply_name)
    transport.send_reply(reply_name, reply(1))
    transport.send_reply(reply_name, reply(2))
    # (on Redis the queue exists while it holds replies: an empty list is no key)
    assert transport.queue_exists(reply_name)
    [d] = drain(c, 1)  # one taken and not acked, the other queued or prefetched
    assert d.message.properties["correlation_id"] == "task-1"
    c.close()
    # RabbitMQ deletes an exclusive queue as its connection closes; allow it a moment
    deadline = time.monotonic() + 5
    while transport.queue_exists(reply_name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not transport.queue_exists(reply_name)
    assert leftovers(transport, reply_name) == 0
    if transport.scheme == "redis":
        assert not transport._client.exists(transport.key(reply_name))  # type: ignore[attr-defined]
    # a late reply to the closed queue is harmless too
    transport.send_reply(reply_name, reply(3))
    assert reply_name not in stat_names(transport)


def test_reply_queues_are_not_work_queues(transport: Transport, reply_name: str,
                                          queue_name: str) -> None:
    transport.publish(queue_name, reply(0))
    c = transport.reply_consumer(reply_name)
    try:
        transport.send_reply(reply_name, reply(1))
        transport.send_reply(reply_name, reply(2))
        [d] = drain(c, 1)  # one in flight, one ready
        names = stat_names(transport)
        assert queue_name in names
        assert reply_name not in names
        c.ack(d)
    finally:
        c.close()
    assert transport.purge(queue_name) == 1


def test_reply_consumer_reads_its_queue_only(transport: Transport, reply_name: str,
                                             queue_name: str) -> None:
    c = transport.reply_consumer(reply_name)
    try:
        with pytest.raises(UsageError):
            c.add_queue(queue_name)
        with pytest.raises(UsageError):
            c.cancel_queue(reply_name)
    finally:
        c.close()


def test_reply_queue_of_a_dead_process_goes_away(real_broker_url: str, reply_name: str) -> None:
    """A process opens a reply queue and is SIGKILLed: the queue and its replies go
    (AMQP: with the connection; SQLite: at the next recover(); Redis: by expiry)."""
    t = from_url(real_broker_url, FAST)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: open the queue, report, wait to be killed
            try:
                ct = from_url(real_broker_url, FAST)
                ct.reply_consumer(reply_name)
                os.write(w, b"1")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        t.send_reply(reply_name, reply(1))
        if t.scheme == "redis":
            ttl = t._client.ttl(t.key(reply_name))  # type: ignore[attr-defined]
            assert 0 < ttl <= 300
        else:
            assert t.queue_exists(reply_name)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if t.scheme == "redis":
            return  # nothing to wait for here: the expiry above is the cleanup
        deadline = time.monotonic() + 10
        while t.queue_exists(reply_name) and time.monotonic() < deadline:
            t.recover()
            time.sleep(0.05)
        assert not t.queue_exists(reply_name)
        assert leftovers(t, reply_name) == 0
    finally:
        t.close()


def test_idle_live_reply_queue_survives_recover(real_broker_url: str, reply_name: str) -> None:
    """A client may leave its reply queue unread for longer than a worker's heartbeat
    TTL: recover() must not take it for dead while its process lives."""
    t = from_url(real_broker_url, FAST)
    c = t.reply_consumer(reply_name)
    try:
        t.send_reply(reply_name, reply(1))
        time.sleep(FAST.heartbeat_ttl * 1.5)
        t.recover()
        [d] = drain(c, 1)
        assert d.message.properties["correlation_id"] == "task-1"
        c.ack(d)
    finally:
        c.close()
        t.close()
