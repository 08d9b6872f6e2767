"""RabbitMQ transport (AMQP 0-9-1 through ``pika``): ``amqp://user:pass@host:5672/vhost``.

Wire layout (PROTOCOL.md §1, §3): tasks go through the default exchange ``""`` with
routing key = queue name, ``delivery_mode`` 2, to durable queues declared with
``x-max-priority`` (so qops's priority 9 = AMQP's highest, passed through as is).
Broadcasts go to a fanout exchange named after the channel (not durable, not
auto-deleted, like Celery's pidbox exchange); events (a broadcast with a routing key,
§5) to a topic exchange (durable, like Celery's ``celeryev``), published without
waiting for a publisher confirm. Exchanges someone declared otherwise are used as they
are. Dead letters live in a durable queue, ``qops.dlq`` unless
``?dead_letter_queue=NAME`` is in the URL.

Threads. A pika connection must only ever be used by one thread at a time; its one
thread-safe method is ``add_callback_threadsafe``. So:

- publishing (and the admin calls: purge, stats, dead letters) uses one connection per
  thread, kept in a ``threading.local`` and replaced on the next call after it is lost;
- each ``Consumer`` and ``Subscription`` owns its own connection, driven only by the
  thread calling ``get()``. ``ack``/``requeue``/``reject``/``add_queue``/``cancel_queue``
  from other threads only queue an operation (waking that thread if it is blocked),
  which it runs before it hands out the next message, settlements in one batch and one
  flush (and ``close()`` runs them before closing).

Reply queues (``reply_consumer``) are declared by their consumer on its own connection:
not durable, exclusive, auto-delete, with PROTOCOL.md §3's ``x-expires`` 10000 and
``x-message-ttl`` 300000, so RabbitMQ deletes them when that connection closes or dies.
``send_reply`` publishes to the default exchange, not mandatory: a reply to a queue that
is gone is dropped by the broker (and still confirmed), which is right for replies.
With an exchange (``reply.<mailbox>``) the queue is also bound to it, as kombu binds
its pidbox reply queues, so Celery workers' replies reach it.

Live nodes: RabbitMQ can't list queues or connections without the management plugin,
so each registered node holds a consumer on the presence queue ``qops.nodes``, on a
connection of its own, and ``live_nodes()`` is that queue's consumer count.

Liveness: RabbitMQ redelivers a consumer's unacknowledged messages as soon as its
connection drops (the process died, or it missed AMQP heartbeats), so
``Consumer.heartbeat()`` and ``Transport.recover()`` have nothing to do here.

URL query options: ``heartbeat`` (AMQP heartbeat in seconds, default 60, 0 = off),
``dead_letter_queue``, ``blocked_connection_timeout`` (seconds, default 60: how long a
publish may wait while the broker blocks publishers, e.g. on a memory alarm, before it
fails with PublishError instead of hanging).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pika
import pika.exceptions as pex
import pika.frame
import pika.spec

from qops.errors import BrokerUnreachable, PublishError, UsageError
from qops.protocol import Message
from qops.transports.amqp.link import (
    LINK_ERRORS,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    PUMP_SLICE,
    RESOURCE_LOCKED,
    _channel_error,
    _close_channel,
    _Link,
    _reason,
    open_connection,
)
from qops.transports.amqp.props import _amqp_table, _basic_properties, _expiration, _message
from qops.transports.amqp.url import parse_url
from qops.transports.base import (
    REPLY_ONLY,
    REPLY_PREFETCH,
    Consumer,
    DeadLetter,
    Delivery,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
)

log = logging.getLogger(__name__)

#: headers qops adds to a dead-lettered message; stripped again when it is requeued
DL_QUEUE = "x-qops-queue"
DL_REASON = "x-qops-reason"
DL_TIME = "x-qops-time"  # int, milliseconds since the epoch (pika can't encode floats)
DL_EXPIRATION = "x-qops-expiration"  # the original per-message TTL, parked (see below)
DL_MESSAGE_ID = "x-qops-message-id"  # the original message_id, parked
DL_PREFIX = "x-qops-"

#: queue arguments of a subscription's queue: like the pidbox worker queue
#: (PROTOCOL.md §3), a broadcast nobody read within 5 minutes is stale
SUBSCRIPTION_ARGS = {"x-message-ttl": 300000}

#: the live-node registry: each live node holds one consumer on this queue, on a
#: connection of its own, and ``live_nodes()`` reads its consumer count (RabbitMQ can't
#: list queues or connections without the management plugin). Nothing is ever
#: published to it. Not durable, not auto-delete (an auto-delete queue vanishes when
#: its last consumer leaves, and a node declaring it just then would get a 404 on its
#: basic.consume); ``x-expires`` removes it a minute after the last node went away.
PRESENCE_QUEUE = "qops.nodes"
PRESENCE_ARGS = {"x-expires": 60000}

T = TypeVar("T")


# -- transport ---------------------------------------------------------------------------


class AMQPTransport(Transport):
    scheme = "amqp"
    consume_in_pool_children = True

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        self.params = parse_url(url)
        self.dead_letter_queue = self.params.dead_letter_queue
        self._local = threading.local()
        self._lock = threading.Lock()
        self._links: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._consumers: weakref.WeakSet[_AMQPConsumer] = weakref.WeakSet()
        self._known: set[str] = set()  # queues this transport declared or consumed
        self._presence = _Presence(self)
        self._held_locks: dict[str, tuple[str, _Link]] = {}  # name -> (owner, link)
        self._locks_mutex = threading.Lock()

    # -- connections ---------------------------------------------------------------------
    def connect(self, purpose: str) -> Any:
        """A new BlockingConnection, or BrokerUnreachable saying what to fix."""
        return open_connection(self.params, self.options, self.safe_url(), purpose)

    def _link(self) -> tuple[_Link, bool]:
        """This thread's connection, and whether it was already open (i.e. it may have
        died while idle, so a failure on it is worth one retry on a new one)."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            if link.usable():
                return link, True
            link.close()
        self._local.link = None
        link = _Link(self.connect("publisher"), confirm=self.options.confirm_publish)
        self._local.link = link
        with self._lock:
            self._links.add(link)
        return link, False

    def _drop_link(self, link: _Link) -> None:
        if getattr(self._local, "link", None) is link:
            self._local.link = None
        link.close()

    def _admin(self, what: str, fn: Callable[[_Link], T]) -> T:
        """Run an idempotent admin call on this thread's connection, once more on a new
        connection if the old one turns out to be dead."""
        for attempt in (1, 2):
            link, reused = self._link()
            try:
                result = fn(link)
                link.used = time.monotonic()
                return result
            except LINK_ERRORS as exc:
                if isinstance(exc, pex.ChannelClosedByBroker):
                    raise _channel_error(exc, what, self.safe_url()) from None
                self._drop_link(link)
                if attempt == 2 or not reused:
                    raise BrokerUnreachable(
                        f"lost the connection to RabbitMQ at {self.safe_url()} while "
                        f"{what} ({_reason(exc)})") from None
        raise AssertionError("unreachable")

    def _queue_arguments(self) -> dict[str, Any] | None:
        n = self.options.max_priority
        return {"x-max-priority": n} if n and n > 0 else None

    def _remember(self, queue: str) -> None:
        with self._lock:
            self._known.add(queue)

    # -- publishing ------------------------------------------------------------------------
    def _send(self, exchange: str, routing_key: str, body: bytes, props: Any, *,
              queue: str | None, queue_args: dict[str, Any] | None = None,
              exchange_kind: str | None = None, confirm: bool = True,
              size_limit: bool = True) -> None:
        """Publish on this thread's connection, declaring ``queue`` (or ``exchange``, of
        ``exchange_kind``) first.

        With confirms on, returns only once the broker has taken the message. A message
        for a queue is published ``mandatory``: if the queue vanished since we declared
        it, the broker returns it, and we declare again and resend (nothing was
        delivered, so no duplicate); likewise a 404 for an exchange deleted since we
        declared it. A connection that died while idle is replaced and the message sent
        once more on the new one. ``confirm=False`` (events) publishes on the link's
        unconfirmed channel: written to the socket, not waited for. ``size_limit=False``
        (dead letters) skips the max_message_size check: the message is one the broker
        already took, and it is often dead-lettered precisely for being too large."""
        if size_limit:
            self.check_size(repr(routing_key or exchange), body)
        confirm = confirm and self.options.confirm_publish
        mandatory = queue is not None and confirm
        redeclared = False
        attempt = 0
        while True:
            attempt += 1
            link, reused = self._link()
            try:
                if queue is not None and queue not in link.queues:
                    link.declare_queue(queue, queue_args)
                    self._remember(queue)
                if exchange_kind is not None:
                    link.declare_exchange(exchange, exchange_kind)
                ch = link.main() if confirm else link.events()
                ch.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
                link.used = time.monotonic()
                return
            except pex.UnroutableError:
                if queue is not None and not redeclared:
                    link.queues.discard(queue)
                    redeclared = True
                    continue
                raise PublishError(
                    f"RabbitMQ could not route the message to queue {routing_key!r} "
                    "(it does not exist)") from None
            except pex.NackError:
                raise PublishError(
                    f"RabbitMQ refused the message for {routing_key or exchange!r} (nack: "
                    "queue full with overflow=reject-publish, or an internal error)"
                ) from None
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == NOT_FOUND and exchange_kind is not None \
                        and not redeclared:
                    # the exchange was deleted since we declared it (on the unconfirmed
                    # channel the 404 may even be about an earlier event): declare again
                    link.exchanges.clear()
                    redeclared = True
                    continue
                # e.g. 403 on a reserved name, 406 a bad expiration; the channel reopens
                # on the next call, the connection is fine
                raise _channel_error(exc, f"publishing to {routing_key or exchange!r}",
                                     self.safe_url(), PublishError) from None
            except LINK_ERRORS as exc:
                self._drop_link(link)
                if attempt == 1 and reused:
                    continue
                raise PublishError(
                    f"lost the connection to RabbitMQ at {self.safe_url()} while publishing "
                    f"to {routing_key or exchange!r} ({_reason(exc)}); the message may not "
                    "have been delivered") from None

    def publish(self, queue: str, message: Message) -> None:
        props = _basic_properties(message, delivery_mode=2)
        self._send("", queue, message.body, props, queue=queue,
                   queue_args=self._queue_arguments())

    # -- consuming ------------------------------------------------------------------------
    def consumer(self, queues: Sequence[str], prefetch: int,
                 consumer_id: str | None = None) -> Consumer:
        c = _AMQPConsumer(self, list(queues), prefetch, consumer_id or uuid.uuid4().hex)
        with self._lock:
            self._consumers.add(c)
        return c

    def reply_consumer(self, name: str, *, exchange: str | None = None,
                       routing_key: str | None = None) -> Consumer:
        binding = (exchange, routing_key if routing_key is not None else name) \
            if exchange else None
        c = _AMQPConsumer(self, [name], REPLY_PREFETCH, uuid.uuid4().hex, reply=True,
                          binding=binding)
        with self._lock:
            self._consumers.add(c)
        return c

    def send_reply(self, name: str, message: Message) -> None:
        # transient (the queue is), not declared, not mandatory: see the module doc
        props = _basic_properties(message, delivery_mode=1)
        self._send("", name, message.body, props, queue=None)

    def _in_flight(self, queue: str) -> int:
        """Messages of ``queue`` reserved by this transport's consumers.

        AMQP can tell how many messages are ready and how many consumers a queue has,
        not how many are unacknowledged: that needs the management plugin's HTTP API,
        which qops doesn't require. So in_flight counts what this process holds; other
        processes' reservations are not seen."""
        with self._lock:
            consumers = list(self._consumers)
        return sum(c.held(queue) for c in consumers)

    # -- queues ------------------------------------------------------------------------------
    def purge(self, queue: str) -> int:
        def run(link: _Link) -> int:
            try:
                return int(link.admin().queue_purge(queue).method.message_count)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == NOT_FOUND:
                    return 0
                raise

        return self._admin(f"purging {queue!r}", run)

    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        listed = queues is None
        if queues is None:
            with self._lock:
                names = sorted(self._known - {self.dead_letter_queue})
        else:
            names = list(queues)

        def run(link: _Link) -> list[QueueStats]:
            out = []
            for name in names:
                ready = consumers = 0
                try:
                    ok = link.admin().queue_declare(name, passive=True).method
                    ready, consumers = ok.message_count, ok.consumer_count
                except pex.ChannelClosedByBroker as exc:
                    if exc.reply_code == NOT_FOUND:
                        if listed:  # deleted since we saw it
                            continue
                    elif exc.reply_code != RESOURCE_LOCKED:  # exclusive to another conn.
                        raise
                out.append(QueueStats(name, int(ready), self._in_flight(name), int(consumers)))
            return out

        return self._admin("reading queue stats", run)

    def queue_exists(self, queue: str) -> bool:
        def run(link: _Link) -> bool:
            try:
                link.admin().queue_declare(queue, passive=True)
                return True
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == NOT_FOUND:
                    return False
                if exc.reply_code == RESOURCE_LOCKED:  # exists, exclusive to someone else
                    return True
                raise

        return self._admin(f"checking queue {queue!r}", run)

    # -- fanout -------------------------------------------------------------------------------
    def broadcast(self, channel: str, message: Message, *,
                  routing_key: str | None = None) -> None:
        """Without ``routing_key``: a confirmed publish to the fanout exchange
        ``channel`` (remote control). With one: an event, published unconfirmed to the
        topic exchange ``channel``. Both transient and not mandatory, like Celery's:
        a broadcast is for the subscribers of the moment, and nobody listening is fine."""
        props = _basic_properties(message, delivery_mode=1)
        if routing_key is None:
            self._send(channel, "", message.body, props, queue=None, exchange_kind="fanout")
        else:
            self._send(channel, routing_key, message.body, props, queue=None,
                       exchange_kind="topic", confirm=False)

    def subscribe(self, channel: str, *, pattern: str | None = None) -> Subscription:
        return _AMQPSubscription(self, channel, pattern)

    # -- the live-node registry ------------------------------------------------------------
    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        """Make sure this process holds a consumer for ``name`` on the presence queue
        (``info`` and ``ttl`` are not needed: the broker drops the consumer with its
        connection, at once when the process dies). Each call (every worker heartbeat)
        also pumps that connection, which sends its AMQP heartbeats."""
        self._presence.register(name)

    def unregister_node(self, name: str) -> None:
        self._presence.unregister(name)

    def live_nodes(self) -> int:
        """How many nodes hold a consumer on the presence queue (0 if there is none)."""
        def run(link: _Link) -> int:
            try:
                ok = link.admin().queue_declare(PRESENCE_QUEUE, passive=True)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == NOT_FOUND:
                    return 0
                raise
            return int(ok.method.consumer_count)

        return self._admin("counting live nodes", run)

    # -- dead letters ---------------------------------------------------------------------------
    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        self._dead_letter(queue, raw, reason, None)

    def _dead_letter(self, queue: str, raw: bytes, reason: str, original: Any) -> None:
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
        dlq = self.dead_letter_queue
        # no x-max-priority on the DLQ: it keeps arrival order for listing
        self._send("", dlq, raw, props, queue=dlq, queue_args=None, size_limit=False)

    def _dead_letter_id(self, props: Any, body: bytes) -> str:
        if props.message_id:
            return str(props.message_id)
        # a message someone else put in the DLQ: name it by content so the id is stable
        import hashlib

        return hashlib.sha1(body).hexdigest()[:32]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Browse the DLQ: take up to ``limit`` messages without acking them on a channel
        of their own, then close it -- RabbitMQ puts them all back where they were."""
        if limit <= 0:
            return []
        dlq = self.dead_letter_queue

        def run(link: _Link) -> list[DeadLetter]:
            if dlq not in link.queues:
                link.declare_queue(dlq, None)
            ch = link.conn.channel()
            out: list[DeadLetter] = []
            try:
                while len(out) < limit:
                    method, props, body = ch.basic_get(dlq, auto_ack=False)
                    if method is None:
                        break
                    h = props.headers or {}
                    out.append(DeadLetter(
                        id=self._dead_letter_id(props, body),
                        queue=str(h.get(DL_QUEUE) or ""),
                        reason=str(h.get(DL_REASON) or ""),
                        raw=body or b"",
                        time=(int(h[DL_TIME]) / 1000 if h.get(DL_TIME) is not None
                              else float(props.timestamp or 0)),
                    ))
            finally:
                _close_channel(ch)
            return out

        return self._admin("listing dead letters", run)

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Move dead letters back to their queues with their original headers and
        properties: publish (confirmed) to the queue, then ack in the DLQ. The ones not
        chosen are held unacked and return in place when the browsing channel closes.
        Not retried on a connection loss: a message published but not yet acked would
        be moved twice."""
        wanted = None if ids is None else set(ids)
        if wanted is not None and not wanted:
            return 0
        dlq = self.dead_letter_queue
        link, _ = self._link()
        moved = 0
        try:
            total = link.declare_queue(dlq, None).method.message_count
            ch = link.conn.channel()
            try:
                for _ in range(total):
                    method, props, body = ch.basic_get(dlq, auto_ack=False)
                    if method is None:
                        break
                    if wanted is not None and self._dead_letter_id(props, body) not in wanted:
                        continue
                    h = dict(props.headers or {})
                    queue = h.get(DL_QUEUE)
                    if not queue:
                        continue  # not ours: we don't know where it goes
                    self._send("", str(queue), body or b"", _restored(props, h),
                               queue=str(queue), queue_args=self._queue_arguments())
                    ch.basic_ack(method.delivery_tag)
                    moved += 1
                    if wanted is not None:
                        wanted.discard(self._dead_letter_id(props, body))
                        if not wanted:
                            break
            finally:
                _close_channel(ch)
        except LINK_ERRORS as exc:
            self._drop_link(link)
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self.safe_url()} while requeueing dead "
                f"letters after {moved} ({_reason(exc)})") from None
        return moved

    def purge_dead_letters(self) -> int:
        dlq = self.dead_letter_queue

        def run(link: _Link) -> int:
            if dlq not in link.queues:
                link.declare_queue(dlq, None)
            return int(link.admin().queue_purge(dlq).method.message_count)

        return self._admin("purging dead letters", run)

    # -- lifecycle --------------------------------------------------------------------------
    def ping(self) -> None:
        self._admin("connecting", lambda link: None)

    def close(self) -> None:
        """Close every publisher connection this transport opened (in any thread: call
        it when no other thread is publishing). Consumers and subscriptions are closed
        by their owners."""
        with self._lock:
            links = list(self._links)
            self._links = weakref.WeakSet()
        self._local.link = None
        for link in links:
            link.close()
        with self._locks_mutex:
            held, self._held_locks = list(self._held_locks.values()), {}
        for _owner, lock_link in held:
            lock_link.close()
        self._presence.close()

    # -- locks (one beat per schedule) ------------------------------------------------------
    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """The lock is the exclusive queue ``qops.lock.<name>`` on a connection of its own
        that the holder keeps open: RabbitMQ answers RESOURCE_LOCKED to anyone else, and
        deletes the queue the moment the holder's connection dies (kill -9 included), so
        a standby takes over on its next try. Each renewal pumps the connection (AMQP
        heartbeats) and notices one the broker dropped. ``ttl`` is not needed."""
        queue = f"qops.lock.{name}"
        with self._locks_mutex:
            held = self._held_locks.get(name)
            if held is not None:
                held_owner, link = held
                alive = False
                if link.pid == os.getpid():
                    try:
                        link.conn.process_data_events(0)
                        alive = bool(link.conn.is_open)
                    except LINK_ERRORS:
                        alive = False
                if alive:
                    return bool(held_owner == owner)
                del self._held_locks[name]  # the connection is gone, and the queue with it
                link.close()
            link = _Link(self.connect("lock"), confirm=False)
            try:
                link.admin().queue_declare(queue, durable=False, exclusive=True,
                                           auto_delete=False)
            except pex.ChannelClosedByBroker as exc:
                link.close()
                if exc.reply_code == RESOURCE_LOCKED:
                    return False  # exclusive to another connection: someone holds it
                raise _channel_error(exc, f"taking the lock {name!r}", self.safe_url()) from None
            except LINK_ERRORS as exc:
                link.close()
                raise BrokerUnreachable(
                    f"lost the connection to RabbitMQ at {self.safe_url()} while taking the "
                    f"lock {name!r} ({_reason(exc)})") from None
            self._held_locks[name] = (owner, link)
            return True

    def release_lock(self, name: str, owner: str) -> None:
        """Closing the connection deletes the exclusive queue."""
        with self._locks_mutex:
            held = self._held_locks.get(name)
            if held is None or held[0] != owner:
                return
            del self._held_locks[name]
        held[1].close()


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


