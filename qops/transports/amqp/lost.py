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

from qops.errors import PublishError, PublishManyError
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
    if _republish(consumer, [(delivery, n)]):
        raise PublishError(f"RabbitMQ did not confirm the copy on {delivery.queue!r}")
    return False


def _copy(msg: Message, n: int) -> Message:
    """``msg`` carrying the count ``n``, without the broker's own count: a quorum queue
    sets ``x-delivery-count`` only once the copy is returned, so an old one would be read
    as the copy's own."""
    headers = {k: v for k, v in msg.headers.items() if k != DELIVERY_COUNT}
    headers[LOST_HEADER] = n
    return Message(body=msg.body, headers=headers, properties=dict(msg.properties),
                   content_type=msg.content_type, content_encoding=msg.content_encoding)


def _republish(consumer: _AMQPConsumer, counted: list[tuple[Delivery, int]]
               ) -> list[Delivery]:
    """Publish a copy of each delivery carrying its count to its queue, in one confirmed
    batch, then ack those whose copy was confirmed; returns the others (not acked)."""
    copies = []
    for d, n in counted:
        assert d.message is not None
        copies.append((d.queue, _copy(d.message, n)))

    def publish() -> list[int]:
        try:
            consumer.transport.publish_many(copies)
        except PublishManyError as exc:
            return exc.unconfirmed
        return []

    return consumer.replace([d for d, _ in counted], publish)


def give_back(consumer: _AMQPConsumer, unstarted: list[Delivery]) -> None:
    """Messages a consumer took and never started, given back on purpose: as it closes
    (a warm shutdown, a pool child recycled by --max-tasks-per-child or pool_restart),
    or held for an ETA past half the broker's consumer_timeout (renew). A requeue, or the
    close, would bring each back ``redelivered``, which counts as a worker loss: a child
    recycled every few tasks had healthy messages dead-lettered after its third
    recycling, and a quorum queue's count grew at every renewal of an ETA held for
    hours. So each is published again to its queue (to its tail) carrying its count so
    far (a redelivery not counted yet included), all in one confirmed batch (a warm
    shutdown holding thousands of ETA tasks), and acked. One whose copy could not be
    published is requeued."""
    left = [d for d in unstarted if d.message is None]  # undecodable: nothing to copy
    counted = [(d, count(d, False)[0]) for d in unstarted if d.message is not None]
    if counted:
        try:
            left += _republish(consumer, counted)
        except Exception as exc:
            log.warning("could not give back messages by copies (%s); requeued", exc)
            left += [d for d, _ in counted]
    for d in left:
        consumer.requeue(d)
