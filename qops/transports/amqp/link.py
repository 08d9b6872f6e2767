"""Connections to RabbitMQ: opening one (``open_connection``), ``_Link`` (a connection
with its channels, used by one thread at a time, and the declarations made on it), the
reply codes and errors the transport acts on, and the helpers turning them into
qops errors.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions as pex

from qops.errors import BrokerUnreachable, QopsError
from qops.transports.amqp.confirms import Confirms
from qops.transports.amqp.frames import _fast_frames
from qops.transports.amqp.url import AMQPParams
from qops.transports.base import TransportOptions
from qops.transports.declare import QueueShape
from qops.transports.failover import NodeOrder

log = logging.getLogger(__name__)

#: queue arguments of a reply queue (docs/protocol.md §4, the pidbox reply queue): gone
#: 10 s after its consumer, a reply unread for 5 minutes is stale
REPLY_QUEUE_ARGS = {"x-expires": 10000, "x-message-ttl": 300000}

#: exchange kind -> durable, as Celery declares them: the pidbox exchanges (fanout
#: ``<mailbox>``, direct ``reply.<mailbox>``) are not durable, the events exchange
#: (topic ``celeryev``) is. None of them auto-delete. Another setting is a 406.
EXCHANGES = {"fanout": False, "direct": False, "topic": True}

# AMQP reply codes we act on
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
NOT_IMPLEMENTED = 540  # e.g. a channel-wide prefetch on a quorum queue

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


def _connection_parameters(p: AMQPParams, options: TransportOptions, purpose: str) -> Any:
    timeout = options.connect_timeout
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


def open_connection(nodes: Sequence[AMQPParams], order: NodeOrder, options: TransportOptions,
                    safe: str, purpose: str) -> Any:
    """A new BlockingConnection to a node of ``nodes`` (one, or a cluster's: tried in
    ``order``, each once), or BrokerUnreachable saying what to fix (``safe``: the broker
    URL without its passwords, for the messages). A refused login or vhost is not a
    node being down: it is raised at once."""
    failed: list[str] = []
    for index in order.order():
        p = nodes[index]
        params = _connection_parameters(p, options, purpose)
        try:
            conn = _fast_frames(pika.BlockingConnection(params))
        except pex.ProbableAuthenticationError:
            raise BrokerUnreachable(
                f"RabbitMQ at {safe} refused the login of user {p.user!r}: "
                "check the user and password in the broker URL") from None
        except pex.ProbableAccessDeniedError as exc:
            vhost = p.vhost
            raise BrokerUnreachable(
                f"RabbitMQ at {safe} refused access to vhost {vhost!r} ({_reason(exc)}): "
                f"create it with `rabbitmqctl add_vhost {vhost}` and grant access with "
                f"`rabbitmqctl set_permissions -p {vhost} {p.user} "
                "'.*' '.*' '.*'`") from None
        except (pex.AMQPError, OSError, ValueError) as exc:
            # ValueError: pika's check that the socket it just connected is still
            # connected ("getpeername() failed"), when the broker dropped it at once
            failed.append(f"{p.host}:{p.port}: {_reason(exc)}" if len(nodes) > 1
                          else _reason(exc))
            continue
        if failed:
            log.warning("RabbitMQ: connected to node %s:%s (%s) after %s", p.host, p.port,
                        purpose, "; ".join(failed))
        order.reached(index)
        return conn
    where = "any node of the cluster " if len(nodes) > 1 else ""
    raise BrokerUnreachable(
        f"cannot connect to RabbitMQ at {where}{safe} ({'; '.join(failed)}): check that it "
        "is running (rabbitmq-server -detached) and the host and port in the broker "
        "URL")


class _Link:
    """One connection with its channels, used by one thread at a time.

    ``main`` is the channel messages flow on (the consuming channel for consumers);
    ``confirms`` the one confirmed publishes go on; ``admin`` takes the declares,
    purges and stats, whose failures (404, 406) close the channel they ran on --
    keeping them off the others keeps publisher confirms and consumers alive through
    them. Each reopens on demand.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.used = time.monotonic()
        self.queues: set[str] = set()  # declared on this connection
        self.exchanges: set[str] = set()
        self._main: Any = None
        self._admin: Any = None
        self._events: Any = None
        self._confirms: Confirms | None = None

    def main(self) -> Any:
        ch = self._main
        if ch is None or not ch.is_open:
            ch = self._main = self.conn.channel()
        return ch

    def confirms(self) -> Confirms:
        """The confirm-mode channel confirmed publishes go on (see ``confirms``);
        reopened after the broker closed it."""
        c = self._confirms
        if c is None or not c.is_open:
            c = self._confirms = Confirms(self.conn)
        return c

    def events(self) -> Any:
        """A channel without publisher confirms, for events: they are many and may be
        lost by design, so they don't wait for a round trip. A publish the broker
        refuses (404: the exchange was deleted) closes this channel asynchronously; the
        next call then finds it closed and opens a new one, forgetting the exchanges
        declared so far so that they are declared again."""
        ch = self._events
        if ch is None or not ch.is_open:
            if ch is not None:
                self.exchanges.clear()
            ch = self._events = self.conn.channel()
        return ch

    def main_is_open(self) -> bool:
        return self._main is not None and bool(self._main.is_open)

    def broken(self) -> BaseException | None:
        """Why a consumer on this link must reconnect: the connection closed, or the
        broker closed the main channel (its deliveries') and kept the connection, as
        RabbitMQ does for a delivery held past its consumer_timeout (406 'delivery
        acknowledgement on channel 1 timed out'). None while both are open."""
        if not self.conn.is_open:
            return ConnectionError("connection closed")
        ch = self._main
        if ch is None or ch.is_open:
            return None
        reason: BaseException | None = getattr(ch._impl, "_closing_reason", None)
        return reason or pex.ChannelClosed(0, "channel closed")

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
        """Declare a durable queue; if it exists with other arguments the broker
        answers 406 and closes the channel: then take the queue as it is with a
        passive declare, and say once per connection which argument differs."""
        try:
            ok = self.admin().queue_declare(name, durable=True, arguments=arguments)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            reason = _reason(exc)
            hint = ("; task_queue_max_priority set to its x-max-priority declares it the "
                    "same way" if "x-max-priority" in reason else "")
            log.warning("queue %s exists with other arguments than qops declares (%s): "
                        "using it as it is%s", name, reason, hint)
            ok = self.admin().queue_declare(name, passive=True)
        self.queues.add(name)
        return ok

    def declare_work_queue(self, shape: QueueShape) -> Any:
        """Declare a work queue as ``shape`` says: under the celery preset kombu's
        exchange first, then the queue, then the binding -- as a Celery client or worker
        declares it, so that neither side gets a 406 from the other's declaration."""
        if shape.exchange is not None:
            self.declare_exchange(shape.exchange, shape.exchange_type, durable=True)
        ok = self.declare_queue(shape.name, shape.arguments)
        if shape.exchange is not None:
            self.admin().queue_bind(shape.name, shape.exchange, shape.routing_key)
        return ok

    def declare_reply_queue(self, name: str) -> None:
        """Declare a reply queue, exclusive to this connection. Declared with exactly
        docs/protocol.md's arguments (§4): a queue of that name with others is an error (406)."""
        self.admin().queue_declare(name, durable=False, exclusive=True, auto_delete=True,
                                   arguments=REPLY_QUEUE_ARGS)
        self.queues.add(name)

    def declare_exchange(self, name: str, kind: str, durable: bool | None = None) -> None:
        """Declare exchange ``name`` the way Celery declares its counterpart (see
        ``EXCHANGES``; a queue's own exchange is durable). If it exists with other
        settings (406: someone made it differently), take it as it is with a passive
        declare."""
        if name in self.exchanges:
            return
        if durable is None:
            durable = EXCHANGES[kind]
        try:
            self.admin().exchange_declare(name, kind, durable=durable, auto_delete=False)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != PRECONDITION_FAILED:
                raise
            log.debug("exchange %s exists with other settings (%s); using it as it is",
                      name, exc.reply_text)
            self.admin().exchange_declare(name, passive=True)
        self.exchanges.add(name)

    def cancel_consumers(self, tags: list[str], pump: Callable[[float], None]) -> None:
        """Cancel the main channel's consumers ``tags``, calling ``pump`` until the
        broker confirmed (at most PUMP_SLICE): deliveries sent before that reach the
        consumer as usual. pika's own basic_cancel rejects them (requeued, they come back
        ``redelivered``, which counts as a worker loss: lost.py)."""
        ch, pending = self.main(), set(tags)
        for tag in tags:
            ch._impl.basic_cancel(tag, lambda frame: pending.discard(frame.method.consumer_tag))
            ch._impl._cancelled.discard(tag)  # pika rejects deliveries of tags in it
        deadline = time.monotonic() + PUMP_SLICE
        while pending and time.monotonic() < deadline:
            pump(0.05)
        self.conn.process_data_events(0)  # deliveries pika read: to the consumer
        for tag in tags:
            if tag not in pending:  # (else pika's close would cancel it again)
                ch._consumer_infos.pop(tag, None)

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # the parent's socket: closing it politely would end its connection
        try:
            if self.conn.is_open:
                self.conn.close()
        except LINK_ERRORS:
            pass


