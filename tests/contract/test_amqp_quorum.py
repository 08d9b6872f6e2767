"""Worker-lost counts of a message given back on purpose on RabbitMQ: kept as they were,
on a classic queue (qops's header) and on a quorum queue, whose broker counts returns
itself (x-delivery-count)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from qops.protocol import Message
from qops.transports.amqp import AMQPTransport, lost
from qops.transports.base import TransportOptions
from qops.transports.declare import Declarations

pytestmark = pytest.mark.amqp


@pytest.fixture(params=["classic", "quorum"])
def transport_queue(amqp_url: str,
                    request: pytest.FixtureRequest) -> Iterator[tuple[AMQPTransport, str]]:
    options = TransportOptions(declarations=Declarations(other_type=request.param))
    name = f"{request.param}-{uuid.uuid4().hex[:10]}"
    t = AMQPTransport(amqp_url, options)
    yield t, name
    t.close()
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_delete(name)
    conn.close()


def _get(c: Any) -> Any:
    for _ in range(50):
        d = c.get(0.2)
        if d is not None:
            return d
    raise AssertionError("no message arrived")


def _take(t: AMQPTransport, queue: str) -> tuple[Any, Any]:
    c = t.consumer([queue], prefetch=1)
    try:
        return c, _get(c)
    except AssertionError:
        c.close()
        raise


def test_give_back_keeps_the_count(transport_queue: tuple[AMQPTransport, str]) -> None:
    """An ETA task held past half the consumer_timeout is given back (renewed) again and
    again; a task whose worker died once must come back with a count of 1 after any
    number of renewals, not one more a renewal (the broker counts each requeue as a
    return: a countdown of hours renewed every 15 minutes reached the delivery limit
    and was dead-lettered as lost before it was due)."""
    t, q = transport_queue
    t.publish(q, Message(body=b"[[], {}, {}]", headers={"task": "t", "id": "id-1"},
                         properties={"correlation_id": "id-1"}))
    c, d = _take(t, q)
    assert lost.count(d, False) == (0, False)
    c.close()  # a worker that died holding it: the broker returns it (one loss)
    c, d = _take(t, q)
    assert d.redelivered and lost.count(d, False) == (1, True)
    for _ in range(3):  # renewals: the copy comes back to the same consumer
        c.renew(d)
        d = _get(c)
        assert lost.count(d, False) == (1, False), d.message.headers
    c.give_back([d])  # a recycled child, a warm shutdown
    c, d = _take(t, q)
    assert lost.count(d, False) == (1, False), d.message.headers
    assert d.message.headers["id"] == "id-1"
    c.ack(d)
    assert c.get(0.3) is None  # once
    c.close()
