"""Worker-lost accounting on RabbitMQ (qops/worker/lost.py; docs/guarantees.md).

RabbitMQ keeps no record a worker could write when a task starts, and it delivers
again what a dead connection held with ``redelivered`` set, whether it was running or
only prefetched. So on RabbitMQ a redelivery of an acks_late message counts as one
worker loss, and the count is kept where the broker offers one:

- quorum queues count returns themselves: the redelivered copy carries
  ``x-delivery-count``, used as it is;
- classic queues count nothing: before a counted message runs again, qops publishes a
  copy to the same queue with the header ``x-qops-worker-lost`` = the count (Celery
  ignores the header; the copy is otherwise the same message) and acks the delivery.

A message given back on purpose (``give_back``) is such a copy on either kind of queue,
carrying the count so far: on a quorum queue the broker's count starts again from 0 on
the copy, so the count is ``x-qops-worker-lost`` + ``x-delivery-count``.

Queue arguments are never changed: the queues Celery declares stay as they are."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from qops.protocol import Message
from qops.transports.base import Delivery

if TYPE_CHECKING:
    from qops.transports.amqp.consumer import _AMQPConsumer

log = logging.getLogger(__name__)

#: the count on a copy qops republished (classic queues); docs/protocol.md section 3
LOST_HEADER = "x-qops-worker-lost"
#: the broker's own count of returns (quorum queues)
DELIVERY_COUNT = "x-delivery-count"


def _int(value: object) -> int:
    try:
        return max(0, int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def count(delivery: Delivery, died: bool) -> tuple[int, bool]:
    headers = delivery.message.headers if delivery.message is not None else {}
    new = died or delivery.redelivered
    n = _int(headers.get(LOST_HEADER))
    if DELIVERY_COUNT in headers:  # quorum queue: returns counted by RabbitMQ
        return n + _int(headers[DELIVERY_COUNT]) + (1 if died else 0), new
    return n + (1 if new else 0), new


def keep(consumer: _AMQPConsumer, delivery: Delivery, n: int) -> bool:
    """Make the count last: nothing to do on a quorum queue (True: run it); on a classic
    queue republish a copy carrying it and ack this delivery (False)."""
    msg = delivery.message
    if msg is None or DELIVERY_COUNT in msg.headers:
        return True
    _republish(consumer, delivery, n)
    return False


def _republish(consumer: _AMQPConsumer, delivery: Delivery, n: int) -> None:
    """Publish a copy of ``delivery`` carrying the count ``n`` to its queue, then ack it.
    The copy drops the broker's own count: a quorum queue sets ``x-delivery-count`` only
    once the copy is returned, so an old one would be read as the copy's own."""
    msg = delivery.message
    assert msg is not None
    headers = {k: v for k, v in msg.headers.items() if k != DELIVERY_COUNT}
    headers[LOST_HEADER] = n
    copy = Message(body=msg.body, headers=headers, properties=dict(msg.properties),
                   content_type=msg.content_type, content_encoding=msg.content_encoding)
    consumer.replace(delivery, lambda: consumer.transport.publish(delivery.queue, copy))


def give_back(consumer: _AMQPConsumer, unstarted: list[Delivery]) -> None:
    """Messages a consumer took and never started, given back on purpose: as it closes
    (a warm shutdown, a pool child recycled by --max-tasks-per-child or pool_restart),
    or held for an ETA past half the broker's consumer_timeout (renew). A requeue, or the
    close, would bring each back ``redelivered``, which counts as a worker loss: a child
    recycled every few tasks had healthy messages dead-lettered after its third
    recycling, and a quorum queue's count grew at every renewal of an ETA held for
    hours. So each is published again to its queue (to its tail) carrying its count so
    far (a redelivery not counted yet included), and acked. One whose copy could not be
    published is requeued."""
    for d in unstarted:
        if d.message is None:  # undecodable: nothing to copy
            consumer.requeue(d)
            continue
        try:
            _republish(consumer, d, count(d, False)[0])
        except Exception as exc:
            log.warning("could not give back a message by a copy (%s); requeued", exc)
            consumer.requeue(d)
