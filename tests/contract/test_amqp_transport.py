"""RabbitMQ-specific behaviour of the AMQP transport (the shared contract is in
test_transport.py). Runs against the real broker, in the session's private vhost."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops.errors import BrokerUnreachable, PublishError
from qops.transports.amqp import AMQPTransport, parse_url
from qops.transports.base import Message, TransportOptions

pytestmark = pytest.mark.amqp


# -- URL parsing (no broker needed) ------------------------------------------------------


@pytest.mark.parametrize(("url", "vhost"), [
    ("amqp://guest:guest@localhost:5672//", "/"),
    ("amqp://guest:guest@localhost:5672/", "/"),
    ("amqp://guest:guest@localhost:5672", "/"),
    ("amqp://guest:guest@localhost:5672/prod", "prod"),
    ("amqp://guest:guest@localhost:5672/%2F", "/"),
    ("pyamqp://u@h/a%2Fb", "a/b"),
])
def test_url_vhost_like_kombu(url: str, vhost: str) -> None:
    assert parse_url(url).vhost == vhost


def test_url_parts_and_options() -> None:
    p = parse_url("amqps://us%40er:p%3Ass@rabbit.example:5999/v?heartbeat=20"
                  "&dead_letter_queue=my.dlq")
    assert (p.user, p.password, p.host, p.port, p.tls) == ("us@er", "p:ss", "rabbit.example",
                                                            5999, True)
    assert (p.heartbeat, p.dead_letter_queue) == (20, "my.dlq")
    d = parse_url("amqp://h")
    assert (d.user, d.password, d.port, d.heartbeat, d.dead_letter_queue) == (
        "guest", "guest", 5672, 60, "qops.dlq")


# -- against the broker -------------------------------------------------------------------


@pytest.fixture
def admin(amqp_url: str) -> Iterator[Any]:
    """A raw pika channel in the test vhost, to set things up the way other clients do."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield conn.channel()
    conn.close()


