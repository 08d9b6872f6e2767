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
    if DELIVERY_COUNT in headers:  # quorum queue: returns counted by RabbitMQ
        return _int(headers[DELIVERY_COUNT]) + (1 if died else 0), new
    return _int(headers.get(LOST_HEADER)) + (1 if new else 0), new


def keep(consumer: _AMQPConsumer, delivery: Delivery, n: int) -> bool:
    """Make the count last: nothing to do on a quorum queue (True: run it); on a classic
    queue republish a copy carrying it and ack this delivery (False)."""
    msg = delivery.message
    if msg is None or DELIVERY_COUNT in msg.headers:
        return True
    copy = Message(body=msg.body, headers={**msg.headers, LOST_HEADER: n},
                   properties=dict(msg.properties), content_type=msg.content_type,
                   content_encoding=msg.content_encoding)
    consumer.replace(delivery, lambda: consumer.transport.publish(delivery.queue, copy))
    return False


def give_back(consumer: _AMQPConsumer, unstarted: list[Delivery]) -> None:
    """Messages a consumer took and never started, given back on purpose: as it closes
    (a warm shutdown, a pool child recycled by --max-tasks-per-child or pool_restart),
    or held for an ETA past half the broker's consumer_timeout (renew). A requeue, or the
    close, would bring each back ``redelivered``, which counts as a worker loss: a child
    recycled every few tasks had healthy messages dead-lettered after its third
    recycling. So each is published again to its queue (to its tail), its count as it
    is, and acked (``keep``). One that came redelivered (a loss not counted yet), from a
    quorum queue that counts returns, or whose copy could not be published is requeued,
    as before."""
    for d in unstarted:
        try:
            again = d.redelivered or keep(consumer, d, count(d, False)[0])
        except Exception as exc:
            log.warning("could not give back a message by a copy (%s); requeued", exc)
            again = True
        if again:
            consumer.requeue(d)
