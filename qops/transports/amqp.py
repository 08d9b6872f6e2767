"""RabbitMQ transport (AMQP 0-9-1 through ``pika``): ``amqp://user:pass@host:5672/vhost``.

Wire layout (PROTOCOL.md §1, §3): tasks go through the default exchange ``""`` with
routing key = queue name, ``delivery_mode`` 2, to durable queues declared with
``x-max-priority`` (so qops's priority 9 = AMQP's highest, passed through as is).
Broadcasts go to a fanout exchange named after the channel (not durable, not
auto-deleted, like Celery's pidbox exchange). Dead letters live in a durable queue,
``qops.dlq`` unless ``?dead_letter_queue=NAME`` is in the URL.

Threads. A pika connection must only ever be used by one thread at a time; its one
thread-safe method is ``add_callback_threadsafe``. So:

- publishing (and the admin calls: purge, stats, dead letters) uses one connection per
  thread, kept in a ``threading.local`` and replaced on the next call after it is lost;
- each ``Consumer`` and ``Subscription`` owns its own connection, driven only by the
  thread calling ``get()``. ``ack``/``requeue``/``reject``/``add_queue``/``cancel_queue``
  from other threads only queue an operation and wake that thread, which runs the queue
  before it hands out the next message (and ``close()`` runs it before closing).

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
import math
import os
import socket
import ssl
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import pika
import pika.exceptions as pex

from qops.errors import BrokerUnreachable, PublishError, QopsError, UsageError
from qops.transports.base import (
    JSON,
    Consumer,
    DeadLetter,
    Delivery,
    Message,
    QueueStats,
    Subscription,
    Transport,
    TransportOptions,
    mask_password,
)

log = logging.getLogger(__name__)

DEAD_LETTER_QUEUE = "qops.dlq"
DEFAULT_HEARTBEAT = 60
DEFAULT_BLOCKED_TIMEOUT = 60.0

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

# AMQP reply codes we act on
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406

#: get() pumps the connection in slices this long at most, so that close() from another
#: thread never waits longer (acks from other threads wake the pump at once anyway)
PUMP_SLICE = 0.25

#: a thread's publisher connection idle for longer than this is pumped before use, so
#: that a connection the broker dropped (missed heartbeats) is noticed and replaced
#: before a message is sent on it
IDLE_CHECK = 1.0

#: errors meaning "this connection (or channel) is gone": drop it and reconnect
LINK_ERRORS: tuple[type[BaseException], ...] = (
    pex.AMQPConnectionError, pex.AMQPChannelError, OSError,
)

T = TypeVar("T")


# -- URL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AMQPParams:
    host: str
    port: int
    vhost: str
    user: str
    password: str
    tls: bool
    heartbeat: int
    dead_letter_queue: str
    blocked_connection_timeout: float


def parse_url(url: str) -> AMQPParams:
    """Split an ``amqp://`` URL the way kombu does: ``/x`` is vhost ``x``; an empty
    path, ``/`` or ``//`` is vhost ``/``; every part is percent-decoded."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad broker URL {mask_password(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("amqp", "amqps", "pyamqp"):
        raise UsageError(f"not an AMQP URL: {mask_password(url)!r}")
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    query = dict(parse_qsl(parts.query))
    try:
        heartbeat = int(query.get("heartbeat", DEFAULT_HEARTBEAT))
        blocked = float(query.get("blocked_connection_timeout", DEFAULT_BLOCKED_TIMEOUT))
    except ValueError as exc:
        raise UsageError(f"bad option in broker URL {mask_password(url)!r}: {exc}") from None
    tls = scheme == "amqps"
    return AMQPParams(
        host=parts.hostname or "localhost",
        port=port or (5671 if tls else 5672),
        vhost=vhost,
        user=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        tls=tls,
        heartbeat=max(0, heartbeat),
        dead_letter_queue=query.get("dead_letter_queue") or DEAD_LETTER_QUEUE,
        blocked_connection_timeout=blocked,
    )