@pytest.fixture
def queues(admin: Any) -> Iterator[list[str]]:
    """Unique queue names; every one is deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        admin.queue_delete(name)


def new_queue(queues: list[str]) -> str:
    name = f"amqp-{uuid.uuid4().hex[:10]}"
    queues.append(name)
    return name


@pytest.fixture
def transport(amqp_url: str) -> Iterator[AMQPTransport]:
    t = AMQPTransport(amqp_url, TransportOptions())
    yield t
    t.close()


def task(n: int, **props: Any) -> Message:
    return Message(body=f"[[{n}], {{}}, {{}}]".encode(), headers={"task": "t", "id": f"id-{n}"},
                   properties={"correlation_id": f"id-{n}", **props})


def get_one(consumer: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = consumer.get(0.2)
        if d is not None:
            return d
    raise AssertionError("no message arrived")


def test_queue_declared_by_celery_without_priority_still_works(
        transport: AMQPTransport, admin: Any, queues: list[str]) -> None:
    q = new_queue(queues)
    admin.queue_declare(q, durable=True)  # what Celery does: no x-max-priority
    transport.publish(q, task(1, priority=9))  # our declare gets 406, then goes passive
    assert transport.queue_exists(q)
    c = transport.consumer([q], prefetch=1)  # a fresh connection declares again: same
    try:
        d = get_one(c)
        assert d.message.headers["id"] == "id-1" and d.message.properties["priority"] == 9
        c.ack(d)
    finally:
        c.close()
    # the queue was left as Celery made it
    assert admin.queue_declare(q, durable=True).method.message_count == 0


def test_queues_get_x_max_priority(transport: AMQPTransport, admin: Any,
                                   queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    # a declare with the same arguments succeeds, any other one is a 406
    admin.queue_declare(q, durable=True, arguments={"x-max-priority": 9})


def test_redelivered_flag(transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    c = transport.consumer([q], prefetch=1)
    first = get_one(c)
    assert first.redelivered is False
    c.close()  # not acked: back to the queue
    c = transport.consumer([q], prefetch=1)
    try:
        again = get_one(c)
        assert again.message.headers["id"] == "id-1" and again.redelivered is True
        c.ack(again)
    finally:
        c.close()


def test_ack_from_another_thread_is_applied(transport: AMQPTransport,
                                            queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=2)
    got = [get_one(c), get_one(c)]
    acker = threading.Thread(target=lambda: [c.ack(d) for d in got])
    acker.start()
    acker.join()
    c.close()  # flushes the acks queued by the other thread before closing
    c = transport.consumer([q], prefetch=2)
    try:
        assert c.get(0.5) is None
    finally:
        c.close()
    [stats] = transport.queue_stats([q])
    assert (stats.ready, stats.in_flight) == (0, 0)


def test_ack_from_another_thread_frees_prefetch_while_get_waits(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        first = get_one(c)
        timer = threading.Timer(0.2, c.ack, args=(first,))
        timer.start()
        started = time.monotonic()
        second = c.get(5.0)  # blocked by prefetch until the other thread acks
        assert second is not None and second.message.headers["id"] == "id-2"
        assert time.monotonic() - started < 2.0
        c.ack(second)
    finally:
        c.close()


def test_add_queue_from_another_thread_while_get_waits(transport: AMQPTransport,
                                                      queues: list[str]) -> None:
    q, other = new_queue(queues), new_queue(queues)
    transport.publish(other, task(7))
    c = transport.consumer([q], prefetch=1)
    try:
        threading.Timer(0.2, c.add_queue, args=(other,)).start()
        d = c.get(5.0)
        assert d is not None and d.queue == other
        c.ack(d)
    finally:
        c.close()


def test_unreachable_broker_fails_fast() -> None:
    t = AMQPTransport("amqp://guest:secret@127.0.0.1:1//", TransportOptions(connect_timeout=2))
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as err:
        t.publish("q", task(1))
    assert time.monotonic() - started < 3
    text = str(err.value)
    assert "secret" not in text and "127.0.0.1:1" in text and "\n" not in text
    with pytest.raises(BrokerUnreachable):
        t.ping()


def test_wrong_credentials(amqp_vhost: str) -> None:
    from tests.conftest import AMQP_HOST, AMQP_PORT

    t = AMQPTransport(f"amqp://guest:wrong-{uuid.uuid4().hex[:6]}@{AMQP_HOST}:{AMQP_PORT}/"
                      f"{amqp_vhost}")
    with pytest.raises(BrokerUnreachable, match="refused the login"):
        t.ping()


def test_missing_vhost(amqp_vhost: str) -> None:
    from tests.conftest import AMQP_HOST, AMQP_PORT

    t = AMQPTransport(f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/no-such-vhost-{amqp_vhost}")
    with pytest.raises(BrokerUnreachable, match="add_vhost"):
        t.ping()


def test_oversized_publish_raises(amqp_url: str, queues: list[str]) -> None:
    t = AMQPTransport(amqp_url, TransportOptions(max_message_size=1000))
    try:
        with pytest.raises(PublishError, match="max_message_size"):
            t.publish(new_queue(queues), Message(body=b"x" * 1001))
    finally:
        t.close()


def test_header_values_pika_cannot_encode(transport: AMQPTransport,
                                          queues: list[str]) -> None:
    q = new_queue(queues)
    headers = {"task": "t", "timelimit": (300.0, 1.5), "eta": None, "stamps": {"w": 0.25},
               "sent": 1716912345.678, "big": 2 ** 70}
    transport.publish(q, Message(body=b"[]", headers=headers))
    c = transport.consumer([q], prefetch=1)
    try:
        h = get_one(c).message.headers
        assert h["timelimit"] == [300, 1.5] and h["stamps"] == {"w": 0.25}
        assert h["sent"] == 1716912346  # too many digits for an AMQP decimal: rounded
        assert h["big"] == str(2 ** 70) and h["eta"] is None
    finally:
        c.close()
    with pytest.raises(PublishError, match="set"):
        transport.publish(q, Message(body=b"[]", headers={"bad": {1, 2}}))
    transport.publish(q, task(2))  # the connection survived the refused message


def test_properties_round_trip(transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1, reply_to="r", priority=3, expiration="60000"))
    c = transport.consumer([q], prefetch=1)
    try:
        p = get_one(c).message.properties
        assert (p["correlation_id"], p["reply_to"], p["priority"], p["delivery_mode"],
                p["expiration"]) == ("id-1", "r", 3, 2, "60000")
    finally:
        c.close()


def test_dead_letter_keeps_and_restores_original_headers(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1, reply_to="r", expiration="600000", priority=4))
    c = transport.consumer([q], prefetch=1)
    try:
        c.reject(get_one(c), "unknown task")
        [dl] = [x for x in transport.dead_letters(1000) if x.queue == q]
        assert dl.reason == "unknown task" and abs(dl.time - time.time()) < 60
        # listing leaves them in place
        assert [x.id for x in transport.dead_letters(1000) if x.queue == q] == [dl.id]
        assert transport.requeue_dead_letters([dl.id]) == 1
        again = get_one(c)
        assert again.message.headers == {"task": "t", "id": "id-1"}  # no x-qops-*
        p = again.message.properties
        assert (p["correlation_id"], p["reply_to"], p["expiration"], p["priority"]) == (
            "id-1", "r", "600000", 4)
        c.ack(again)
    finally:
        c.close()
    assert [x for x in transport.dead_letters(1000) if x.queue == q] == []


def test_dead_letters_can_be_listed_from_raw_bytes(transport: AMQPTransport,
                                                   queues: list[str]) -> None:
    q = new_queue(queues)
    transport.dead_letter(q, b"not json", "invalid JSON envelope")
    transport.dead_letter(q, b"also not json", "invalid JSON envelope")
    mine = [x for x in transport.dead_letters(1000) if x.queue == q]
    assert [x.raw for x in mine] == [b"not json", b"also not json"]  # in order
    assert transport.requeue_dead_letters([mine[1].id]) == 1
    assert [x.raw for x in transport.dead_letters(1000) if x.queue == q] == [b"not json"]
    assert transport.purge(q) == 1
    assert transport.requeue_dead_letters([mine[0].id]) == 1
    assert transport.purge(q) == 1


def test_in_flight_is_counted_and_dlq_not_listed(transport: AMQPTransport,
                                                 queues: list[str]) -> None:
    q = new_queue(queues)
    for i in range(3):
        transport.publish(q, task(i))
    c = transport.consumer([q], prefetch=2)
    try:
        got = [get_one(c), get_one(c)]
        [s] = [s for s in transport.queue_stats() if s.name == q]
        assert (s.ready, s.in_flight, s.consumers) == (1, 2, 1)
        assert transport.dead_letter_queue not in [s.name for s in transport.queue_stats()]
        for d in got:
            c.ack(d)
    finally:
        c.close()
    assert transport.purge(q + "-never-declared") == 0


def test_publisher_replaces_a_closed_connection(transport: AMQPTransport,
                                                queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport._local.link.conn.close()  # as if the broker had dropped it
    transport.publish(q, task(2))
    assert transport.queue_stats([q])[0].ready == 2


def test_publish_after_queue_deleted_declares_it_again(
        transport: AMQPTransport, admin: Any, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    admin.queue_delete(q)  # our cached declare is stale: the publish comes back unroutable
    transport.publish(q, task(2))
    assert transport.queue_stats([q])[0].ready == 1


def test_consumer_reconnects_and_stale_acks_are_ignored(transport: AMQPTransport,
                                                        queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        old = get_one(c)
        assert c._link is not None
        c._link.conn.close()  # the connection drops: the broker requeues id-1
        back = get_one(c)
        assert back.message.headers["id"] == "id-1" and back.redelivered
        c.ack(old)  # a tag from the dead channel: must not ack the new delivery
        c.ack(back)
        nxt = get_one(c)
        assert nxt.message.headers["id"] == "id-2"
        c.ack(nxt)
        assert c.get(0.3) is None
    finally:
        c.close()
    assert transport.queue_stats([q])[0].ready == 0


def test_broadcast_without_subscribers_is_fine(transport: AMQPTransport, admin: Any) -> None:
    channel = f"bc-{uuid.uuid4().hex[:8]}"
    transport.broadcast(channel, Message(body=b"{}", headers={"clock": 1, "expires": 1.5}))
    admin.exchange_delete(channel)


def test_subscription_survives_a_lost_connection(transport: AMQPTransport,
                                                 admin: Any) -> None:
    channel = f"bc-{uuid.uuid4().hex[:8]}"
    sub = transport.subscribe(channel)
    try:
        sub._link.conn.close()  # type: ignore[attr-defined]
        assert sub.get(0.3) is None  # resubscribes
        transport.broadcast(channel, Message(body=b'{"method": "ping"}'))
        m = sub.get(3.0)
        assert m is not None and m.body == b'{"method": "ping"}'
    finally:
        sub.close()
    admin.exchange_delete(channel)


def test_add_queue_refused_by_the_broker_leaves_the_others_running(
        transport: AMQPTransport, queues: list[str]) -> None:
    q = new_queue(queues)
    transport.publish(q, task(1))
    transport.publish(q, task(2))
    c = transport.consumer([q], prefetch=1)
    try:
        first = get_one(c)
        c.add_queue("amq.reserved-name")  # 403 ACCESS_REFUSED on declare
        c.ack(first)
        second = get_one(c)  # same connection: first was acked, not redelivered
        assert second.message.headers["id"] == "id-2" and not second.redelivered
        assert c.queues == [q]
        c.ack(second)
    finally:
        c.close()
