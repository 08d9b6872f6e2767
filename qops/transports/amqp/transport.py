"""``AMQPTransport``: the Transport interface on RabbitMQ.

It holds publishing (``_send``: one connection per thread, publisher confirms,
redeclare-and-resend of a message the broker returned) and the admin calls (purge,
queue stats) on that connection (``_admin``). Consumers, subscriptions, dead letters,
the live-node registry and locks live in their own modules and it delegates to them.
The wire layout and the threading rules are in the package docstring (``__init__``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pika.exceptions as pex

from qops.errors import BrokerUnreachable, ConfigError, PublishError, PublishManyError
from qops.protocol import Message
from qops.transports.amqp import deadletters, template
from qops.transports.amqp.consumer import _AMQPConsumer
from qops.transports.amqp.link import (
    LINK_ERRORS,
    NOT_FOUND,
    RESOURCE_LOCKED,
    _channel_error,
    _Link,
    lost_text,
    open_connection,
)
from qops.transports.amqp.locks import _Locks
from qops.transports.amqp.presence import _Presence
from qops.transports.amqp.props import _basic_properties
from qops.transports.amqp.subscription import _AMQPSubscription
from qops.transports.amqp.url import parse_urls
from qops.transports.base import (
    REPLY_PREFETCH,
    Consumer,
    DeadLetter,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
)
from qops.transports.failover import NodeOrder

log = logging.getLogger(__name__)

T = TypeVar("T")


class AMQPTransport(Transport):
    scheme = "amqp"
    consume_in_pool_children = True

    @classmethod
    def check_url(cls, url: str) -> None:
        parse_urls(url)

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        #: the nodes of the URL list (one for a plain URL); params: the first one
        self.nodes = parse_urls(url)
        self.params = self.nodes[0]
        self._order = NodeOrder(len(self.nodes), self.options.failover_strategy)
        self.dead_letter_queue = self.params.dead_letter_queue
        self.hold_limit = _hold_limit(self.options.extra)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._links: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._consumers: weakref.WeakSet[_AMQPConsumer] = weakref.WeakSet()
        self._known: set[str] = set()  # queues this transport declared or consumed
        #: a task priority would be ignored by the queues we declare (told once)
        self._priority_unused = self.options.declarations.max_priority is None
        self._presence = _Presence(self)
        self._locks = _Locks(self)

    # -- connections ---------------------------------------------------------------------
    def connect(self, purpose: str) -> Any:
        """A new BlockingConnection, or BrokerUnreachable saying what to fix."""
        return open_connection(self.nodes, self._order, self.options, self.safe_url(),
                               purpose)

    def _link(self) -> tuple[_Link, bool]:
        """This thread's connection, and whether it was already open (i.e. it may have
        died while idle, so a failure on it is worth one retry on a new one)."""
        link: _Link | None = getattr(self._local, "link", None)
        if link is not None:
            if link.usable():
                return link, True
            link.close()
        self._local.link = None
        link = _Link(self.connect("publisher"))
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
                    raise BrokerUnreachable(lost_text(self.safe_url(), what, exc)) from None
        raise AssertionError("unreachable")

    def declare(self, link: _Link, queue: str) -> None:
        """Declare ``queue`` on ``link`` (docs/protocol.md §3.1): a work queue as the
        app's declarations say; the dead-letter queue without arguments (no
        x-max-priority: it keeps arrival order for listing) and unbound."""
        if queue == self.dead_letter_queue:
            link.declare_queue(queue, None)
        else:
            link.declare_work_queue(self.options.declarations.shape(queue))

    def _remember(self, queue: str) -> None:
        with self._lock:
            self._known.add(queue)

    def declare_consumed(self, link: _Link, queue: str, reply: bool,
                         binding: tuple[str, str] | None) -> None:
        """Make ``queue`` ready to consume on ``link`` (once a connection): a work queue
        declared and remembered for ``queue_stats(None)``; a reply queue declared on this
        connection (the broker deletes it with the connection), not remembered, and bound
        to ``binding`` (exchange, routing key) if given, as kombu binds a pidbox reply
        queue."""
        if not reply:
            if queue not in link.queues:
                self.declare(link, queue)
            self._remember(queue)
        elif queue not in link.queues:
            link.declare_reply_queue(queue)
            if binding is not None:
                exchange, routing_key = binding
                link.declare_exchange(exchange, "direct")
                link.admin().queue_bind(queue, exchange, routing_key)

    # -- publishing ------------------------------------------------------------------------
    def _send(self, exchange: str, routing_key: str, body: bytes, props: Any, *,
              queue: str | None, exchange_kind: str | None = None, confirm: bool = True,
              size_limit: bool = True) -> None:
        """Publish on this thread's connection, declaring work queue ``queue`` (or
        ``exchange``, of ``exchange_kind``) first.

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
        redeclared = renacked = False
        attempt = 0
        while True:
            attempt += 1
            link, reused = self._link()
            try:
                if queue is not None and queue not in link.queues:
                    self.declare(link, queue)
                    self._remember(queue)
                if exchange_kind is not None:
                    link.declare_exchange(exchange, exchange_kind)
                if confirm:
                    link.confirms().publish((exchange, routing_key, body,
                                             _encoded(props), mandatory, None))
                else:
                    link.events().basic_publish(exchange, routing_key, body, props)
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
                # Not taken (so sending again duplicates nothing). A channel that was
                # publishing to a quorum queue while its leader was being elected (a
                # node of the cluster died) may go on nacking every message: try once
                # more on a new connection before giving up.
                self._drop_link(link)
                if not renacked:
                    renacked = True
                    continue
                raise PublishError(
                    f"RabbitMQ refused the message for {routing_key or exchange!r} (nack: "
                    "queue full with overflow=reject-publish, a quorum queue without a "
                    "leader, or an internal error)") from None
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
                    lost_text(self.safe_url(), f"publishing to {routing_key or exchange!r}",
                              exc) + "; the message may not have been delivered") from None

    def publish(self, queue: str, message: Message) -> None:
        self._check_priority(queue, message)
        self._send("", queue, message.body, self._properties(message, 2), queue=queue)

    def _check_priority(self, queue: str, message: Message) -> None:
        """Once per transport: a message has a priority, and the queues are declared
        without ``x-max-priority`` (RabbitMQ then ignores it)."""
        if not (self._priority_unused and "priority" in message.properties):
            return
        self._priority_unused = False
        log.warning("A task for %r has a priority, but qops declares RabbitMQ queues "
                    "without x-max-priority unless task_queue_max_priority is set (e.g. 9); "
                    "on such a queue RabbitMQ ignores priorities", queue)

    def publish_many(self, items: Sequence[tuple[str, Message]]) -> None:
        """All of ``items`` written on the confirm channel, then their confirms
        collected (``Confirms.publish_many``). As for one message: the queues are
        declared first (once per connection); messages the broker returned because their
        queue vanished are sent again after a new declare; a connection that turns out
        dead before anything was confirmed is replaced and the batch sent once more.
        Nacked messages are not sent again. PublishManyError names the rest."""
        n = len(items)
        if not self.options.confirm_publish:
            super().publish_many(items)
            return
        batch = []
        for index, (queue, message) in enumerate(items):
            self._check_priority(queue, message)
            try:
                self.check_size(repr(queue), message.body)
                batch.append(("", queue, message.body, template.properties(message, 2), True,
                              message.properties.get("correlation_id")))
            except PublishError as exc:
                raise PublishManyError(f"{exc} (message {index} of {n}; none was sent)",
                                       list(range(n))) from None
        todo = list(range(n))  # indexes (into items) to send
        failed: dict[int, str] = {}  # index -> why it is not confirmed
        redeclared = resent = False
        while todo:
            try:
                link, reused = self._link()
            except BrokerUnreachable as exc:
                failed.update(dict.fromkeys(todo, str(exc)))
                break
            try:
                for queue in dict.fromkeys(batch[i][1] for i in todo):
                    if queue not in link.queues:
                        self.declare(link, queue)
                        self._remember(queue)
                out = link.confirms().publish_many([batch[i] for i in todo])
            except pex.ChannelClosedByBroker as exc:  # a declare refused
                failed.update(dict.fromkeys(todo, str(_channel_error(
                    exc, "declaring a queue", self.safe_url(), PublishError))))
                break
            except LINK_ERRORS as exc:
                self._drop_link(link)
                if reused and not resent:
                    resent = True
                    continue
                failed.update(dict.fromkeys(todo, lost_text(
                    self.safe_url(), "publishing a batch", exc)))
                break
            link.used = time.monotonic()
            for i in out.nacked:
                failed[todo[i]] = "nacked by RabbitMQ (queue full with " \
                                  "overflow=reject-publish, or an internal error)"
            lost = [todo[i] for i in out.lost]
            if out.error is not None:
                if not isinstance(out.error, pex.ChannelClosedByBroker):
                    self._drop_link(link)
                why = (str(_channel_error(out.error, "publishing a batch", self.safe_url()))
                       if isinstance(out.error, pex.ChannelClosedByBroker) else
                       lost_text(self.safe_url(), "publishing a batch", out.error))
                if reused and not resent and len(lost) == len(todo):
                    lost_again = lost  # died while idle: nothing confirmed, send again
                    resent = True
                else:
                    failed.update(dict.fromkeys(lost, why))
                    lost_again = []
            else:
                lost_again = []
            returned = [todo[i] for i in out.returned]
            if returned and not redeclared:  # the queue vanished since we declared it
                redeclared = True
                link.queues.difference_update(batch[i][1] for i in returned)
            else:
                failed.update(dict.fromkeys(returned, "returned as unroutable (its queue "
                                            "does not exist)"))
                returned = []
            todo = sorted(lost_again + returned)
        if failed:
            bad = sorted(failed)
            reasons = "; ".join(dict.fromkeys(failed[i] for i in bad))
            raise PublishManyError(
                f"RabbitMQ did not confirm {len(bad)} of {n} messages ({reasons}); the "
                f"other {n - len(bad)} were confirmed; may not have been delivered: "
                f"{_indexes(bad)}", bad)

    def _properties(self, message: Message, delivery_mode: int) -> Any:
        """``message``'s properties for ``_send``: encoded here when they go on the
        confirm channel, as pika's BasicProperties for pika's unconfirmed one."""
        if self.options.confirm_publish:
            return template.properties(message, delivery_mode)
        return _basic_properties(message, delivery_mode)

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
        # transient (the queue is), not declared, not mandatory: see the package doc
        self._send("", name, message.body, self._properties(message, 1), queue=None)

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

    def subscribe(self, channel: str, *, pattern: str | None = None,
                  lag: float = 0.0) -> Subscription:
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
        return self._presence.count()

    # -- dead letters (see ``deadletters``) ----------------------------------------------------
    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None:
        deadletters.dead_letter(self, queue, raw, reason, None)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return deadletters.list_dead_letters(self, limit)

    def dead_letter_count(self) -> int:
        return deadletters.dead_letter_count(self)

    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        return deadletters.requeue_dead_letters(self, ids)

    def purge_dead_letters(self) -> int:
        return deadletters.purge_dead_letters(self)

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
        self._locks.close()
        self._presence.close()

    # -- locks (one beat per schedule) ------------------------------------------------------
    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """See ``locks``: an exclusive queue on a connection the holder keeps open.
        ``ttl`` is not needed."""
        return self._locks.acquire(name, owner)

    def release_lock(self, name: str, owner: str) -> None:
        self._locks.release(name, owner)


def _encoded(props: Any) -> bytes:
    """A content header's property list: as given, or encoded by pika's BasicProperties."""
    return props if isinstance(props, bytes) else b"".join(props.encode())


def _indexes(indexes: list[int], shown: int = 10) -> str:
    """``indexes`` for a message: the first few, and how many more."""
    text = ", ".join(map(str, indexes[:shown]))
    return f"messages {text}" + (f" and {len(indexes) - shown} more"
                                  if len(indexes) > shown else "")


#: RabbitMQ's default consumer_timeout (seconds)
CONSUMER_TIMEOUT = 1800.0


def _hold_limit(options: dict[str, Any]) -> float | None:
    """How long a consumer holds a message for its ETA before it gives it back: half the
    broker's ``consumer_timeout`` (``broker_transport_options``, seconds, RabbitMQ's
    default 1800; 0 for a broker that has none)."""
    value = options.get("consumer_timeout", CONSUMER_TIMEOUT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ConfigError("setting 'broker_transport_options': consumer_timeout must be "
                          f"a number of seconds >= 0 (0: the broker has none), not {value!r}")
    return value / 2 if value else None