# -- header values --------------------------------------------------------------------
#
# pika's field-table encoder has no float (it raises), and its decoder turns AMQP doubles
# ('d', what py-amqp/Celery send for floats) into truncated ints. What we do:
#
# - a float with an integral value goes as an int (300.0 -> 300; what PROTOCOL.md §3
#   asks for, e.g. the pidbox ``expires``);
# - any other float goes as an AMQP decimal ('D': 32-bit mantissa, with as many decimal
#   places as fit; a unix timestamp keeps whole seconds), and qops turns decimals back
#   into floats when it reads headers. A Celery worker reading such a header gets a
#   ``Decimal``: fine for Celery's headers in practice (time limits are ints or None);
# - tuples become lists, ints beyond 64 bits become strings; anything else AMQP can't
#   carry (sets, objects) raises PublishError *before* anything is sent: pika writes the
#   method frame before it encodes the headers, so a failing encode mid-publish would
#   leave a half-sent message and the broker would close the connection.

_INT32 = 2 ** 31
_INT64 = 2 ** 63


def _amqp_float(value: float) -> int | Decimal | str:
    if not math.isfinite(value):
        return repr(value)
    if value.is_integer():
        return int(value) if -_INT64 <= value < _INT64 else repr(value)
    places = max(0, -int(Decimal(repr(value)).as_tuple().exponent))
    while places > 0:
        raw = round(value * 10 ** places)
        if -_INT32 <= raw < _INT32:
            return Decimal(raw).scaleb(-places)
        places -= 1
    return int(round(value))


def _decimal_fits(value: Decimal) -> bool:
    sign, digits, exponent = value.normalize().as_tuple()
    if not isinstance(exponent, int):  # NaN / Infinity
        return False
    if exponent >= 0:
        return -_INT32 <= int(value) < _INT32
    return -exponent <= 255 and -_INT32 <= int(value.scaleb(-exponent)) < _INT32


def _amqp_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bytes, bool, datetime)):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, float):
        return _amqp_float(value)
    if isinstance(value, Decimal):
        return value if _decimal_fits(value) else _amqp_float(float(value))
    if isinstance(value, dict):
        return _amqp_table(value, where)
    if isinstance(value, (list, tuple)):
        return [_amqp_value(v, where) for v in value]
    raise PublishError(
        f"header {where!r} holds a {type(value).__name__}, which AMQP can't carry: "
        "use str, int, float, bool, None, list or dict")


def _amqp_table(table: dict[Any, Any], where: str = "") -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        name = key if isinstance(key, str) else str(key)
        if len(name.encode("utf-8")) > 255:
            raise PublishError(f"header name {name[:40]!r}... is longer than AMQP's 255 bytes")
        out[name] = _amqp_value(value, f"{where}.{name}" if where else name)
    return out


def _from_amqp(value: Any) -> Any:
    """Undo the float -> decimal mapping above for values qops reads."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_amqp(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_amqp(v) for v in value]
    return value


def _read_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    if not headers:
        return {}
    # fast path: Celery headers are mostly scalars; rebuild only when something changes
    for v in headers.values():
        if isinstance(v, (Decimal, dict, list)):
            return {k: _from_amqp(v) for k, v in headers.items()}
    return headers


# -- message <-> AMQP properties -------------------------------------------------------

#: BasicProperties fields copied into Message.properties when set
_READ_PROPS = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration",
               "message_id", "type", "app_id", "timestamp")


def _expiration(value: Any) -> str | None:
    """AMQP per-message TTL: a string of whole milliseconds (kombu sends a string)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    return str(max(0, int(value)))


def _priority(value: Any) -> int | None:
    # qops's scale (0..9, 9 first) is AMQP's meaning: pass through, clamped to a byte
    return None if value is None else min(255, max(0, int(value)))