def _noop() -> None:
    """Wakes a connection's pump (add_callback_threadsafe) so it runs queued operations."""


# -- consumer ---------------------------------------------------------------------------------


class _AMQPConsumer(Consumer):
    """Reserves messages with ``basic.consume`` (manual acks, ``basic.qos`` = prefetch).

    The broker pushes at most ``prefetch`` unacknowledged messages; they wait in
    ``_buffer`` until ``get()`` hands them out. Delivery tags count from 1 on each
    channel, so after a reconnect they would collide with tags handed out before it:
    ``Delivery.tag`` is ``_base`` + the channel's tag, ``_base`` being the highest tag
    seen before the current channel. Settling a delivery from an older channel is a
    no-op: the broker already requeued it when that connection dropped.

    Settlements are batched. ``ack``/``requeue`` (any thread) move the tag from
    ``_held`` to ``_acks``/``_nacks`` in one step under ``_lock``. They wake the owner
    only while it is blocked pumping the connection, and then once (a wake-up is a
    pipe write and a context switch); an owner that is busy handing out messages takes
    the settlements at its next ``get()`` anyway, which checks for them under the same
    lock before it blocks. The owner writes each batch out with one flush: acks below
    the lowest tag still held or requeued become one ``basic.ack(multiple)``
    (RabbitMQ's tags only grow on a channel, and ``_held`` keeps them in that order),
    the others go one by one.

    The prefetch is a channel-wide ``basic.qos`` (``global``, in RabbitMQ's meaning:
    shared by the consumers of all our queues, as Celery sets it). ``exempt()`` grows
    that window by one for each exempt delivery (as Celery does for its ETA tasks), so
    the broker keeps sending ``prefetch`` countable messages; settling one shrinks it
    again, the new window sent before the settlement so that the broker never has room
    for one more. A quorum queue refuses a channel-wide prefetch (540 NOT_IMPLEMENTED,
    which closes the connection): the consumer then reconnects with a per-consumer
    prefetch, which RabbitMQ can't change under a running consumer, and ``exempt()``
    raises NotImplementedError. Either way ``get()`` also counts what it handed out
    and not settled, exempt deliveries apart, and never exceeds ``prefetch``.
    """

    transport: AMQPTransport

    def __init__(self, transport: AMQPTransport, queues: list[str], prefetch: int,
                 cid: str, reply: bool = False,
                 binding: tuple[str, str] | None = None) -> None:
        self.transport = transport
        self.id = cid
        self.prefetch = max(1, prefetch)
        # a reply consumer: its one queue is a reply queue, declared on its connection
        # (again after a reconnect: the broker deleted it with the old connection), and
        # bound to (exchange, routing key) as kombu binds a pidbox reply queue
        self.reply = reply
        self.binding = binding
        self._lock = threading.Lock()  # _wanted, _held, _acks, _nacks, _ops, _woken
        self._io = threading.RLock()  # whoever drives the connection (get, close)
        self._wanted: list[str] = list(dict.fromkeys(queues))
        # tag -> (queue, BasicProperties for reject()): buffered or handed out, not
        # settled; in delivery order, i.e. ascending tags
        self._held: dict[int, tuple[str, Any]] = {}
        self._acks: list[int] = []  # settled, not yet sent
        self._nacks: list[int] = []
        self._exempt: set[int] = set()  # handed out, not counted against the prefetch
        self._qos_due = False  # the window must follow len(_exempt)
        self._window = self.prefetch  # basic.qos on the current channel (owner only)
        self._global_qos = True  # channel-wide prefetch; False once a quorum queue refused
        self._pumping = False  # the owner is blocked in process_data_events
        self._woken = False  # ... and a wake-up is on its way to it
        self._ops: deque[tuple[str, str]] = deque()  # queue changes from any thread
        self._buffer: deque[tuple[int, str, bool, Any, bytes]] = deque()
        self._tags: dict[str, str] = {}  # queue -> consumer tag, on the current channel
        self._queue_of: dict[str, str] = {}  # consumer tag -> queue
        self._base = 0
        self._top = 0
        self._owner = threading.get_ident()
        self._closed = False
        self._link: _Link | None = None
        self._connect()

    # -- connection (owner thread only) ------------------------------------------------------
    def _connect(self) -> None:
        while True:
            try:
                self._open()
                return
            except pex.ConnectionClosedByBroker as exc:
                if exc.reply_code == NOT_IMPLEMENTED and self._global_qos:
                    log.info("consumer %s: a queue refuses a channel-wide prefetch (a "
                             "quorum queue?): using a per-consumer prefetch of %d; held ETA "
                             "tasks keep their prefetch slots", self.id, self.prefetch)
                    self._global_qos = False
                    continue
                raise BrokerUnreachable(
                    f"RabbitMQ at {self.transport.safe_url()} closed the connection while "
                    f"consumer {self.id} started ({exc.reply_code} {exc.reply_text})"
                ) from None

    def _open(self) -> None:
        link = _Link(self.transport.connect("consumer"), confirm=False)
        try:
            ch = link.main()
            ch.basic_qos(prefetch_count=self.prefetch, global_qos=self._global_qos)
            self._window = self.prefetch
            ch.add_on_cancel_callback(self._on_cancel)
            self._base = self._top
            self._tags.clear()
            self._queue_of.clear()
            self._link = link
            with self._lock:
                wanted = list(self._wanted)
            for q in wanted:
                self._consume(q)
        except pex.ChannelClosedByBroker as exc:
            self._link = None
            link.close()
            raise _channel_error(exc, f"consuming from {self._wanted}",
                                 self.transport.safe_url()) from None
        except pex.ConnectionClosedByBroker:
            self._link = None
            raise  # _connect() decides
        except LINK_ERRORS as exc:
            self._link = None
            link.close()
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self.transport.safe_url()} while "
                f"starting to consume ({_reason(exc)})") from None

    def _forget_deliveries(self) -> None:
        """The connection is gone: its deliveries, and settlements of them, are moot
        (the broker requeues whatever it had given us)."""
        self._buffer.clear()
        with self._lock:
            self._held.clear()
            self._acks.clear()
            self._nacks.clear()
            self._exempt.clear()

    def _lost(self, exc: BaseException) -> None:
        """The connection is gone: the broker requeues everything it had given us."""
        log.warning("consumer %s lost its RabbitMQ connection (%s); reconnecting",
                    self.id, _reason(exc))
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self._forget_deliveries()
        with self._lock:
            # queue changes are replayed from _wanted on reconnect
            self._qos_due = False
            self._ops.clear()

    def _consume(self, queue: str) -> None:
        link = self._link
        assert link is not None
        if self.reply:
            if queue not in link.queues:
                link.declare_reply_queue(queue)
                if self.binding is not None:
                    exchange, routing_key = self.binding
                    link.declare_exchange(exchange, "direct")
                    link.admin().queue_bind(queue, exchange, routing_key)
            # not remembered: queue_stats(None) lists work queues only
        else:
            if queue not in link.queues:
                link.declare_queue(queue, self.transport._queue_arguments())
            self.transport._remember(queue)
        tag = link.main().basic_consume(queue, self._on_message, auto_ack=False)
        self._tags[queue] = tag
        self._queue_of[tag] = queue

    def _add(self, queue: str) -> None:
        """Consume one more queue at run time (add_queue). If the broker refuses it (403
        on a reserved name, 405 exclusive to another connection, ...) only that queue is
        given up: the error closed the admin channel, not the one our reserved messages
        are on, so the others carry on."""
        try:
            self._consume(queue)
        except pex.ChannelClosedByBroker as exc:
            assert self._link is not None
            if not self._link.main_is_open():
                raise  # our reservations went with the channel: get() reconnects
            log.error("consumer %s cannot consume from queue %s: %s %s", self.id, queue,
                      exc.reply_code, exc.reply_text)
            with self._lock:
                if queue in self._wanted:
                    self._wanted.remove(queue)

    def _cancel(self, queue: str) -> None:
        link = self._link
        assert link is not None
        tag = self._tags.pop(queue, None)
        if tag is None:
            return
        self._queue_of.pop(tag, None)
        link.main().basic_cancel(tag)
        # messages of that queue not handed out yet go back now, for other workers
        keep: deque[tuple[int, str, bool, Any, bytes]] = deque()
        for item in self._buffer:
            if item[1] == queue:
                with self._lock:
                    self._held.pop(item[0], None)
                link.main().basic_nack(item[0] - self._base, requeue=True)
            else:
                keep.append(item)
        self._buffer = keep

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        tag = self._base + method.delivery_tag
        if tag > self._top:
            self._top = tag
        queue = self._queue_of.get(method.consumer_tag, method.routing_key)
        with self._lock:
            self._held[tag] = (queue, props)
        self._buffer.append((tag, queue, method.redelivered, props, body))

    def _on_cancel(self, frame: Any) -> None:
        """The broker cancelled a consumer (its queue was deleted): declare the queue
        again and resume on the next get(), as Celery workers do."""
        tag = frame.method.consumer_tag
        queue = self._queue_of.pop(tag, None)
        if queue is None:
            return
        self._tags.pop(queue, None)
        if self._link is not None:
            self._link.queues.discard(queue)
        log.warning("RabbitMQ cancelled the consumer of queue %s (deleted?); declaring "
                    "it again", queue)
        with self._lock:
            self._ops.append(("consume", queue))

    def _run_ops(self) -> bool:
        """Send the settlements made since the last call, then apply queue changes.
        Returns whether frames were written that still need a flush."""
        link = self._link
        assert link is not None
        with self._lock:
            acks, nacks = self._acks, self._nacks
            if not acks and not nacks and not self._ops and not self._qos_due:
                return False
            self._acks, self._nacks = [], []
            ops = list(self._ops)
            self._ops.clear()
            # the lowest tag the broker still holds for us and that we don't ack now
            floor = next(iter(self._held), self._top + 1)
            window = self.prefetch + len(self._exempt)
            self._qos_due = False
        base = self._base
        written = False
        if window != self._window:
            # before the settlements: a smaller window must reach the broker before the
            # ack that frees the slot (basic_qos waits for its qos-ok)
            link.main().basic_qos(prefetch_count=window, global_qos=True)
            self._window = window
        if acks or nacks:
            ch = link.main()._impl  # write without a flush each: one flush for the batch
            if nacks:
                floor = min(floor, min(nacks))
            top = 0
            for tag in acks:
                if tag <= base:
                    continue  # from a previous connection: already back in its queue
                if tag < floor:
                    if tag > top:
                        top = tag
                else:
                    ch.basic_ack(tag - base)
                    written = True
            if top:
                # every tag below floor is acked now or was settled before
                ch.basic_ack(top - base, multiple=True)
                written = True
            for tag in nacks:
                if tag > base:
                    ch.basic_nack(tag - base, requeue=True)
                    written = True
        for op, queue in ops:
            with self._lock:
                wanted = queue in self._wanted
            if op == "consume":
                if wanted and queue not in self._tags and not self._closed:
                    self._add(queue)
            elif not wanted:
                self._cancel(queue)
        return written

    def _submit(self, op: str, queue: str) -> None:
        with self._lock:
            self._ops.append((op, queue))
        self._wake()

    def _wake(self) -> None:
        """Wake the owner's pump (from another thread), so it runs the queued ops."""
        if threading.get_ident() == self._owner:
            return  # the next get() (or close()) on this thread runs them
        link = self._link
        if link is not None:
            try:
                link.conn.add_callback_threadsafe(_noop)
            except LINK_ERRORS:
                pass  # closed: the broker requeues everything anyway

    # -- Consumer API ----------------------------------------------------------------------
    def get(self, timeout: float) -> Delivery | None:
        self._owner = threading.get_ident()
        deadline = time.monotonic() + timeout
        while True:
            with self._io:
                if self._closed:
                    return None
                try:
                    link = self._link
                    if link is not None and not link.conn.is_open:
                        # closed under us (pika raises ValueError if pumped now)
                        self._lost(ConnectionError("connection closed"))
                        link = None
                    if link is None:
                        self._connect()
                        link = self._link
                        assert link is not None
                    if self._buffer and self._hand_out_now():
                        return self._delivery(self._buffer.popleft())
                    if self._run_ops() and self._buffer:
                        # send the settlements now, not when the buffer runs dry: they
                        # free prefetch slots (else the pump below flushes them)
                        link.conn.process_data_events(0)
                    if self._buffer and self._room():
                        return self._delivery(self._buffer.popleft())
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    with self._lock:
                        if self._acks or self._nacks or self._ops or self._qos_due:
                            continue  # came in since _run_ops: send them first
                        self._pumping = True
                        self._woken = False
                    try:
                        # flushes what _run_ops wrote, then waits for deliveries or a
                        # wake-up
                        link.conn.process_data_events(time_limit=min(left, PUMP_SLICE))
                    finally:
                        self._pumping = False
                except LINK_ERRORS as exc:
                    # reconnect on the next turn; if that fails, BrokerUnreachable goes up
                    self._lost(exc)
                    if time.monotonic() >= deadline:
                        return None

    def keepalive(self) -> None:
        """Pump the connection once (AMQP heartbeats, settlements) unless the owner has
        it; deliveries that arrive are buffered for the owner's next get()."""
        if not self._io.acquire(blocking=False):
            return
        try:
            link = self._link
            if self._closed or link is None or not link.conn.is_open:
                return
            try:
                self._run_ops()
                link.conn.process_data_events(0)
            except LINK_ERRORS as exc:
                self._lost(exc)  # get() reconnects
        finally:
            self._io.release()

    def _delivery(self, item: tuple[int, str, bool, Any, bytes]) -> Delivery:
        tag, queue, redelivered, props, body = item
        return Delivery(queue=queue, tag=tag, raw=body, message=_message(props, body),
                        redelivered=bool(redelivered))

    def _room(self) -> bool:
        """Fewer than ``prefetch`` deliveries handed out and not settled (exempt ones
        apart). The broker's window sees to it already; this is the guarantee."""
        with self._lock:
            return self._room_locked()

    def _room_locked(self) -> bool:
        return len(self._held) - len(self._buffer) - len(self._exempt) < self.prefetch

    def _hand_out_now(self) -> bool:
        """There is room, and what was settled or changed since the last write can wait
        for the next get() (fewer than ``ack_batch`` settlements, no queue or window
        change). One lock: this is asked for every delivery."""
        with self._lock:
            return (self._room_locked() and len(self._acks) + len(self._nacks) < self.ack_batch
                    and not self._ops and not self._qos_due)

    def held(self, queue: str) -> int:
        with self._lock:
            return sum(1 for q, _ in self._held.values() if q == queue)

    def _settle(self, delivery: Delivery, acked: bool) -> None:
        with self._lock:
            if self._held.pop(delivery.tag, None) is None:
                return  # settled already, or from a lost connection: acking twice would
                # be a channel error that drops every other reserved message
            (self._acks if acked else self._nacks).append(delivery.tag)
            if self._exempt and delivery.tag in self._exempt:
                self._exempt.discard(delivery.tag)
                self._qos_due = True
            if not self._pumping or self._woken:
                return  # the owner takes it before it blocks, or is being woken already
            self._woken = True
        self._wake()

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, True)

    def exempt(self, delivery: Delivery) -> None:
        if not self._global_qos:
            raise NotImplementedError(
                "RabbitMQ can't grow a per-consumer prefetch (quorum queue): the held "
                "delivery keeps its prefetch slot")
        with self._lock:
            if delivery.tag not in self._held or delivery.tag in self._exempt:
                return  # settled already, or from a lost connection
            self._exempt.add(delivery.tag)
            self._qos_due = True
            if not self._pumping or self._woken:
                return
            self._woken = True
        self._wake()

    def stale(self, delivery: Delivery) -> bool:
        # tags of the current channel are above _base (see the class doc)
        return delivery.tag <= self._base

    def requeue(self, delivery: Delivery) -> None:
        # basic.nack(requeue) puts it back at (or near) the head of its queue
        self._settle(delivery, False)

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter with the original headers and properties (a plain
        Transport.dead_letter only gets the body), then ack. If the DLQ publish fails
        the message stays reserved, so it is never lost."""
        with self._lock:
            entry = self._held.get(delivery.tag)
        if entry is None:
            return
        self.transport._dead_letter(delivery.queue, delivery.raw, reason, entry[1])
        self.ack(delivery)

    def heartbeat(self) -> None:
        """Nothing to do: the broker watches the connection (AMQP heartbeats, sent while
        get() pumps it; the worker calls get() all the time)."""

    def add_queue(self, queue: str) -> None:
        if self.reply:
            raise UsageError(REPLY_ONLY)
        with self._lock:
            if queue in self._wanted:
                return
            self._wanted.append(queue)
        self._submit("consume", queue)

    def cancel_queue(self, queue: str) -> None:
        if self.reply:
            raise UsageError(REPLY_ONLY)
        with self._lock:
            if queue not in self._wanted:
                return
            self._wanted.remove(queue)
        self._submit("cancel", queue)

    @property
    def queues(self) -> list[str]:
        with self._lock:
            return list(self._wanted)

    def close(self) -> None:
        """Send the acks still queued, then close the connection: RabbitMQ puts every
        message still reserved back in its queue."""
        with self._io:
            if self._closed:
                return
            self._closed = True
            link, self._link = self._link, None
            if link is not None:
                try:
                    self._link = link
                    if link.conn.is_open and self._run_ops():
                        link.conn.process_data_events(0)  # flush the last settlements
                except LINK_ERRORS:
                    pass
                finally:
                    self._link = None
                    link.close()
            self._forget_deliveries()
        with self.transport._lock:
            self.transport._consumers.discard(self)


# -- subscription --------------------------------------------------------------------------------


class _AMQPSubscription(Subscription):
    """A server-named, exclusive, auto-delete queue bound to the channel's exchange, on
    a connection of its own: the fanout exchange without a pattern, else the topic
    exchange with the pattern as binding key. It is bound when the constructor
    returns, so nothing broadcast after subscribe() is missed. If the connection drops,
    get() makes a new queue (what was broadcast in between is lost: broadcasts are not
    stored)."""

    transport: AMQPTransport

    def __init__(self, transport: AMQPTransport, channel: str,
                 pattern: str | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.pattern = pattern
        self._buffer: deque[Message] = deque()
        self._io = threading.Lock()  # get() pumps in slices under it; close() takes it
        self._closed = False
        self._link: _Link | None = None
        self._connect()

    def _connect(self) -> None:
        link = _Link(self.transport.connect("subscriber"), confirm=False)
        try:
            link.declare_exchange(self.channel, "fanout" if self.pattern is None else "topic")
            ch = link.main()
            ok = ch.queue_declare("", exclusive=True, auto_delete=True,
                                  arguments=SUBSCRIPTION_ARGS)
            queue = ok.method.queue
            ch.queue_bind(queue, self.channel, self.pattern or "")
            # auto_ack: a broadcast lost with a dying subscriber is not worth redelivering
            ch.basic_consume(queue, self._on_message, auto_ack=True)
        except LINK_ERRORS as exc:
            link.close()
            if isinstance(exc, pex.ChannelClosedByBroker):
                raise _channel_error(exc, f"subscribing to {self.channel!r}",
                                     self.transport.safe_url()) from None
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self.transport.safe_url()} while "
                f"subscribing to {self.channel!r} ({_reason(exc)})") from None
        self._link = link

    def _on_message(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        self._buffer.append(_message(props, body))

    def get(self, timeout: float) -> Message | None:
        deadline = time.monotonic() + timeout
        while True:
            with self._io:
                if self._closed:
                    return None
                if self._buffer:
                    return self._buffer.popleft()
                left = deadline - time.monotonic()
                try:
                    if self._link is not None and not self._link.conn.is_open:
                        raise ConnectionError("connection closed")
                    if self._link is None:
                        self._connect()
                        continue
                    if left <= 0:
                        return None
                    self._link.conn.process_data_events(time_limit=min(left, PUMP_SLICE))
                except LINK_ERRORS as exc:
                    log.warning("subscription to %s lost its RabbitMQ connection (%s); "
                                "resubscribing", self.channel, _reason(exc))
                    link, self._link = self._link, None
                    if link is not None:
                        link.close()
                    if left <= 0:
                        return None

    def close(self) -> None:
        with self._io:
            self._closed = True
            link, self._link = self._link, None
            if link is not None:
                link.close()
            self._buffer.clear()


# -- the live-node registry --------------------------------------------------------------


class _Presence:
    """This process's consumers on the presence queue, one per registered node name, on
    a connection of their own (a consumer lives as long as its connection: when the
    process dies the kernel closes the socket and RabbitMQ drops the consumers at
    once). Used from any thread, one at a time (``_lock``); pumped by ``register()``,
    which the worker calls every heartbeat interval."""

    def __init__(self, transport: AMQPTransport) -> None:
        self.transport = transport
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._names: list[str] = []  # registered, in order
        self._tags: dict[str, str] = {}  # name -> consumer tag on the current link

    def register(self, name: str) -> None:
        with self._lock:
            if name not in self._names:
                self._names.append(name)
            try:
                self._sync()
            except LINK_ERRORS as exc:
                self._drop()
                if isinstance(exc, pex.ChannelClosedByBroker):
                    raise _channel_error(exc, f"registering node {name!r}",
                                         self.transport.safe_url()) from None
                raise BrokerUnreachable(
                    f"lost the connection to RabbitMQ at {self.transport.safe_url()} while "
                    f"registering node {name!r} ({_reason(exc)})") from None

    def _sync(self) -> None:
        link = self._link
        if link is not None and (link.pid != os.getpid() or not link.conn.is_open):
            self._drop()  # lost (or the parent's, after a fork): start again
            link = None
        if link is None:
            link = _Link(self.transport.connect("presence"), confirm=False)
            self._link = link
            self._tags.clear()
            _declare_presence_queue(link)
        for name in self._names:
            if name not in self._tags:
                self._tags[name] = link.main().basic_consume(
                    PRESENCE_QUEUE, _ignore_message, auto_ack=True)
        # sends the AMQP heartbeats and notices a dropped connection
        link.conn.process_data_events(0)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name in self._names:
                self._names.remove(name)
            tag = self._tags.pop(name, None)
            link = self._link
            if link is None:
                return
            if not self._names:
                self._drop()  # the consumers go with the connection
            elif tag is not None:
                try:
                    link.main().basic_cancel(tag)
                except LINK_ERRORS:
                    self._drop()  # the next register() reconnects without this name

    def _drop(self) -> None:
        link, self._link = self._link, None
        self._tags.clear()
        if link is not None:
            link.close()

    def close(self) -> None:
        with self._lock:
            self._names.clear()
            self._drop()


def _declare_presence_queue(link: _Link) -> None:
    try:
        link.admin().queue_declare(PRESENCE_QUEUE, durable=False, auto_delete=False,
                                   arguments=PRESENCE_ARGS)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        link.admin().queue_declare(PRESENCE_QUEUE, passive=True)
    link.queues.add(PRESENCE_QUEUE)


def _ignore_message(*_args: Any) -> None:
    """Nothing is published to the presence queue; anything that is, is dropped."""
