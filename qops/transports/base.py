"""The transport interface: everything qops sends between processes goes through it.

A transport speaks qops's own terms, not AMQP's:

- **queues**: ``publish`` a message to a named queue; a ``Consumer`` reserves messages
  from one or more queues (at most ``prefetch`` unacknowledged at a time) and then
  ``ack``s, ``requeue``s or ``reject``s (dead-letters) each one. A reserved message that
  is never acked goes back to its queue only when its consumer is dead (connection
  dropped on RabbitMQ; heartbeat expired on Redis and SQLite) -- never while it lives.
- **fanout**: ``broadcast`` a message on a channel to every current ``subscribe``r
  (remote control, events). Nothing is stored for subscribers that are not listening.
- **dead letters**: messages that can't be run (bad JSON, unknown task, ...) are kept,
  with their reason, in a store that can be listed, requeued and purged.
- **reply queues**: a process that expects answers (``rpc://`` results, remote-control
  replies) opens a ``reply_consumer`` on a temporary queue of its own; others
  ``send_reply`` to it by name. A reply queue lives only as long as its consumer (it
  vanishes when the consumer closes or its process dies), is never listed by
  ``queue_stats(None)``, and a reply sent to a queue that is gone is dropped, not an
  error: nobody is waiting for it any more.

Thread rules: a ``Transport`` may be shared by threads. ``Consumer.get`` is called from
one thread only (the consumer loop); ``ack``/``requeue``/``reject``/``heartbeat`` may be
called from any thread. ``Subscription.get`` is called from one thread.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qops.compression import MAX_DECOMPRESSED, decompress
from qops.errors import BrokerUnreachable, PublishError, PublishManyError, UsageError
from qops.protocol import Message, decode_envelope
from qops.transports.declare import Declarations
from qops.transports.urls import mask_password, url_scheme


@dataclass
class Delivery:
    """A reserved message. ``message`` is None when the raw bytes could not be decoded;
    ``error`` then says why, and the consumer loop dead-letters ``raw``."""

    queue: str
    tag: Any
    raw: bytes
    message: Message | None = None
    error: str | None = None
    redelivered: bool = False


#: longest ``Delivery.error`` kept: an exception's text can quote the whole message
MAX_REASON = 500


def one_line(exc: BaseException) -> str:
    """``exc``'s text on one line (its class name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def make_delivery(queue: str, tag: Any, raw: bytes, decode: Callable[[bytes], Message],
                  redelivered: bool = False, limit: int = MAX_DECOMPRESSED) -> Delivery:
    """The one place where a consumer turns what it reserved into a ``Delivery``.

    ``decode`` is the transport's (the kombu envelope on Redis, SQLite and memory; the
    AMQP properties on RabbitMQ). A compressed body (kombu's ``compression`` header) is
    decompressed here, to at most ``limit`` bytes (the transport's max_message_size).
    Whatever either raises -- not only ValueError: a RecursionError on absurdly nested
    JSON, a TypeError on a field of the wrong type -- the delivery comes back with
    ``error`` set to a one-line reason and no ``message``, and the worker dead-letters
    it: a message that can't be decoded must never stay reserved nor stop the consumer.
    ``raw`` stays what the broker gave (dead letters keep it as it was)."""
    d = Delivery(queue=queue, tag=tag, raw=raw, redelivered=redelivered)
    try:
        d.message = decompress(decode(raw), limit)
    except Exception as exc:
        reason = one_line(exc)
        if not isinstance(exc, ValueError):  # the decoders' own reasons are ValueErrors
            reason = f"undecodable message ({type(exc).__name__}): {reason}"
        d.error = reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."
    return d


@dataclass
class QueueStats:
    name: str
    ready: int
    in_flight: int
    consumers: int


@dataclass
class DeadLetter:
    id: str
    queue: str
    reason: str
    raw: bytes
    time: float
    #: the task's name and id where the transport read them with the message (AMQP's
    #: headers); else ``names()`` reads them from ``raw``
    task: str = ""
    task_id: str = ""

    def names(self) -> tuple[str, str]:
        """(task name, task id) of the message, "" where it has none: read from the
        kombu envelope (Redis, SQLite) only when asked (a listing; a requeue of
        thousands does without)."""
        if self.task or self.task_id or self.raw[:1] != b"{":
            return self.task, self.task_id
        try:
            headers = decode_envelope(self.raw).headers
        except ValueError:
            return "", ""
        return str(headers.get("task") or ""), str(headers.get("id") or "")

    def as_dict(self) -> dict[str, Any]:
        text = self.raw.decode("utf-8", "replace")
        task, task_id = self.names()
        return {"id": self.id, "queue": self.queue, "task": task, "task_id": task_id,
                "reason": self.reason, "time": self.time, "size": len(self.raw),
                "preview": text[:200]}