def _basic_properties(message: Message, delivery_mode: int) -> pika.BasicProperties:
    p = message.properties
    return pika.BasicProperties(
        content_type=message.content_type or None,
        content_encoding=message.content_encoding or None,
        headers=_amqp_table(message.headers) if message.headers else None,
        delivery_mode=int(p.get("delivery_mode") or delivery_mode),
        priority=_priority(p.get("priority")),
        correlation_id=p.get("correlation_id"),
        reply_to=p.get("reply_to"),
        expiration=_expiration(p.get("expiration")),
        message_id=p.get("message_id"),
        type=p.get("type"),
        app_id=p.get("app_id"),
        timestamp=int(p["timestamp"]) if p.get("timestamp") is not None else None,
    )


def _message(props: Any, body: bytes) -> Message:
    properties = {}
    for name in _READ_PROPS:
        value = getattr(props, name, None)
        if value is not None:
            properties[name] = value
    return Message(body=body, headers=_read_headers(props.headers), properties=properties,
                   content_type=props.content_type or JSON,
                   content_encoding=props.content_encoding or "utf-8")


# -- connections --------------------------------------------------------------------------


class _Link:
    """One connection with its channels, used by one thread at a time.

    ``main`` is the channel messages flow on (confirm mode for publishers, the consuming
    channel for consumers); ``admin`` takes the declares, purges and stats, whose
    failures (404, 406) close the channel they ran on -- keeping them off ``main``
    keeps publisher confirms and consumers alive through them. Both reopen on demand.
    """

    def __init__(self, conn: Any, confirm: bool) -> None:
        self.conn = conn
        self.confirm = confirm
        self.pid = os.getpid()
        self.used = time.monotonic()
        self.queues: set[str] = set()  # declared on this connection
        self.exchanges: set[str] = set()
        self._main: Any = None
        self._admin: Any = None

    def main(self) -> Any:
        ch = self._main
        if ch is None or not ch.is_open:
            ch = self.conn.channel()
            if self.confirm:
                ch.confirm_delivery()
            self._main = ch
        return ch

    def main_is_open(self) -> bool:
        return self._main is not None and bool(self._main.is_open)

    def admin(self) -> Any:
        ch = self._admin
        if ch is None or not ch.is_open:
            ch = self._admin = self.conn.channel()
        return ch

    def usable(self) -> bool:
        """Still open (and ours: after a fork the child must not touch the parent's
        socket). Pumps an idle connection first so a dead one is noticed now."""
        if self.pid != os.getpid() or not self.conn.is_open:
            return False
        if time.monotonic() - self.used > IDLE_CHECK:
            try:
                self.conn.process_data_events(0)
            except LINK_ERRORS:
                return False
        return bool(self.conn.is_open)

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> Any:
        """Declare a durable queue; if it exists with other arguments (Celery declares
        queues without ``x-max-priority``) the broker answers 406 and closes the
        channel: then take the queue as it is with a passive declare."""
        try:
            ok = self.admin().queue_declare(name, durable=True, arguments=arguments)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            log.debug("queue %s exists with other arguments (%s); using it as it is",
                      name, exc.reply_text)
            ok = self.admin().queue_declare(name, passive=True)
        self.queues.add(name)
        return ok

    def declare_fanout(self, name: str) -> None:
        if name in self.exchanges:
            return
        try:
            self.admin().exchange_declare(name, "fanout", durable=False, auto_delete=False)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            self.admin().exchange_declare(name, passive=True)
        self.exchanges.add(name)

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # the parent's socket: closing it politely would end its connection
        try:
            if self.conn.is_open:
                self.conn.close()
        except LINK_ERRORS:
            pass


# -- transport ---------------------------------------------------------------------------


