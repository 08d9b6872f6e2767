"""The queues an AMQP consumer consumes, at run time: ``add_queue``/``cancel_queue``
(remote control's add_consumer/cancel_consumer, from any thread) queue a change that the
owner's next pump applies (``_run_ops``); a queue the broker refuses is given up alone;
a consumer the broker cancels (its queue deleted) is declared and consumed again. A
mixin of ``_AMQPConsumer`` (qops/transports/amqp/consumer.py), which holds the state:
``_wanted`` (what was asked, replayed on reconnect), ``_tags``/``_queue_of`` (the
consumer tags of the current channel) and ``_ops``."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import pika.exceptions as pex

from qops.errors import UsageError
from qops.transports.base import REPLY_ONLY

if TYPE_CHECKING:
    from collections import deque

    from qops.transports.amqp.link import _Link
    from qops.transports.amqp.transport import AMQPTransport

log = logging.getLogger("qops.transports.amqp.consumer")


class QueueSet:
    transport: AMQPTransport
    id: str
    reply: bool
    binding: tuple[str, str] | None
    _link: _Link | None
    _lock: threading.Lock
    _wanted: list[str]
    _ops: deque[tuple[str, str]]
    _tags: dict[str, str]
    _queue_of: dict[str, str]
    _pump_itself: bool

    if TYPE_CHECKING:
        def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None: ...
        def _requeue_buffered(self, queue: str) -> None: ...
        def _wake(self, itself: bool) -> None: ...

    def _consume(self, queue: str) -> None:
        link = self._link
        assert link is not None
        self.transport.declare_consumed(link, queue, self.reply, self.binding)
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
        self._requeue_buffered(queue)  # for other workers

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

    def _submit(self, op: str, queue: str) -> None:
        with self._lock:
            self._ops.append((op, queue))
            itself = self._pump_itself
        self._wake(itself)

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