@dataclass
class TransportOptions:
    """Tunables shared by the transports (filled from settings)."""

    heartbeat_interval: float = 2.0  # how often a consumer proves it is alive
    heartbeat_ttl: float = 10.0  # dead after this long without a heartbeat
    max_message_size: int = 16 * 1024 * 1024
    #: the live-node registry: one per preset, so that each lists the nodes answering
    #: on its own mailbox (docs/protocol.md)
    registry: str = "qops.nodes"
    #: how work queues are declared on RabbitMQ (type, arguments, exchange, binding)
    declarations: Declarations = field(default_factory=Declarations)
    connect_timeout: float = 5.0
    confirm_publish: bool = True
    #: a broker URL list (a cluster): the order its nodes are tried in (failover.py)
    failover_strategy: str = "round-robin"
    #: ``broker_transport_options`` as given (each transport reads its own keys: Redis
    #: ``master_name``, ``sentinel_kwargs``, ``wait_replicas``, ...)
    extra: dict[str, Any] = field(default_factory=dict)


#: prefetch of a reply consumer: replies are small and only ever go to their one reader,
#: so there is no other consumer to share them with
REPLY_PREFETCH = 1000
#: seconds a reply (Redis) or an idle reply queue seen from another host (SQLite) is
#: kept without a sign of life from its consumer; AMQP's x-message-ttl 300000
#: (docs/protocol.md §3.1) is the same bound
REPLY_TTL = 300