class AMQPTransport(Transport):
    scheme = "amqp"

    def __init__(self, url: str, options: TransportOptions | None = None) -> None:
        super().__init__(url, options)
        self.params = parse_url(url)
        self.dead_letter_queue = self.params.dead_letter_queue
        self._local = threading.local()
        self._lock = threading.Lock()
        self._links: weakref.WeakSet[_Link] = weakref.WeakSet()
        self._consumers: weakref.WeakSet[_AMQPConsumer] = weakref.WeakSet()
        self._known: set[str] = set()  # queues this transport declared or consumed

    # -- connections ---------------------------------------------------------------------
    def _connection_parameters(self, purpose: str) -> Any:
        p = self.params
        timeout = self.options.connect_timeout
        ssl_options = None
        if p.tls:
            ssl_options = pika.SSLOptions(ssl.create_default_context(), server_hostname=p.host)
        return pika.ConnectionParameters(
            host=p.host, port=p.port, virtual_host=p.vhost,
            credentials=pika.PlainCredentials(p.user, p.password),
            heartbeat=p.heartbeat,
            ssl_options=ssl_options,
            connection_attempts=1,
            socket_timeout=timeout,
            stack_timeout=timeout,
            blocked_connection_timeout=p.blocked_connection_timeout or None,
            # shows in `rabbitmqctl list_connections client_properties`
            client_properties={"connection_name":
                               f"qops {purpose} {socket.gethostname()}:{os.getpid()}"},
        )

    def connect(self, purpose: str) -> Any:
        """A new BlockingConnection, or BrokerUnreachable saying what to fix."""
        safe = self.safe_url()
        try:
            return pika.BlockingConnection(self._connection_parameters(purpose))
        except pex.ProbableAuthenticationError:
            raise BrokerUnreachable(
                f"RabbitMQ at {safe} refused the login of user {self.params.user!r}: "
                "check the user and password in the broker URL") from None
        except pex.ProbableAccessDeniedError as exc:
            vhost = self.params.vhost
            raise BrokerUnreachable(
                f"RabbitMQ at {safe} refused access to vhost {vhost!r} ({_reason(exc)}): "
                f"create it with `rabbitmqctl add_vhost {vhost}` and grant access with "
                f"`rabbitmqctl set_permissions -p {vhost} {self.params.user} "
                "'.*' '.*' '.*'`") from None
        except (pex.AMQPError, OSError) as exc:
            raise BrokerUnreachable(
                f"cannot connect to RabbitMQ at {safe} ({_reason(exc)}): check that it is "
                "running (rabbitmq-server -detached) and the host and port in the broker "
                "URL") from None

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
              fanout: str | None = None) -> None:
        """Publish on this thread's connection, declaring ``queue`` / ``fanout`` first.

        With confirms on, returns only once the broker has taken the message. A message
        for a queue is published ``mandatory``: if the queue vanished since we declared
        it, the broker returns it, and we declare again and resend (nothing was
        delivered, so no duplicate). A connection that died while idle is replaced and
        the message sent once more on the new one."""
        if len(body) > self.options.max_message_size:
            raise PublishError(
                f"message of {len(body)} bytes for {routing_key or exchange!r} is larger "
                f"than max_message_size ({self.options.max_message_size} bytes)")
        mandatory = queue is not None and self.options.confirm_publish
        redeclared = False
        attempt = 0
        while True:
            attempt += 1
            link, reused = self._link()
            try:
                if queue is not None and queue not in link.queues:
                    link.declare_queue(queue, queue_args)
                    self._remember(queue)
                if fanout is not None:
                    link.declare_fanout(fanout)
                link.main().basic_publish(exchange, routing_key, body, props,
                                          mandatory=mandatory)
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
    def broadcast(self, channel: str, message: Message) -> None:
        # transient like Celery's pidbox: a broadcast is for the subscribers of the moment;
        # not mandatory: nobody listening is fine
        props = _basic_properties(message, delivery_mode=1)
        self._send(channel, "", message.body, props, queue=None, fanout=channel)

    def subscribe(self, channel: str) -> Subscription:
        return _AMQPSubscription(self, channel)

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
        self._send("", dlq, raw, props, queue=dlq, queue_args=None)

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


