"""The live-node registry of the AMQP transport: the presence queue ``qops.nodes``
(``qops.nodes.celery`` under the celery preset).

RabbitMQ can't list queues or connections without the management plugin, so each
registered node holds a consumer on the presence queue, on a connection of its own,
and ``live_nodes()`` is that queue's consumer count.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import pika.exceptions as pex

from qops.transports.amqp.link import (
    LINK_ERRORS,
    NOT_FOUND,
    PRECONDITION_FAILED,
    _Link,
    link_error,
)

if TYPE_CHECKING:
    from qops.transports.amqp.transport import AMQPTransport

#: the live-node registry: each live node holds one consumer on this queue, on a
#: connection of its own, and ``live_nodes()`` reads its consumer count (RabbitMQ can't
#: list queues or connections without the management plugin). Nothing is ever
#: published to it. Not durable, not auto-delete (an auto-delete queue vanishes when
#: its last consumer leaves, and a node declaring it just then would get a 404 on its
#: basic.consume); ``x-expires`` removes it a minute after the last node went away.
PRESENCE_QUEUE = "qops.nodes"  # the qops preset's; options.registry names the one used
PRESENCE_ARGS = {"x-expires": 60000}


class _Presence:
    """This process's consumers on the presence queue, one per registered node name, on
    a connection of their own (a consumer lives as long as its connection: when the
    process dies the kernel closes the socket and RabbitMQ drops the consumers at
    once). Used from any thread, one at a time (``_lock``); pumped by ``register()``,
    which the worker calls every heartbeat interval."""

    def __init__(self, transport: AMQPTransport) -> None:
        self.transport = transport
        self.queue = transport.options.registry
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._names: list[str] = []  # registered, in order
        self._tags: dict[str, str] = {}  # name -> consumer tag on the current link

    def count(self) -> int:
        """How many nodes hold a consumer on the presence queue (0 if there is none)."""
        def run(link: _Link) -> int:
            try:
                ok = link.admin().queue_declare(self.queue, passive=True)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == NOT_FOUND:
                    return 0
                raise
            return int(ok.method.consumer_count)

        return self.transport._admin("counting live nodes", run)

    def register(self, name: str) -> None:
        with self._lock:
            if name not in self._names:
                self._names.append(name)
            try:
                self._sync()
            except LINK_ERRORS as exc:
                self._drop()
                raise link_error(exc, f"registering node {name!r}",
                                 self.transport.safe_url()) from None

    def _sync(self) -> None:
        link = self._link
        if link is not None and (link.pid != os.getpid() or not link.conn.is_open):
            self._drop()  # lost (or the parent's, after a fork): start again
            link = None
        if link is None:
            link = _Link(self.transport.connect("presence"))
            self._link = link
            self._tags.clear()
            _declare_presence_queue(link, self.queue)
        for name in self._names:
            if name not in self._tags:
                self._tags[name] = link.main().basic_consume(
                    self.queue, _ignore_message, auto_ack=True)
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


def _declare_presence_queue(link: _Link, queue: str) -> None:
    try:
        link.admin().queue_declare(queue, durable=False, auto_delete=False,
                                   arguments=PRESENCE_ARGS)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code != PRECONDITION_FAILED:
            raise
        link.admin().queue_declare(queue, passive=True)
    link.queues.add(queue)


def _ignore_message(*_args: Any) -> None:
    """Nothing is published to the presence queue; anything that is, is dropped."""