class Consumer(ABC):
    """Reserves messages from queues for one worker (see module doc for thread rules)."""

    #: unique id of this consumer, used for in-flight tracking and liveness
    id: str
    #: settlements a consumer may hold back, to send them together, while it has
    #: deliveries to hand out, while its caller has other work (``get(0)``) and, for
    #: settlements from other threads, while get() waits and other deliveries are held
    #: (a wait of a pump slice at most): transports that batch writes (AMQP); 1 = at
    #: the next get()
    ack_batch: int = 1
    #: seconds a delivery may stay unsettled before the broker takes it back (RabbitMQ's
    #: consumer_timeout): a message held longer for its ETA is given back (renew) and
    #: held again when it comes back. None: as long as the consumer lives
    hold_limit: float | None = None
    #: the worker's pool runs tasks on threads of this process and settles them there
    #: (solo, threads pools): a settlement that frees the room get() waits for to
    #: reserve may hand get() the GIL at once (Redis; not worth it for prefork's slots)
    pool_threads: bool = False

    @abstractmethod
    def get(self, timeout: float) -> Delivery | None:
        """Wait up to ``timeout`` seconds for the next message; None when there is none.

        Never returns more than ``prefetch`` deliveries that are not yet
        acked/requeued/rejected: past that it waits (and returns None on timeout)."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The message is done: remove it for good."""

    @abstractmethod
    def requeue(self, delivery: Delivery) -> None:
        """Put the message back at the head of its queue, at once (RabbitMQ: at or
        near the head, as it documents)."""

    def exempt(self, delivery: Delivery) -> None:
        """Stop counting ``delivery`` against the prefetch until it is settled.

        The worker holds ETA/countdown messages this way (still reserved, so not lost
        and not run by anyone else): however many it holds, it keeps taking new work."""
        raise NotImplementedError(f"{type(self).__name__} cannot exempt deliveries")

    def stale(self, delivery: Delivery) -> bool:
        """True when the broker has taken ``delivery`` back and will deliver it again:
        RabbitMQ does when the connection it came on is gone; Redis and SQLite when
        another node took this consumer for dead (no heartbeat for the TTL: a paused
        process, see qops/transports/lease.py). The worker must not also run this
        copy, and settling it does nothing. Call it just before starting a task: it
        may ask the broker first, after a pause."""
        return False

    def buffered(self) -> list[Delivery]:
        """Copies of the messages received from the broker and not handed out yet (a
        client-side read-ahead: RabbitMQ's prefetch window), for remote control to
        list as reserved. Never settle them: get() hands them out. [] where nothing is
        received ahead of get()."""
        return []

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter the message with ``reason`` and remove it from the queue."""
        self.transport.dead_letter(delivery.queue, delivery.raw, reason)
        self.ack(delivery)

    # -- worker-lost accounting (the rule per transport: docs/guarantees.md) -----------
    def mark_started(self, delivery: Delivery) -> None:
        """The task of ``delivery`` (an acks_late one) starts now: record it with the
        broker, so that if its process dies before the message is settled, the next
        delivery of the message counts one worker loss (``worker_lost``). No-op where the
        broker keeps no such record (RabbitMQ: there a redelivery itself counts)."""
        return None

    def worker_lost(self, delivery: Delivery, died: bool = False) -> tuple[int, bool]:
        """How many times a worker died running this message, and whether this call
        counted a new death: the last start of the message never ended in a settlement
        (its process or its whole node died), or ``died`` (the caller saw the process
        running ``delivery`` die). Asked only of redelivered deliveries and after a seen
        death, never on the hot path. The count goes with the message: an ack or a
        reject ends it; a requeue keeps it."""
        return (1, True) if died else (0, False)

    def after_lost(self, delivery: Delivery, count: int) -> bool:
        """``delivery`` may run again after its ``count``-th worker loss: make the count
        last. True: run (or requeue) ``delivery`` as it is, the broker keeps the count;
        False: the transport settled it and put a copy carrying the count on its queue
        (RabbitMQ classic queues)."""
        return True

    @abstractmethod
    def heartbeat(self) -> None:
        """Prove this consumer is alive (no-op where the broker tracks connections)."""

    def keepalive(self) -> None:
        """Called from another thread while the owner is busy running a task and not in
        ``get()``: keep the connection alive if the broker would otherwise drop it.
        Returns at once if the owner is using the connection."""
        return None  # most brokers need nothing: liveness is heartbeat()'s job

    @abstractmethod
    def add_queue(self, queue: str) -> None:
        """Start consuming from another queue."""

    @abstractmethod
    def cancel_queue(self, queue: str) -> None:
        """Stop consuming from a queue (reserved messages stay reserved)."""

    @property
    @abstractmethod
    def queues(self) -> list[str]: ...

    @abstractmethod
    def close(self) -> None:
        """Stop consuming; every message still reserved goes back to its queue at once."""

    def renew(self, delivery: Delivery) -> None:
        """Give back a message held for its ETA before ``hold_limit`` runs out, so that
        it comes back as a new delivery (transports with a ``hold_limit``)."""
        raise NotImplementedError(f"{type(self).__name__} holds deliveries for good")

    def give_back(self, unstarted: list[Delivery]) -> None:
        """Close on purpose (a warm shutdown, a pool child's recycling), giving back the
        messages handed out that never started and every one still reserved. Here:
        ``requeue`` each, then ``close``; RabbitMQ's does more (its consumer)."""
        for d in unstarted:
            self.requeue(d)
        self.close()

    transport: Transport


REPLY_ONLY = "a reply consumer reads its reply queue only"


class ReplyOnly:
    """Mixin for reply consumers: they read their one reply queue and nothing else."""

    def add_queue(self, queue: str) -> None:
        raise UsageError(REPLY_ONLY)

    def cancel_queue(self, queue: str) -> None:
        raise UsageError(REPLY_ONLY)


class Subscription(ABC):
    @abstractmethod
    def get(self, timeout: float) -> Message | None:
        """Next broadcast message, or None after ``timeout`` seconds."""

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    """One broker connection factory. Subclasses implement the abstract methods."""

    scheme: str = ""
    #: with the prefork pool, each pool child consumes for itself on its own connection
    #: (qops/worker/children.py) instead of the worker's main process dispatching to
    #: them: worth it where one connection per process is cheap and the broker tracks
    #: what each connection holds (AMQP)
    consume_in_pool_children = False

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        self.url = url
        self.options = options or TransportOptions()

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise a one-line UsageError, naming the expected form, when ``url`` is not a
        valid URL for this transport. Called by ``transport_class`` before anything is
        opened: it reads no file and opens no socket. Default: any URL of the scheme."""
        return None

    # -- queues -------------------------------------------------------------------
    @abstractmethod
    def publish(self, queue: str, message: Message) -> None:
        """Put ``message`` on ``queue`` (declaring it if needed). Raises PublishError or
        BrokerUnreachable when the broker did not take it: never drops silently."""

    def publish_many(self, items: Sequence[tuple[str, Message]]) -> None:
        """Put each ``(queue, message)`` of ``items`` on its queue, in order, and
        return once the broker has taken all of them (Redis: pipelined; AMQP: written
        together, then the confirms collected; SQLite: one transaction). Raises
        PublishManyError naming the indexes the broker did not take (``unconfirmed``);
        every other message was taken. This default publishes one at a time."""
        for index, (queue, message) in enumerate(items):
            try:
                self.publish(queue, message)
            except (PublishError, BrokerUnreachable) as exc:
                raise PublishManyError(f"{exc} (message {index} of {len(items)}; "
                                       f"it and the {len(items) - index - 1} after it "
                                       "were not sent)",
                                       list(range(index, len(items)))) from None

    @abstractmethod
    def consumer(self, queues: Sequence[str], prefetch: int,
                 consumer_id: str | None = None) -> Consumer:
        """A new consumer reserving from ``queues`` (in order of preference)."""

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue``; return how many. In-flight ones stay."""

    @abstractmethod
    def queue_stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Stats for ``queues``, or for every queue the broker knows (this namespace)."""

    @abstractmethod
    def queue_exists(self, queue: str) -> bool: ...

    def recover(self) -> int:
        """Put back the messages held by dead consumers; return how many.

        Called periodically by live workers. No-op where the broker does it itself."""
        return 0

    # -- reply queues ---------------------------------------------------------------
    @abstractmethod
    def reply_consumer(self, name: str, *, exchange: str | None = None,
                       routing_key: str | None = None) -> Consumer:
        """Declare the temporary queue ``name`` for this process's replies and return a
        consumer on it (prefetch ``REPLY_PREFETCH``; ack/requeue/reject as usual).

        The queue goes away when the consumer is closed, and on its own when the process
        dies (AMQP: exclusive, auto-delete queue; Redis: the list expires; SQLite:
        ``recover()`` removes it). It is not listed by ``queue_stats(None)``. A reply
        consumer reads its reply queue only: ``add_queue``/``cancel_queue`` raise
        UsageError.

        With ``exchange`` and ``routing_key`` the queue is also bound the way kombu binds
        a pidbox reply queue, so a Celery node replying through ``exchange`` with
        ``routing_key`` reaches it: on Redis ``SADD _kombu.binding.<exchange>
        "<routing_key>\x06\x16\x06\x16<name>"`` (removed again by close()); on AMQP
        the direct exchange is declared (not durable, as kombu's ``reply.<mailbox>``)
        and the queue bound to it. SQLite and memory have no Celery peers: ignored."""

    @abstractmethod
    def send_reply(self, name: str, message: Message) -> None:
        """Send ``message`` to the reply queue ``name`` without declaring it. If the
        queue is gone (its process ended) the reply is dropped without an error; raises
        PublishError/BrokerUnreachable only when the broker itself failed."""

    # -- fanout -------------------------------------------------------------------
    @abstractmethod
    def broadcast(self, channel: str, message: Message, *,
                  routing_key: str | None = None) -> None:
        """Send ``message`` to every current subscriber of ``channel``.

        Without ``routing_key`` the channel is a fanout (remote control: AMQP fanout
        exchange, Redis ``PUBLISH /<db>.<channel>``). With one it is an event stream
        (AMQP topic exchange ``channel``, durable as Celery's ``celeryev``; Redis
        ``PUBLISH /<db>.<channel>/<routing_key>``) and subscribers filter by pattern."""

    @abstractmethod
    def subscribe(self, channel: str, *, pattern: str | None = None,
                  lag: float = 0.0) -> Subscription:
        """Subscribe to ``channel``; with ``pattern`` (topic syntax: ``#`` any words,
        ``*`` one word, e.g. ``task.#``) to the routing keys that match it. Messages
        broadcast before subscribe() returned are not seen. ``lag``: seconds a message
        may wait to be read (an events follower); a polling transport (SQLite) then
        looks that often and reads what came in one go, the others push at once."""

    # -- the live-node registry -----------------------------------------------------
    @abstractmethod
    def register_node(self, name: str, info: dict[str, Any], ttl: float) -> None:
        """Node ``name`` is alive for ``ttl`` seconds more (each worker heartbeat)."""

    @abstractmethod
    def unregister_node(self, name: str) -> None:
        """Node ``name`` is going away (warm shutdown)."""

    @abstractmethod
    def live_nodes(self) -> list[str] | int | None:
        """The nodes alive now: their names where the broker can list them (Redis,
        SQLite), else how many there are (RabbitMQ: consumers of a presence queue),
        None when unknown. Remote-control clients stop waiting once these replied."""

    # -- dead letters ---------------------------------------------------------------
    @abstractmethod
    def dead_letter(self, queue: str, raw: bytes, reason: str) -> None: ...

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    @abstractmethod
    def dead_letter_count(self) -> int:
        """How many dead letters are stored, without reading them (monitoring polls it)."""

    @abstractmethod
    def requeue_dead_letters(self, ids: Sequence[str] | None = None) -> int:
        """Put dead letters back on their queues (all when ``ids`` is None)."""

    @abstractmethod
    def purge_dead_letters(self) -> int: ...

    # -- locks (one beat per schedule) ---------------------------------------------------
    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take the lock ``name`` for ``owner`` for ``ttl`` seconds; True when ``owner``
        holds it now. The holder calls it again (well within ``ttl``) to renew it; anyone
        else gets False until the holder releases it or lets it expire. Raises
        BrokerUnreachable when the broker cannot be asked."""
        raise NotImplementedError(
            f"the {self.scheme or type(self).__name__} transport has no locks yet")

    def release_lock(self, name: str, owner: str) -> None:
        """Give the lock up if ``owner`` holds it (no error otherwise)."""
        raise NotImplementedError(
            f"the {self.scheme or type(self).__name__} transport has no locks yet")

    # -- lifecycle -------------------------------------------------------------------
    def ping(self) -> None:
        """Raise BrokerUnreachable if the broker cannot be reached."""
        self.queue_stats([])

    @abstractmethod
    def close(self) -> None: ...

    def safe_url(self) -> str:
        return mask_password(self.url)

    def check_size(self, what: str, raw: bytes) -> None:
        """Refuse a message over ``max_message_size`` before it reaches the broker."""
        limit = self.options.max_message_size
        if len(raw) > limit:
            raise PublishError(f"message for {what} is {len(raw)} bytes, over the "
                               f"max_message_size limit of {limit} bytes; send a reference "
                               "to the data instead, or raise the limit")

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers shared by transports ---------------------------------------------------


def topic_matches(pattern: str | None, key: str | None) -> bool:
    """AMQP topic matching: words split by '.', ``*`` one word, ``#`` zero or more."""
    if pattern is None or pattern == "#":  # (what event followers listen with)
        return True
    if key is None:
        return False

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        if not k:
            return False
        return (p[0] == "*" or p[0] == k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


class Backoff:
    """Poll intervals that start short and grow to ``maximum`` while nothing arrives."""

    def __init__(self, start: float = 0.001, maximum: float = 0.05) -> None:
        self.start = self.delay = start
        self.maximum = maximum

    def reset(self) -> None:
        self.delay = self.start

    def ease(self) -> None:
        """Something arrived: poll twice as often (a steady trickle settles near its
        own pace instead of starting over from ``start`` after every arrival)."""
        self.delay = max(self.start, self.delay / 2)

    def sleep(self, deadline: float) -> bool:
        """Sleep for the next interval (not past ``deadline``); False once it has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.delay, left))
        self.delay = min(self.delay * 2, self.maximum)
        return True


# scheme -> (module, class): a module is imported only when its scheme is used
TRANSPORTS = {
    "sqlite": ("qops.transports.sqlite", "SQLiteTransport"),
    "redis": ("qops.transports.redis", "RedisTransport"),
    "rediss": ("qops.transports.redis", "RedisTransport"),
    "unix": ("qops.transports.redis", "RedisTransport"),
    "sentinel": ("qops.transports.redis", "RedisTransport"),
    "amqp": ("qops.transports.amqp", "AMQPTransport"),
    "amqps": ("qops.transports.amqp", "AMQPTransport"),
    "pyamqp": ("qops.transports.amqp", "AMQPTransport"),
    "memory": ("qops.transports.memory", "MemoryTransport"),
}

def transport_class(url: str) -> type[Transport]:
    """The Transport class for ``url``'s scheme, once ``url`` is known to be well formed
    (imports its module, connects nothing). Every way of naming a broker (``-b``, the
    settings, ``App(broker=...)``) comes through here, so all get the same checks."""
    import importlib

    scheme = url_scheme(url, list(TRANSPORTS), "broker URL")
    module, name = TRANSPORTS[scheme]
    cls: type[Transport] = getattr(importlib.import_module(module), name)
    cls.check_url(url)
    return cls


def from_url(url: str, options: TransportOptions | None = None) -> Transport:
    """The transport for ``url``, by scheme (checked first: see ``transport_class``)."""
    return transport_class(url)(url, options)