def _reason(exc: BaseException) -> str:
    """A one-line cause. pika's connect errors often have an empty str() and keep
    the real cause (e.g. ConnectionRefusedError) in their args."""
    text = str(exc).strip()
    if not text and exc.args:
        text = "; ".join(str(a).strip() or repr(a) for a in exc.args)
    return " ".join((text or type(exc).__name__).split())


def _channel_error(exc: pex.ChannelClosedByBroker, what: str, safe: str,
                   kind: type[QopsError] = BrokerUnreachable) -> QopsError:
    return kind(f"RabbitMQ at {safe} refused {what}: {exc.reply_code} {exc.reply_text}")


def _close_channel(ch: Any) -> None:
    try:
        if ch.is_open:
            ch.close()
    except LINK_ERRORS:
        pass


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
    """

    transport: AMQPTransport

    def __init__(self, transport: AMQPTransport, queues: list[str], prefetch: int,
                 cid: str) -> None:
        self.transport = transport
        self.id = cid
        self.prefetch = max(1, prefetch)
        self._lock = threading.Lock()  # _wanted, _held, _props
        self._io = threading.RLock()  # whoever drives the connection (get, close)
        self._wanted: list[str] = list(dict.fromkeys(queues))
        self._held: dict[int, str] = {}  # tag -> queue: buffered or handed out, unsettled
        self._props: dict[int, Any] = {}  # tag -> BasicProperties, for reject()
        self._ops: deque[tuple[str, Any]] = deque()  # settled/changed from any thread
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
        link = _Link(self.transport.connect("consumer"), confirm=False)
        try:
            ch = link.main()
            ch.basic_qos(prefetch_count=self.prefetch)
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
        except LINK_ERRORS as exc:
            self._link = None
            link.close()
            raise BrokerUnreachable(
                f"lost the connection to RabbitMQ at {self.transport.safe_url()} while "
                f"starting to consume ({_reason(exc)})") from None

    def _lost(self, exc: BaseException) -> None:
        """The connection is gone: the broker requeues everything it had given us."""
        log.warning("consumer %s lost its RabbitMQ connection (%s); reconnecting",
                    self.id, _reason(exc))
        link, self._link = self._link, None
        if link is not None:
            link.close()
        self._buffer.clear()
        with self._lock:
            self._held.clear()
            self._props.clear()
        # queue changes are replayed from _wanted on reconnect; settlements are moot
        self._ops.clear()

    def _consume(self, queue: str) -> None:
        link = self._link
        assert link is not None
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
                    self._props.pop(item[0], None)
                link.main().basic_nack(item[0] - self._base, requeue=True)
            else:
                keep.append(item)
        self._buffer = keep

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        tag = self._base + method.delivery_tag
        self._top = max(self._top, tag)
        queue = self._queue_of.get(method.consumer_tag, method.routing_key)
        with self._lock:
            self._held[tag] = queue
            self._props[tag] = props
        self._buffer.append((tag, queue, bool(method.redelivered), props, body))

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
        self._ops.append(("consume", queue))

    def _run_ops(self) -> None:
        link = self._link
        assert link is not None
        while self._ops:
            op, arg = self._ops.popleft()
            if op == "ack" or op == "nack":
                if arg <= self._base:
                    continue  # from a previous connection: already back in its queue
                if op == "ack":
                    link.main().basic_ack(arg - self._base)
                else:
                    link.main().basic_nack(arg - self._base, requeue=True)
            elif op == "consume":
                with self._lock:
                    wanted = arg in self._wanted
                if wanted and arg not in self._tags and not self._closed:
                    self._add(arg)
            elif op == "cancel":
                with self._lock:
                    wanted = arg in self._wanted
                if not wanted:
                    self._cancel(arg)

    def _submit(self, op: str, arg: Any) -> None:
        self._ops.append((op, arg))
        if threading.get_ident() == self._owner:
            return  # the next get() (or close()) on this thread runs it
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
                    if self._link is not None and not self._link.conn.is_open:
                        # closed under us (pika raises ValueError if pumped now)
                        self._lost(ConnectionError("connection closed"))
                    if self._link is None:
                        self._connect()
                    self._run_ops()
                    if self._buffer:
                        return self._delivery(self._buffer.popleft())
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    assert self._link is not None
                    self._link.conn.process_data_events(time_limit=min(left, PUMP_SLICE))
                except LINK_ERRORS as exc:
                    # reconnect on the next turn; if that fails, BrokerUnreachable goes up
                    self._lost(exc)
                    if time.monotonic() >= deadline:
                        return None

    def _delivery(self, item: tuple[int, str, bool, Any, bytes]) -> Delivery:
        tag, queue, redelivered, props, body = item
        return Delivery(queue=queue, tag=tag, raw=body, message=_message(props, body),
                        redelivered=redelivered)

    def held(self, queue: str) -> int:
        with self._lock:
            return sum(1 for q in self._held.values() if q == queue)

    def _settle(self, delivery: Delivery, op: str) -> None:
        with self._lock:
            if self._held.pop(delivery.tag, None) is None:
                return  # settled already, or from a lost connection: acking twice would
                # be a channel error that drops every other reserved message
            self._props.pop(delivery.tag, None)
        self._submit(op, delivery.tag)

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, "ack")

    def requeue(self, delivery: Delivery) -> None:
        # basic.nack(requeue) puts it back at (or near) the head of its queue
        self._settle(delivery, "nack")

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter with the original headers and properties (a plain
        Transport.dead_letter only gets the body), then ack. If the DLQ publish fails
        the message stays reserved, so it is never lost."""
        with self._lock:
            if delivery.tag not in self._held:
                return
            original = self._props.get(delivery.tag)
        self.transport._dead_letter(delivery.queue, delivery.raw, reason, original)
        self.ack(delivery)

    def heartbeat(self) -> None:
        """Nothing to do: the broker watches the connection (AMQP heartbeats, sent while
        get() pumps it; the worker calls get() all the time)."""

    def add_queue(self, queue: str) -> None:
        with self._lock:
            if queue in self._wanted:
                return
            self._wanted.append(queue)
        self._submit("consume", queue)

    def cancel_queue(self, queue: str) -> None:
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
                    self._run_ops()
                except LINK_ERRORS:
                    pass
                finally:
                    self._link = None
                    link.close()
            self._buffer.clear()
            with self._lock:
                self._held.clear()
                self._props.clear()
        with self.transport._lock:
            self.transport._consumers.discard(self)


# -- subscription --------------------------------------------------------------------------------


class _AMQPSubscription(Subscription):
    """A server-named, exclusive, auto-delete queue bound to the fanout exchange, on a
    connection of its own. It is bound when the constructor returns, so nothing
    broadcast after subscribe() is missed. If the connection drops, get() makes a new
    queue (what was broadcast in between is lost: broadcasts are not stored)."""

    transport: AMQPTransport

    def __init__(self, transport: AMQPTransport, channel: str) -> None:
        self.transport = transport
        self.channel = channel
        self._buffer: deque[Message] = deque()
        self._io = threading.Lock()  # get() pumps in slices under it; close() takes it
        self._closed = False
        self._link: _Link | None = None
        self._connect()

    def _connect(self) -> None:
        link = _Link(self.transport.connect("subscriber"), confirm=False)
        try:
            link.declare_fanout(self.channel)
            ch = link.main()
            ok = ch.queue_declare("", exclusive=True, auto_delete=True,
                                  arguments=SUBSCRIPTION_ARGS)
            queue = ok.method.queue
            ch.queue_bind(queue, self.channel)
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