def _reason(exc: BaseException) -> str:
    """A one-line cause. pika's connect errors often have an empty str() and keep
    the real cause (e.g. ConnectionRefusedError) in their args."""
    text = str(exc).strip()
    if not text and exc.args:
        text = "; ".join(str(a).strip() or repr(a) for a in exc.args)
    return " ".join((text or type(exc).__name__).split())


def consumer_lost(exc: BaseException) -> str:
    """What a consumer lost, for its log line."""
    if not isinstance(exc, pex.ChannelClosedByBroker):
        return f"lost its RabbitMQ connection ({_reason(exc)})"
    hint = ""
    if exc.reply_code == PRECONDITION_FAILED and "acknowledgement" in exc.reply_text:
        hint = ("; it held a delivery unacknowledged past RabbitMQ's consumer_timeout "
                "(docs/production.md), and what it held goes back to the queue")
    return f"lost its channel, closed by RabbitMQ ({exc.reply_code} {exc.reply_text}){hint}"


def lost_text(safe: str, doing: str, exc: BaseException) -> str:
    """The one line for a connection lost while ``doing`` something."""
    return f"lost the connection to RabbitMQ at {safe} while {doing} ({_reason(exc)})"


def link_error(exc: BaseException, doing: str, safe: str) -> QopsError:
    """The error for ``exc`` raised on a link while ``doing``: the broker refused it (a
    channel error), or the connection is gone."""
    if isinstance(exc, pex.ChannelClosedByBroker):
        return _channel_error(exc, doing, safe)
    return BrokerUnreachable(lost_text(safe, doing, exc))


def _channel_error(exc: pex.ChannelClosedByBroker, what: str, safe: str,
                   kind: type[QopsError] = BrokerUnreachable) -> QopsError:
    return kind(f"RabbitMQ at {safe} refused {what}: {exc.reply_code} {exc.reply_text}")


def _close_channel(ch: Any) -> None:
    try:
        if ch.is_open:
            ch.close()
    except LINK_ERRORS:
        pass
