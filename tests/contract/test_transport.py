"""The transport contract: every transport passes the same cases."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import pytest

from qops.errors import PublishError
from qops.protocol import Message
from qops.transports.base import Transport, from_url
from qops.transports.declare import Declarations
from tests.contract import FAST
from tests.helpers import drain


def msg(n: int, priority: int | None = None) -> Message:
    props: dict[str, object] = {"correlation_id": f"id-{n}", "reply_to": "r"}
    if priority is not None:
        props["priority"] = priority
    return Message(body=f'[[{n}], {{}}, {{}}]'.encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties=props)


def ids(deliveries) -> list[str]:
    return [d.message.headers["id"] for d in deliveries]


def test_round_trip_keeps_body_headers_properties(transport: Transport, queue_name: str) -> None:
    transport.publish(queue_name, msg(1))
    c = transport.consumer([queue_name], prefetch=4)
    try:
        [d] = drain(c, 1)
        assert d.error is None and d.message is not None
        assert d.queue == queue_name
        assert d.message.body == b"[[1], {}, {}]"
        assert d.message.headers == {"task": "t", "id": "id-1"}
        assert d.message.properties["correlation_id"] == "id-1"
        assert d.message.properties["reply_to"] == "r"
        assert d.message.content_type == "application/json"
        c.ack(d)
        assert c.get(0.1) is None
    finally:
        c.close()
    [stats] = transport.queue_stats([queue_name])
    assert (stats.ready, stats.in_flight) == (0, 0)


def test_fifo(transport: Transport, queue_name: str) -> None:
    for i in range(5):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=10)
    try:
        got = drain(c, 5)
        assert ids(got) == [f"id-{i}" for i in range(5)]
        for d in got:
            c.ack(d)
    finally:
        c.close()


def test_priority_nine_runs_first(broker_url: str, queue_name: str) -> None:
    # (RabbitMQ: with queues declared with x-max-priority, task_queue_max_priority)
    transport = from_url(broker_url, replace(FAST, declarations=Declarations(max_priority=9)))
    transport.publish(queue_name, msg(0, priority=0))
    transport.publish(queue_name, msg(5, priority=5))
    transport.publish(queue_name, msg(9, priority=9))
    time.sleep(0.05)
    c = transport.consumer([queue_name], prefetch=1)
    try:
        order = []
        for _ in range(3):
            [d] = drain(c, 1)
            order.append(d.message.headers["id"])
            c.ack(d)
        assert order == ["id-9", "id-5", "id-0"]
    finally:
        c.close()
        transport.close()


def test_prefetch_limits_unacked(transport: Transport, queue_name: str) -> None:
    for i in range(4):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=2)
    try:
        got = drain(c, 2)
        assert len(got) == 2
        assert c.get(0.3) is None  # two unacked: no third
        c.ack(got[0])
        [third] = drain(c, 1)
        assert third.message.headers["id"] == "id-2"
        c.ack(got[1])
        c.ack(third)
    finally:
        c.close()


def test_requeue_puts_back_at_head(transport: Transport, queue_name: str) -> None:
    for i in range(3):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=1)
    try:
        [d] = drain(c, 1)
        assert d.message.headers["id"] == "id-0"
        c.requeue(d)
        order = []
        for _ in range(3):
            [again] = drain(c, 1)
            order.append(again.message.headers["id"])
            c.ack(again)
        if transport.scheme == "amqp":
            # RabbitMQ puts it back "at or near" the head: with a channel-wide prefetch
            # the freed slot can reach the queue before the requeue does (seen ~1 in 10)
            assert sorted(order) == ["id-0", "id-1", "id-2"]
            assert order.index("id-0") <= 1
        else:
            assert order == ["id-0", "id-1", "id-2"]
    finally:
        c.close()


def test_close_returns_unacked(transport: Transport, queue_name: str) -> None:
    for i in range(3):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=3)
    got = drain(c, 3)
    assert len(got) == 3
    c.ack(got[0])
    c.close()
    c2 = transport.consumer([queue_name], prefetch=3)
    try:
        rest = drain(c2, 2)
        assert sorted(ids(rest)) == ["id-1", "id-2"]
        for d in rest:
            c2.ack(d)
    finally:
        c2.close()


def test_consumes_several_queues(transport: Transport, queue_name: str) -> None:
    other = queue_name + "-b"
    transport.publish(queue_name, msg(1))
    transport.publish(other, msg(2))
    c = transport.consumer([queue_name, other], prefetch=4)
    try:
        got = drain(c, 2)
        assert sorted(ids(got)) == ["id-1", "id-2"]
        assert {d.queue for d in got} == {queue_name, other}
        for d in got:
            c.ack(d)
    finally:
        c.close()


def test_add_and_cancel_queue(transport: Transport, queue_name: str) -> None:
    other = queue_name + "-b"
    transport.publish(other, msg(2))
    c = transport.consumer([queue_name], prefetch=4)
    try:
        assert c.get(0.2) is None
        c.add_queue(other)
        assert other in c.queues
        [d] = drain(c, 1)
        c.ack(d)
        c.cancel_queue(other)
        assert other not in c.queues
        transport.publish(other, msg(3))
        assert c.get(0.3) is None
    finally:
        c.close()


def test_purge_counts_ready_and_leaves_in_flight(transport: Transport, queue_name: str) -> None:
    for i in range(5):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=2)
    try:
        got = drain(c, 2)
        assert len(got) == 2
        [stats] = transport.queue_stats([queue_name])
        assert (stats.ready, stats.in_flight) == (3, 2)
        assert transport.purge(queue_name) == 3
        [stats] = transport.queue_stats([queue_name])
        assert (stats.ready, stats.in_flight) == (0, 2)
        for d in got:
            c.ack(d)
    finally:
        c.close()
    assert transport.queue_exists(queue_name)
    assert not transport.queue_exists(queue_name + "-never")


def test_queue_stats_lists_known_queues(transport: Transport, queue_name: str) -> None:
    transport.publish(queue_name, msg(1))
    names = [s.name for s in transport.queue_stats()]
    assert queue_name in names


def test_broadcast_reaches_every_subscriber(transport: Transport, queue_name: str) -> None:
    channel = f"bc-{queue_name}"
    s1 = transport.subscribe(channel)
    s2 = transport.subscribe(channel)
    try:
        time.sleep(0.2)  # pub/sub subscriptions settle asynchronously on some brokers
        transport.broadcast(channel, Message(body=b'{"method": "ping"}', headers={"clock": 1}))
        for s in (s1, s2):
            m = s.get(3.0)
            assert m is not None and m.body == b'{"method": "ping"}'
            assert m.headers.get("clock") == 1
        assert s1.get(0.2) is None
    finally:
        s1.close()
        s2.close()


def test_dead_letters_list_requeue_purge(transport: Transport, queue_name: str) -> None:
    transport.publish(queue_name, msg(1))
    c = transport.consumer([queue_name], prefetch=1)
    try:
        before = transport.dead_letter_count()  # other tests may have left some
        [d] = drain(c, 1)
        c.reject(d, "unknown task 't'")
        dead = [x for x in transport.dead_letters() if x.queue == queue_name]
        assert len(dead) == 1 and dead[0].reason == "unknown task 't'"
        assert transport.dead_letter_count() == before + 1
        assert transport.requeue_dead_letters([dead[0].id]) == 1
        assert transport.dead_letter_count() == before
        [again] = drain(c, 1)
        assert again.message.headers["id"] == "id-1"
        c.reject(again, "still unknown")
        assert transport.purge_dead_letters() >= 1
        assert [x for x in transport.dead_letters() if x.queue == queue_name] == []
        assert transport.dead_letter_count() == 0
    finally:
        c.close()


def test_live_consumer_keeps_its_messages(transport: Transport, queue_name: str) -> None:
    transport.publish(queue_name, msg(1))
    c = transport.consumer([queue_name], prefetch=1)
    try:
        [d] = drain(c, 1)
        deadline = time.monotonic() + FAST.heartbeat_ttl * 2
        while time.monotonic() < deadline:
            c.heartbeat()
            assert transport.recover() == 0
            time.sleep(FAST.heartbeat_interval)
        [stats] = transport.queue_stats([queue_name])
        assert (stats.ready, stats.in_flight) == (0, 1)
        c.ack(d)
    finally:
        c.close()


def test_dead_consumer_messages_come_back(real_broker_url: str, queue_name: str) -> None:
    """A process reserves a message and is SIGKILLed: another consumer gets it."""
    t = from_url(real_broker_url, FAST)
    try:
        t.publish(queue_name, msg(1))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: reserve, report, wait to be killed
            try:
                ct = from_url(real_broker_url, FAST)
                c = ct.consumer([queue_name], prefetch=1)
                got = drain(c, 1)
                os.write(w, b"1" if got else b"0")
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        c = t.consumer([queue_name], prefetch=1)
        try:
            deadline = time.monotonic() + FAST.heartbeat_ttl * 5
            d = None
            while d is None and time.monotonic() < deadline:
                t.recover()
                d = c.get(0.2)
            assert d is not None, "the dead consumer's message did not come back"
            assert d.message.headers["id"] == "id-1"
            c.ack(d)
        finally:
            c.close()
    finally:
        t.close()


def test_event_stream_routing_keys_and_patterns(transport: Transport, queue_name: str) -> None:
    channel = f"ev-{queue_name}"
    everything = transport.subscribe(channel, pattern="#")
    tasks_only = transport.subscribe(channel, pattern="task.#")
    try:
        time.sleep(0.2)
        transport.broadcast(channel, Message(body=b'{"type": "worker-heartbeat"}'),
                            routing_key="worker.heartbeat")
        transport.broadcast(channel, Message(body=b'{"type": "task-succeeded"}'),
                            routing_key="task.succeeded")
        got = [everything.get(3.0), everything.get(3.0)]
        assert [m.body for m in got if m] == [b'{"type": "worker-heartbeat"}',
                                              b'{"type": "task-succeeded"}']
        only = tasks_only.get(3.0)
        assert only is not None and only.body == b'{"type": "task-succeeded"}'
        assert tasks_only.get(0.3) is None
    finally:
        everything.close()
        tasks_only.close()


def test_node_registry(transport: Transport, queue_name: str) -> None:
    a, b = f"a-{queue_name}@h", f"b-{queue_name}@h"
    before = transport.live_nodes()
    def count(live: list[str] | int | None) -> int:
        return live if isinstance(live, int) else len([n for n in live or [] if n in (a, b)])

    base = before if isinstance(before, int) else 0
    transport.register_node(a, {"pid": 1}, ttl=30)
    transport.register_node(b, {"pid": 2}, ttl=1)
    try:
        assert count(transport.live_nodes()) == base + 2
        live = transport.live_nodes()
        if isinstance(live, list):
            assert {a, b} <= set(live)
            time.sleep(1.3)  # b's ttl passed without a heartbeat
            assert b not in transport.live_nodes() and a in transport.live_nodes()
        transport.unregister_node(a)
        transport.unregister_node(b)
        assert count(transport.live_nodes()) == base
    finally:
        transport.unregister_node(a)
        transport.unregister_node(b)


def test_each_preset_has_its_own_node_registry(broker_url: str, queue_name: str) -> None:
    """A node of the celery preset is not listed by the qops preset's registry, nor the
    other way round: each lists the nodes that answer on its own mailbox."""
    qops_side = from_url(broker_url, FAST)
    celery_side = from_url(broker_url, replace(FAST, registry="qops.nodes.celery"))
    a, b = f"a-{queue_name}@h", f"b-{queue_name}@h"

    def count(live: list[str] | int | None, name: str) -> int:
        return live if isinstance(live, int) else int(name in (live or []))

    try:
        base_q, base_c = count(qops_side.live_nodes(), a), count(celery_side.live_nodes(), b)
        qops_side.register_node(a, {"pid": 1}, ttl=30)
        celery_side.register_node(b, {"pid": 2}, ttl=30)
        assert count(qops_side.live_nodes(), a) == base_q + 1
        assert count(celery_side.live_nodes(), b) == base_c + 1
        for transport, other in ((qops_side, b), (celery_side, a)):
            live = transport.live_nodes()
            if isinstance(live, list):
                assert other not in live
    finally:
        qops_side.unregister_node(a)
        celery_side.unregister_node(b)
        qops_side.close()
        celery_side.close()


def test_exempt_deliveries_free_their_prefetch_slot(transport: Transport, queue_name: str) -> None:
    if transport.scheme == "amqp":
        pytest.skip("AMQP grows its basic_qos window instead; covered in its own tests")
    for i in range(3):
        transport.publish(queue_name, msg(i))
    c = transport.consumer([queue_name], prefetch=1)
    try:
        [held] = drain(c, 1)
        assert c.get(0.2) is None  # the slot is taken
        c.exempt(held)
        [nxt] = drain(c, 1)  # the held message no longer counts
        assert nxt.message.headers["id"] == "id-1"
        assert c.get(0.2) is None  # prefetch 1 again
        c.ack(nxt)
        c.ack(held)  # settling an exempt delivery frees nothing more than its own
        [last] = drain(c, 1)
        assert last.message.headers["id"] == "id-2"
        assert c.get(0.2) is None
        c.ack(last)
    finally:
        c.close()


def test_oversized_publish_raises_and_queues_nothing(broker_url: str, queue_name: str) -> None:
    t = from_url(broker_url, replace(FAST, max_message_size=1000))
    try:
        with pytest.raises(PublishError, match="max_message_size"):
            t.publish(queue_name, Message(body=b"x" * 2000, headers={"id": "big"}))
        t.publish(queue_name, msg(1))
        assert [s.ready for s in t.queue_stats([queue_name])] == [1]
        t.purge(queue_name)
    finally:
        t.close()
