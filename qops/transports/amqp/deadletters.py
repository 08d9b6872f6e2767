"""Dead letters on RabbitMQ: a durable queue (``qops.dlq`` unless the URL names
another), holding each message with the ``x-qops-*`` headers saying where it came from
and why, and its original properties so that a requeue restores it exactly.

The functions take the transport: they publish and browse on its per-thread
connection (``_send``, ``_admin``, ``_link``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pika

from qops.errors import BrokerUnreachable
from qops.transports.amqp.link import LINK_ERRORS, _close_channel, _Link, lost_text
from qops.transports.amqp.props import _amqp_table, _expiration
from qops.transports.base import DeadLetter

if TYPE_CHECKING:
    from qops.transports.amqp.transport import AMQPTransport

#: headers qops adds to a dead-lettered message; stripped again when it is requeued
DL_QUEUE = "x-qops-queue"
DL_REASON = "x-qops-reason"
DL_TIME = "x-qops-time"  # int, milliseconds since the epoch (pika can't encode floats)
DL_EXPIRATION = "x-qops-expiration"  # the original per-message TTL, parked (see below)
DL_MESSAGE_ID = "x-qops-message-id"  # the original message_id, parked
DL_PREFIX = "x-qops-"
#: seconds ``requeue_dead_letters`` looks again for ids it did not find
FIND_AGAIN = 1.0


def dead_letter(transport: AMQPTransport, queue: str, raw: bytes, reason: str,
                original: Any) -> None:
    """Publish ``raw`` to the dead-letter queue, keeping the original message's
    headers and properties when we have them (a consumer's reject) so that a requeue
    restores the message exactly."""
    headers = dict(original.headers or {}) if original is not None else {}
    headers[DL_QUEUE] = queue
    headers[DL_REASON] = reason
    headers[DL_TIME] = int(time.time() * 1000)
    props = pika.BasicProperties(delivery_mode=2, message_id=uuid.uuid4().hex)
    if original is not None:
        # a per-message TTL would make the dead letter vanish from the DLQ: park it
        if original.expiration is not None:
            headers[DL_EXPIRATION] = original.expiration
        if original.message_id is not None:
            headers[DL_MESSAGE_ID] = original.message_id
        props.content_type = original.content_type
        props.content_encoding = original.content_encoding
        props.correlation_id = original.correlation_id
        props.reply_to = original.reply_to
        props.priority = original.priority
        props.type = original.type
        props.app_id = original.app_id
        props.timestamp = original.timestamp
    props.headers = _amqp_table(headers)
    dlq = transport.dead_letter_queue
    transport._send("", dlq, raw, props, queue=dlq, size_limit=False)


def dead_letter_id(props: Any, body: bytes) -> str:
    """The id ``dead_letters()`` lists a dead letter under."""
    if props.message_id:
        return str(props.message_id)
    # a message someone else put in the DLQ: name it by content so the id is stable
    import hashlib

    return hashlib.sha1(body).hexdigest()[:32]


def list_dead_letters(transport: AMQPTransport, limit: int) -> list[DeadLetter]:
    """Browse the DLQ: take up to ``limit`` messages without acking them on a channel
    of their own, then close it -- RabbitMQ puts them all back where they were."""
    if limit <= 0:
        return []
    dlq = transport.dead_letter_queue

    def run(link: _Link) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        with _browsing(link, dlq) as browse:
            while len(out) < limit:
                method, props, body = browse.ch.basic_get(dlq, auto_ack=False)
                if method is None:
                    break
                h = props.headers or {}
                out.append(DeadLetter(
                    id=dead_letter_id(props, body),
                    queue=str(h.get(DL_QUEUE) or ""),
                    reason=str(h.get(DL_REASON) or ""),
                    raw=body or b"",
                    time=(int(h[DL_TIME]) / 1000 if h.get(DL_TIME) is not None
                          else float(props.timestamp or 0)),
                    task=str(h.get("task") or ""), task_id=str(h.get("id") or ""),
                ))
        return out

    return transport._admin("listing dead letters", run)


class _Browse:
    """A channel browsing the DLQ (see ``_browsing``)."""

    def __init__(self, ch: Any, ready: int) -> None:
        self.ch = ch
        self.ready = ready  # the DLQ's ready messages when it began
        self.acked = 0  # of them, taken off for good


@contextmanager
def _browsing(link: _Link, dlq: str) -> Iterator[_Browse]:
    """A channel of its own to take dead letters from without acking them; what it did
    not ack goes back in place when it closes, and leaving waits until it is back
    (``_put_back``)."""
    browse = _Browse(None, link.declare_queue(dlq, None).method.message_count)
    browse.ch = link.conn.channel()
    try:
        yield browse
    finally:
        _close_channel(browse.ch)
    _put_back(link, dlq, browse.ready - browse.acked)


def _put_back(link: _Link, dlq: str, ready: int) -> None:
    """Wait until the DLQ has ``ready`` messages ready again (at most ``FIND_AGAIN``):
    RabbitMQ puts back what a closed channel held a moment after the close is
    confirmed, and what comes next -- a listing, a requeue, a count, a purge -- should
    find them there. Fewer than that for the whole wait means another client took
    some meanwhile."""
    deadline = time.monotonic() + FIND_AGAIN
    while link.declare_queue(dlq, None).method.message_count < ready and \
            time.monotonic() < deadline:
        time.sleep(0.01)


def dead_letter_count(transport: AMQPTransport) -> int:
    """The DLQ's ready messages, from a (re)declare: nothing is taken off it."""
    dlq = transport.dead_letter_queue
    return transport._admin("counting dead letters",
                            lambda link: int(link.declare_queue(dlq, None).method.message_count))


def requeue_dead_letters(transport: AMQPTransport, ids: Sequence[str] | None) -> int:
    """Move dead letters back to their queues with their original headers and
    properties: publish (confirmed) to the queue, then ack in the DLQ. The ones not
    chosen are held unacked and return in place when the browsing channel closes.
    Not retried on a connection loss: a message published but not yet acked would
    be moved twice.

    Ids not found are looked for again for up to ``FIND_AGAIN`` seconds: a dead letter
    that another channel browses at that moment (``qops dlq list``), or whose browsing
    channel has just closed, is not in the queue until RabbitMQ has put it back, which
    it does after the channel's close is confirmed (it was seen missing right after a
    listing on a busy broker)."""
    wanted = None if ids is None else set(ids)
    if wanted is not None and not wanted:
        return 0
    dlq = transport.dead_letter_queue
    link, _ = transport._link()
    moved = 0
    deadline = time.monotonic() + FIND_AGAIN
    try:
        while True:
            with _browsing(link, dlq) as browse:
                for _ in range(browse.ready):
                    method, props, body = browse.ch.basic_get(dlq, auto_ack=False)
                    if method is None:
                        break
                    dl_id = dead_letter_id(props, body)
                    if wanted is not None and dl_id not in wanted:
                        continue
                    h = dict(props.headers or {})
                    queue = h.get(DL_QUEUE)
                    if not queue:
                        continue  # not ours: we don't know where it goes
                    transport._send("", str(queue), body or b"", _restored(props, h),
                                    queue=str(queue))
                    browse.ch.basic_ack(method.delivery_tag)
                    browse.acked += 1
                    moved += 1
                    if wanted is not None:
                        wanted.discard(dl_id)
                        if not wanted:
                            break
            if not wanted or time.monotonic() >= deadline:
                return moved
            time.sleep(0.05)
    except LINK_ERRORS as exc:
        transport._drop_link(link)
        raise BrokerUnreachable(lost_text(transport.safe_url(),
                                          f"requeueing dead letters after {moved}", exc)) from None


def purge_dead_letters(transport: AMQPTransport) -> int:
    dlq = transport.dead_letter_queue

    def run(link: _Link) -> int:
        if dlq not in link.queues:
            link.declare_queue(dlq, None)
        return int(link.admin().queue_purge(dlq).method.message_count)

    return transport._admin("purging dead letters", run)


def _restored(props: Any, headers: dict[str, Any]) -> Any:
    """The properties of a message as it was before it was dead-lettered."""
    expiration = headers.pop(DL_EXPIRATION, None)
    message_id = headers.pop(DL_MESSAGE_ID, None)
    headers = {k: v for k, v in headers.items() if not k.startswith(DL_PREFIX)}
    return pika.BasicProperties(
        content_type=props.content_type, content_encoding=props.content_encoding,
        headers=_amqp_table(headers) if headers else None,
        delivery_mode=2, priority=props.priority,
        correlation_id=props.correlation_id, reply_to=props.reply_to,
        expiration=_expiration(expiration), message_id=message_id,
        type=props.type, app_id=props.app_id, timestamp=props.timestamp,
    )
